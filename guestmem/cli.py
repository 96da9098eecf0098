"""The ``guestmem`` command: a thin argparse front end over library functions.

``guestmem caps [--json]`` shows what this host's KVM supports (:mod:`guestmem.linux.caps`);
``guestmem demo`` is the showcase (:func:`guestmem.report.commands.run_showcase` on the model and the
kernel, then :mod:`guestmem.linux.demo` step by step); ``run``/``map`` come from
:mod:`guestmem.report.commands`, ``compare`` from :mod:`guestmem.compare`, ``bench`` from
:mod:`guestmem.bench`.
Bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _print_caps(info: dict[str, Any], console: Console) -> None:
    if not info.get("available"):
        console.print(f"[yellow]{info['device']} is not available:[/] {info.get('error')}")
        return
    head = Table(title=f"KVM on this host ({info['device']})", show_header=False)
    head.add_row("kernel", info["kernel_release"])
    head.add_row("modules", ", ".join(info["kvm_modules"]) or "-")
    head.add_row("API version", str(info["api_version"]))
    head.add_row("CPU vendor", info.get("cpu_vendor") or "-")
    console.print(head)

    caps = Table(title="capabilities (KVM_CHECK_EXTENSION)")
    caps.add_column("capability")
    caps.add_column("#", justify="right")
    caps.add_column("/dev/kvm", justify="right")
    caps.add_column("DEFAULT VM", justify="right")
    for c in info["capabilities"]:
        caps.add_row(c["name"], str(c["cap"]), str(c["system"]), str(c["vm"]))
    console.print(caps)

    vt = info["vm_types"]
    supported = ", ".join(vt["supported"]) or "none"
    types = Table(title=f"VM types (KVM_CAP_VM_TYPES = {vt['cap']:#x}: {supported})")
    types.add_column("type")
    types.add_column("KVM_CREATE_VM")
    for name, res in vt["create"].items():
        types.add_row(name, "[green]ok[/]" if res == "ok" else f"[red]{res}[/]")
    console.print(types)

    feats = Table(title="guest memory features")
    feats.add_column("feature")
    feats.add_column("result")
    gf = info["guest_memfd_flags"]
    feats.add_row("guest_memfd flags (KVM_CAP_GUEST_MEMFD_FLAGS)",
                  f"{gf['vm']:#x}: {' | '.join(gf['decoded']) or 'none'}")
    for key in ("set_memory_attributes", "set_memory_attributes2", "pre_fault_memory"):
        res = info[key]["result"]
        feats.add_row(info[key]["call"], "[green]ok[/]" if res == "ok" else f"[red]{res}[/]")
    hc = info.get("hypercall_exit")
    if hc is not None:
        feats.add_row("KVM_HC_MAP_GPA_RANGE exits to userspace (guest runs "
                      f"{hc.get('instruction') or 'the hypercall'})",
                      "[green]ok[/]" if hc["exits"] else f"[red]{hc['result']}[/]")
    console.print(feats)


def _cmd_caps(args: argparse.Namespace, console: Console) -> int:
    from guestmem.linux.caps import probe

    info = probe(args.device, hypercall=not args.no_hypercall_probe)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_caps(info, console)
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """The showcase: a CoCo memory lifecycle on the model (map before and after), the part this
    host supports run for real on /dev/kvm, then guest_memfd as real guest RAM step by step."""
    from guestmem.linux.demo import run_kernel_demo
    from guestmem.report.commands import run_showcase

    def kernel_steps(c: Console) -> dict[str, Any]:
        c.rule("[bold]for real, step by step: guest_memfd as guest RAM on /dev/kvm")
        return run_kernel_demo(c, size=args.size << 20, path=args.device)

    result = kernel_steps(console) if args.kernel_only else run_showcase(console, kernel_steps)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 1 if result.get("ok") is False else 0


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from guestmem.bench import run_all
    from guestmem.report.atomic import write_text

    with console.status("measuring (model, and /dev/kvm where available)..."):
        result = run_all(quick=args.quick)
    text = json.dumps(result, indent=2)
    if args.output:
        write_text(args.output, text + "\n")
        console.print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _size_mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if value < 4 or value % 4:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 MiB, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guestmem",
                     description="KVM guest_memfd: an executable model and a /dev/kvm backend")
    parser.add_argument("--device", default="/dev/kvm", help="the KVM device (default: /dev/kvm)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    caps = sub.add_parser("caps", help="what this host's KVM supports")
    caps.add_argument("--json", action="store_true", help="print JSON instead of tables")
    caps.add_argument("--no-hypercall-probe", action="store_true",
                      help="skip running a guest to see whether KVM_HC_MAP_GPA_RANGE exits")
    caps.set_defaults(func=_cmd_caps)
    demo = sub.add_parser("demo", help="guest_memfd as guest RAM, step by step, with timings")
    demo.add_argument("--size", type=_size_mib, default=4, metavar="MIB",
                      help="guest_memfd size in MiB for the real-kernel steps (multiple of 4; default 4)")
    demo.add_argument("--kernel-only", action="store_true",
                      help="only the real-kernel steps (skip the model showcase)")
    demo.add_argument("--json", action="store_true", help="also print the step timings as JSON")
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="measure the model (and the kernel) in one run; JSON out")
    bench.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    bench.add_argument("-o", "--output", metavar="FILE", help="write the JSON here instead of stdout")
    bench.set_defaults(func=_cmd_bench)
    from guestmem.compare import register as register_compare
    from guestmem.explore.cli import register as register_explore
    from guestmem.report.commands import register as register_scenarios

    register_scenarios(sub)
    register_compare(sub)
    register_explore(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    console = Console(stderr=bool(getattr(args, "json", False)))
    return int(args.func(args, console))


if __name__ == "__main__":
    sys.exit(main())
