"""``guestmem explore``: the interleaving explorer's command.

``--list`` prints the race kit, ``--mutants`` the museum.  Otherwise the named races (all of them
by default, or the witness race of ``--mutant``) are explored with DFS under a preemption bound or
with PCT within a budget; a violation is shrunk to the fewest preemptions, printed as a numbered
interleaving, written as a replay file, replayed to check it reproduces step for step, and with
``--trace`` rendered for Perfetto.  ``--replay FILE`` runs a saved schedule again.  Exit status: 0
no violation within the budget, 1 a violation, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

from guestmem import cliargs
from guestmem.report.atomic import write_text


def _replay_file(text: str) -> str:
    """A replay file must be an existing regular file of reasonable size."""
    try:
        st = os.stat(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
        raise argparse.ArgumentTypeError(f"{text}: not a replay file (a regular file under 64 MiB)")
    return text


def _out_dir(text: str) -> str:
    """Where replay files go: an existing, writable directory."""
    if not os.path.isdir(text) or not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not an existing, writable directory")
    return text


def register(sub: Any) -> None:
    """Add the ``explore`` subcommand to the ``guestmem`` parser."""
    p = sub.add_parser("explore", help="explore thread interleavings of the model for races")
    p.add_argument("races", nargs="*", metavar="RACE", help="races by id (NAME:FLAVOUR) or name; "
                   "default: the whole kit, or the witness race of --mutant")
    p.add_argument("--list", action="store_true", help="list the race kit and exit")
    p.add_argument("--mutants", action="store_true", help="list the museum of mutants and exit")
    p.add_argument("--mutant", metavar="NAME", help="plant this known bug first")
    p.add_argument("--strategy", choices=("dfs", "pct"), default="dfs",
                   help="dfs: exhaustive, iterative preemption bounding (default); pct: randomized")
    p.add_argument("--preemptions", type=cliargs.int_in(0, 16, "preemptions"), default=2, metavar="K",
                   help="DFS preemption bound (default 2)")
    p.add_argument("--depth", type=cliargs.int_in(1, 64, "change points"), default=3, metavar="D",
                   help="PCT depth (default 3)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=cliargs.seconds, metavar="S",
                        help="time budget per race (default 60 unless --schedules)")
    budget.add_argument("--schedules", type=cliargs.int_in(1, 10**12, "schedules"), metavar="N",
                        help="schedule budget per race")
    p.add_argument("--seed",
                   type=cliargs.int_in(0, 2**63 - 1, "seed"), default=0, help="PCT seed (default 0)")
    p.add_argument("--workers", type=cliargs.int_in(1, 4096, "workers"), metavar="N",
                   help="fan PCT schedules out over N Ray workers (needs the [explore] extra)")
    p.add_argument("--address", metavar="ADDR", help="join this Ray cluster instead of a local one")
    p.add_argument("--skip-known", action="store_true",
                   help="do not stop at the model findings already recorded for a race (docs/explore.md)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--trace", metavar="FILE",
                   type=cliargs.output_file, help="write the (failing) schedule as a Perfetto trace")
    p.add_argument("--replay", metavar="FILE",
                   type=_replay_file, help="run the schedule saved in a replay file")
    p.add_argument("--out", metavar="DIR",
                   type=_out_dir, default=".", help="where replay files go (default .)")
    p.set_defaults(func=run_command)


def _err(msg: str) -> int:
    print(f"guestmem explore: error: {msg}", file=sys.stderr)
    return 2


def run_command(args: argparse.Namespace, console: Any = None) -> int:
    from guestmem.explore import mutants, races

    if args.list:
        for r in races.RACES:
            how = "dfs" if r.small else "pct"
            witnessed = [m.name for m in mutants.MUTANTS if m.race == r.id]
            extra = f"  [mutants: {', '.join(witnessed)}]" if witnessed else ""
            print(f"{r.id:<36} {how:<4} {r.summary}{extra}")
        return 0
    if args.mutants:
        for m in mutants.MUTANTS:
            print(f"{m.name:<30} {m.race:<36} {m.summary}\n{'':<30} from: {m.origin}")
        return 0
    if args.mutant is not None and args.mutant not in mutants.BY_NAME:
        return _err(f"unknown mutant {args.mutant!r} (see --mutants)")
    if args.address and not args.workers:
        return _err("--address needs --workers")
    if args.replay:
        return _replay(args)
    try:
        if args.races:
            chosen = races.select(args.races)
        elif args.mutant:
            chosen = [races.BY_ID[mutants.BY_NAME[args.mutant].race]]
        else:
            chosen = list(races.RACES)
    except KeyError as e:
        return _err(f"unknown race {e.args[0]!r} (see --list)")
    mapper = None
    if args.workers:
        if args.strategy != "pct":
            return _err("--workers fans out PCT schedules; use --strategy pct")
        from guestmem.explore import fanout

        try:
            mapper = fanout.RayMapper(args.workers, args.address)
        except fanout.RayMissing as e:
            return _err(str(e))
    try:
        return _explore(args, chosen, mapper)
    finally:
        if mapper is not None:
            mapper.close()


def _explore(args: argparse.Namespace, chosen: list[Any], mapper: Any) -> int:
    from guestmem.explore import artefacts
    from guestmem.explore import strategies as st

    seconds = args.seconds if args.seconds or args.schedules else 60.0
    reports = []
    status = 0
    trace_written = False
    for race in chosen:
        budget = st.Budget(args.schedules, seconds)
        if args.strategy == "dfs":
            rep = st.explore_dfs(race, args.mutant, args.preemptions, budget, args.skip_known)
        else:
            fn = None if mapper is None else mapper.bind(race, args.mutant, args.seed, args.depth,
                                                         st.estimate_length(race, args.mutant))
            rep = st.explore_pct(race, args.mutant, args.seed, args.depth, budget, fn,
                                 batch=1 if mapper is None else 4 * args.workers, skip_known=args.skip_known)
        doc: dict[str, Any] = rep.to_json()
        if rep.found is None:
            if not args.json:
                proof = (f"no violation with <= {rep.proved_bound} preemptions (exhaustive)"
                         if rep.proved_bound is not None else "no violation found")
                print(f"{race.id}: {rep.schedules} schedules in {rep.seconds:.1f} s, {proof}")
            reports.append(doc)
            continue
        status = 1
        small = st.shrink(race, args.mutant, rep.found)
        path = os.path.join(args.out, f"explore-{race.id.replace(':', '-')}"
                            + (f"-{args.mutant}" if args.mutant else "") + ".json")
        replay = artefacts.replay_doc(race.id, args.mutant, small, args.strategy)
        write_text(path, json.dumps(replay, indent=1) + "\n")
        again = st.replay(race, args.mutant, small.choices)
        diverged = artefacts.same_run(replay, again)
        doc.update(shrunk_preemptions=small.preemptions, replay_file=path,
                   replayed_identically=diverged is None, shrunk_violation=small.violation.to_json()
                   if small.violation else None)
        if args.trace and not trace_written:
            write_text(args.trace, artefacts.perfetto(race.id, args.mutant, small))
            trace_written = True
        if not args.json:
            v = small.violation
            assert v is not None
            print(f"{race.id}: VIOLATION after {rep.schedules} schedules ({rep.seconds:.1f} s): "
                  f"{v.kind}, {small.preemptions} preemption(s) after shrinking")
            print("\n".join(artefacts.interleaving(small)))
            print(f"replay file: {path} ({'replays identically' if diverged is None else diverged})")
        reports.append(doc)
    if args.trace and not trace_written and chosen:
        out = st.run_schedule(chosen[0], args.mutant, st.Follow([]))
        write_text(args.trace, artefacts.perfetto(chosen[0].id, args.mutant, out))
    if args.json:
        print(json.dumps(reports, indent=1))
    return status


def _replay(args: argparse.Namespace) -> int:
    from guestmem.explore import artefacts, races
    from guestmem.explore import strategies as st

    try:
        with open(args.replay, encoding="utf-8") as fh:
            doc = artefacts.load_replay(fh.read())
    except (OSError, ValueError) as e:
        return _err(f"cannot read replay file {args.replay}: {e}")
    race = races.BY_ID.get(doc["race"])
    if race is None:
        return _err(f"replay file names unknown race {doc['race']!r}")
    mutant = doc.get("mutant")
    from guestmem.explore import mutants

    if mutant is not None and mutant not in mutants.BY_NAME:
        return _err(f"replay file names unknown mutant {mutant!r}")
    out = st.replay(race, mutant, doc["choices"])
    diverged = artefacts.same_run(doc, out)
    if args.trace:
        write_text(args.trace, artefacts.perfetto(race.id, mutant, out))
    if args.json:
        print(json.dumps({"race": race.id, "mutant": mutant, "identical": diverged is None,
                          "divergence": diverged,
                          "violation": out.violation.to_json() if out.violation else None}, indent=1))
    else:
        print("\n".join(artefacts.interleaving(out)))
        print("replayed identically" if diverged is None else f"replay diverged: {diverged}")
    return 1 if out.violation is not None else 0
