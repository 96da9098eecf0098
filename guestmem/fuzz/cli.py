"""``guestmem fuzz``: run the hostile stateful fuzzer for as long as the user wants.

``guestmem fuzz --minutes N [--seed S] [--backend model|kernel] [--json]`` prints a summary line
("N sequences, M steps, K findings") and, for each distinct finding, a minimal standalone Python
reproducer.  Exit status: 0 when the run found nothing, 1 when it found something, 2 for bad
input (argparse, or ``--backend kernel`` on a host without ``/dev/kvm``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any

from guestmem import cliargs


def _minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not 0 <= v <= 7 * 24 * 60:
        raise argparse.ArgumentTypeError(f"minutes must be in [0, 10080], got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer seed: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("seed must be >= 0")
    return v


def add_parser(sub: Any) -> None:
    """Register ``fuzz`` on the ``guestmem`` command's subparsers."""
    p = sub.add_parser("fuzz", help="hostile stateful fuzzing of the interface; prints reproducers")
    p.add_argument("--minutes", type=_minutes, default=1.0, help="how long to run (default 1)")
    p.add_argument("--seed", type=_seed, default=0, help="base seed (same seed, same sequences)")
    p.add_argument("--backend", choices=("model", "kernel"), default="model",
                   help="model: the model alone, every promise checked; kernel: differential, the "
                        "kernel backend against the model configured like this host")
    p.add_argument("--sequences", type=cliargs.int_in(1, 10**9, "sequences"), default=None, metavar="N",
                   help="stop after N sequences even if time is left")
    p.add_argument("--max-steps", type=cliargs.int_in(1, 10_000, "steps"), default=60, metavar="N",
                   help="steps per sequence at most (default 60; 12 on the kernel backend)")
    p.add_argument("--shrink-seconds", type=cliargs.seconds, default=5.0, metavar="S",
                   help="time to spend shrinking each distinct finding (default 5)")
    p.add_argument("--step-timeout", type=cliargs.seconds, default=30.0, metavar="S",
                   help="report a step still running after S seconds as a hang and end its "
                        "sequence (default 30)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--findings", metavar="FILE", type=cliargs.output_file,
                   help="also write the findings grouped by cause as Markdown to FILE")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace, console: Any = None) -> int:
    """The command: returns the exit status."""
    from guestmem.fuzz.runner import fuzz

    if args.max_steps < 1 or (args.sequences is not None and args.sequences < 1):
        print("guestmem fuzz: error: --max-steps and --sequences must be >= 1", file=sys.stderr)
        return 2
    seconds = args.minutes * 60
    if args.backend == "kernel":
        from guestmem.fuzz import differential

        problem = differential.unavailable(getattr(args, "device", "/dev/kvm"))
        if problem:
            print(f"guestmem fuzz: error: --backend kernel: {problem}", file=sys.stderr)
            return 2
        rep = differential.fuzz_kernel(seconds, args.seed, max_steps=min(args.max_steps, 12),
                                       shrink_budget=args.shrink_seconds,
                                       path=getattr(args, "device", "/dev/kvm"),
                                       max_sequences=args.sequences)
    else:
        from guestmem.fuzz.machine import Session

        rep = fuzz(seconds, args.seed, max_steps=args.max_steps, shrink_budget=args.shrink_seconds,
                   max_sequences=args.sequences,
                   session_factory=functools.partial(Session, step_timeout=args.step_timeout))
    if args.findings:
        from guestmem.report.atomic import write_text

        cmd = f"guestmem fuzz --minutes {args.minutes:g} --seed {args.seed} --backend {args.backend}"
        write_text(args.findings, rep.markdown("guestmem fuzz findings", cmd))
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        print(rep.summary())
        for r in rep.findings:
            print()
            print(f"### [{r.finding.category}] x{r.count}: {' | '.join(r.finding.key[1:])}")
            print(r.reproducer, end="")
    return 1 if rep.records else 0
