"""The ``guestmem`` command: a thin argparse front end over library functions.

``guestmem caps [--json]`` shows what this host's KVM supports (:mod:`guestmem.linux.caps`);
``guestmem demo`` is the showcase (:func:`guestmem.report.commands.run_showcase` on the model and the
kernel, then :mod:`guestmem.linux.demo` step by step); ``run``/``map``/``report`` come from
:mod:`guestmem.report.commands`, ``compare`` from :mod:`guestmem.compare`, ``bench`` from
:mod:`guestmem.bench`.
Bad input prints one error line and exits with status 2, before any work starts: values are
checked as argparse reads them (:mod:`guestmem.cliargs`), a ``--device`` the user names must be the
KVM device and answer ``KVM_GET_API_VERSION`` (:func:`guestmem.linux.caps.check_device`), and a
command whose memory would not fit this host is refused up front (``--max-resident`` overrides).
Status 3 means the default ``/dev/kvm`` is simply not there (or not usable) for a command that
needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

import guestmem
from guestmem import cliargs

DEFAULT_DEVICE = "/dev/kvm"
MAX_DEMO_MIB = 1 << 20  # 1 TiB; the memory guard refuses far less on most hosts


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DeviceAfterToo(_Parser):
    """A subcommand's parser: ``--device`` and ``-v`` are accepted after the subcommand too
    (``guestmem caps --device /dev/kvm``), as users type them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--device", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          help=argparse.SUPPRESS)


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


def _error(cmd: str, message: str, code: int = 2) -> int:
    print(f"guestmem {cmd}: error: {message}", file=sys.stderr)
    return code


def _print_twin(report: dict[str, Any], console: Console) -> None:
    """``caps --twin``: host and twin side by side, then what the twin cannot match."""
    table = Table(title=f"this host ({report['host']['release']}) and its model twin "
                  f"(guestmem.open('model', like='host'))")
    table.add_column("property")
    table.add_column("host", justify="right")
    table.add_column("twin", justify="right")
    table.add_column("", justify="center")
    for row in report["rows"]:
        table.add_row(row["what"], str(row["host"]), str(row["twin"]), "=" if row["same"] else "[red]≠[/]")
    console.print(table)
    switches = ", ".join(f"{k}={v}" for k, v in report["twin_options"].items())
    console.print(f"twin switches: {switches}")
    console.print(f"matched {report['matched']} of {report['compared']}")
    for name, why in report["unmatched"].items():
        console.print(f"[bold]cannot match[/] {name}: {why}")


def _cmd_caps(args: argparse.Namespace, console: Console) -> int:
    from guestmem.linux.caps import probe

    if args.twin:
        from guestmem.errors import KvmError
        from guestmem.host_probe import twin_report

        try:
            report = twin_report(args.device, hypercall=not args.no_hypercall_probe)
        except KvmError as err:
            return _error("caps", f"{args.device} is not available: {err}", 3)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_twin(report, console)
        return 0
    info = probe(args.device, hypercall=not args.no_hypercall_probe)
    if args.json:
        print(json.dumps(info, indent=2))
    elif info.get("available"):
        _print_caps(info, console)
    if not info.get("available"):
        return _error("caps", f"{args.device} is not available: {info.get('error')}", 3)
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """The showcase: a CoCo memory lifecycle on the model (map before and after), the part this
    host supports run for real on /dev/kvm, then guest_memfd as real guest RAM step by step."""
    from guestmem.linux.demo import run_kernel_demo
    from guestmem.report.commands import SHOWCASE_MEMORY, run_showcase

    size = args.size << 20
    # The kernel steps hold the guest_memfd and the host's view of it; the showcase adds its model run.
    estimate = cliargs.BASE_RESIDENT + 2 * size + (0 if args.kernel_only else 2 * SHOWCASE_MEMORY)
    reason = cliargs.check_fits(estimate, args.max_resident, f"demo --memory {args.size}M")
    if reason:
        return _error("demo", reason)
    if args.kernel_only and not args.device_given:
        from guestmem.errors import KvmError
        from guestmem.linux.caps import check_device

        try:
            check_device(args.device)
        except KvmError as err:
            return _error("demo", f"{args.device} is not usable: {err}", 3)

    def kernel_steps(c: Console) -> dict[str, Any]:
        c.rule(f"[bold]for real, step by step: guest_memfd as guest RAM on {args.device}")
        return run_kernel_demo(c, size=size, path=args.device)

    result = (kernel_steps(console) if args.kernel_only
              else run_showcase(console, kernel_steps, device=args.device,
                                 model_options=dict(args.model) or None))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 1 if result.get("ok") is False else 0


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from guestmem.bench import run_all
    from guestmem.report.atomic import write_text
    from guestmem.report.benchtable import make_table

    with console.status("measuring (model, and /dev/kvm where available)..."):
        result = run_all(quick=args.quick, only=args.only)
    text = json.dumps(result, indent=2)
    if args.output:
        write_text(args.output, text + "\n")  # the directory was checked before the benchmark ran
    if args.json:
        print(text)
    else:
        Console(width=max(console.width, 140)).print(make_table(result))
    if args.output:
        console.print(f"wrote {args.output}")
    return 0


def _memory_mib(text: str) -> int:
    """``--memory SIZE`` as every subcommand takes it, in whole MiB for the demo."""
    size = cliargs.byte_size(4 << 20, MAX_DEMO_MIB << 20)(text)
    if size % (4 << 20):
        raise argparse.ArgumentTypeError(f"{text!r} must be a multiple of 4M")
    return size >> 20


# ``guestmem.bench.BENCH_NAMES``, repeated here so that parsing a command line does not import numpy
# (tests/test_bench_names.py keeps the two the same).
BENCH_NAMES = ("scaling", "model_vs_kernel", "conversion_throughput", "xts_engine", "private_write_peak_rss",
               "eagain_split_merge", "resident", "rangemap", "explore", "fault_and_convert",
               "conversion_storm", "trace_cost", "ioctl", "x86_cpu", "c_guest")


def _size_mib(text: str) -> int:
    value = cliargs.int_in(4, MAX_DEMO_MIB, "MiB")(text)
    if value % 4:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 MiB, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guestmem",
                     description="KVM guest_memfd: an executable model and a /dev/kvm backend",
                     epilog="exit status: 0 done, 1 the run failed (or was stopped at its memory bound), "
                     "2 bad input, 3 the host lacks what was asked for")
    parser.add_argument("--version", action="version", version=f"guestmem {guestmem.__version__}")
    device_help = (f"the KVM device (default: {DEFAULT_DEVICE}); it must be the KVM character device "
                   "and answer KVM_GET_API_VERSION")
    parser.add_argument("--device", help=device_help)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens (-v: steps, -vv: debug) on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_DeviceAfterToo)
    caps = sub.add_parser("caps", help="what this host's KVM supports")
    caps.add_argument("--json", action="store_true", help="print JSON instead of tables")
    caps.add_argument("--no-hypercall-probe", action="store_true",
                      help="skip running a guest to see whether KVM_HC_MAP_GPA_RANGE exits")
    caps.add_argument("--twin", action="store_true",
                      help="also open the model configured like this host and show both side by side")
    caps.set_defaults(func=_cmd_caps)
    demo = sub.add_parser("demo", help="guest_memfd as guest RAM, step by step, with timings")
    demo.add_argument("--memory", type=_memory_mib, dest="size", default=4, metavar="SIZE",
                      help="guest_memfd size for the real-kernel steps, e.g. 8M (a multiple of 4M; "
                      "default 4M)")
    demo.add_argument("--size", type=_size_mib, dest="size", metavar="MIB", help=argparse.SUPPRESS)
    demo.add_argument("--kernel-only", action="store_true",
                      help="only the real-kernel steps (skip the model showcase)")
    demo.add_argument("--json", action="store_true", help="also print the step timings as JSON")
    from guestmem.report.commands import model_switch

    demo.add_argument("--model", action="append", type=model_switch, metavar="NAME=VALUE", default=[],
                      help="a model switch for the showcase's model run (repeatable), e.g. tdp_mmu=false")
    cliargs.add_max_resident(demo)
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="measure the model (and the kernel) in one run; JSON out")
    bench.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    bench.add_argument("--only", action="append", metavar="NAME", choices=BENCH_NAMES,
                       help=f"run only this bench (repeatable): {', '.join(BENCH_NAMES)}")
    bench.add_argument("-o", "--output", metavar="FILE", type=cliargs.output_file,
                       help="also write the results as JSON here (its directory is checked first)")
    bench.add_argument("--json", action="store_true", help="print JSON on stdout instead of the table")
    bench.set_defaults(func=_cmd_bench)
    from guestmem.compare import register as register_compare
    from guestmem.explore.cli import register as register_explore
    from guestmem.report.commands import register as register_scenarios

    register_scenarios(sub)
    register_compare(sub)
    from guestmem.fuzz.cli import add_parser as register_fuzz

    register_fuzz(sub)
    register_explore(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="guestmem: %(name)s: %(message)s", stream=sys.stderr)
    args.device_given = args.device is not None
    if args.device is None:
        args.device = DEFAULT_DEVICE
    else:
        from guestmem.errors import KvmError
        from guestmem.linux.caps import check_device

        try:
            check_device(args.device)
        except KvmError as err:
            print(f"guestmem: error: --device {args.device!r} is not a usable KVM device: {err}; "
                  f"name the KVM character device (usually {DEFAULT_DEVICE})", file=sys.stderr)
            return 2
    console = Console(stderr=bool(getattr(args, "json", False)))
    return int(args.func(args, console))


if __name__ == "__main__":
    sys.exit(main())
