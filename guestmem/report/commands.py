"""``guestmem run``, ``guestmem map`` and ``guestmem report``, and the showcase ``guestmem demo`` calls.

``register(subparsers)`` adds the subcommands to the ``guestmem`` argparse parser; each sets
``func(args, console) -> int``.  Exit status: 0 the scenario ran and passed; 1 it ran and failed
(the summary says why); 2 bad input -- a malformed scenario, an impossible size, an unknown
flavour or backend, an output path that cannot be written -- reported as one line naming the
file, line and field where there is one; 3 the chosen backend cannot run the scenario (the line
names the missing capability).  Output files (``--trace``, ``--png``, ``--svg``, ``--pdf``, ``-o``,
``--html``) are checked before the run, written atomically after it, and never half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import guestmem
from guestmem import cliargs
from guestmem.errors import CapabilityMissing, KvmError, ModelSwitchOff
from guestmem.report.atomic import OutputError, check_writable, write_bytes, write_text
from guestmem.report.figures import (
    FigureOptions,
    figure_bytes,
    map_figure,
    map_subtitle,
    run_panels,
    run_title,
)
from guestmem.report.htmlreport import build_html
from guestmem.report.maps import kinds_table, render_terminal, terminal_colours
from guestmem.report.summary import summary_table
from guestmem.report.tracefile import trace_json
from guestmem.scenarios import ScenarioError, load, shipped
from guestmem.scenarios.plan import make_plan
from guestmem.scenarios.run import ScenarioReport, run_scenario
from guestmem.vmm.flavours import FLAVOURS, UnknownFlavour

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNSUPPORTED = 0, 1, 2, 3


KERNEL_QUICK_BYTES = 16 << 20  # below this a kernel-backend run takes under half a minute anyway
KERNEL_S_PER_MIB = 2.0


class BadInput(ValueError):
    """Command-line input that cannot work."""


_last_error: list[str] = []


def _fail(cmd: str, message: str, code: int) -> int:
    print(f"guestmem {cmd}: error: {message}", file=sys.stderr)
    _last_error[:] = [message]
    return code


def model_switch(text: str) -> tuple[str, Any]:
    """``--model NAME=VALUE``: one model switch, typed and checked as ``guestmem.open`` would."""
    from guestmem.model.options import ModelOptions

    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE, e.g. attributes=gmem")
    try:
        return name.strip(), ModelOptions.parse_text(name.strip(), value.strip())
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="model", metavar="NAME",
                   help=f"where to run it: {' or '.join(guestmem.BACKENDS)} (default: model)")
    p.add_argument("--flavour", metavar="NAME",
                   help=f"VM flavour ({', '.join(FLAVOURS)}); default: the scenario's first that works")
    p.add_argument("--vcpus", type=cliargs.int_in(1, 256, "vCPUs"), metavar="N",
                   help="number of vCPUs, 1..256 (default: the scenario's)")
    p.add_argument("--memory", type=cliargs.byte_size(0, (1 << 64) - 1), metavar="SIZE",
                   help="guest memory, e.g. 64M or 1G (default: the scenario's)")
    p.add_argument("--timeout", type=cliargs.seconds, metavar="SECONDS",
                   help="stop the run after this long (default: the scenario's, 600 s; at most a week)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--model", action="append", type=model_switch, metavar="NAME=VALUE", default=[],
                   help="a model switch (repeatable), e.g. attributes=gmem, gmem_folio_order=9, "
                   "inplace_revision=v8, tdp_mmu=false (see guestmem/model/options.py); it overrides "
                   "the scenario's [model] table")
    p.add_argument("--cpu", choices=("ops", "x86"), default=None,
                   help="the guest CPU on the model: ops (the op interpreter) or x86 (guest code on the "
                   "model's x86-64 CPU); default: the scenario's cpu (the kernel backend always runs x86)")
    cliargs.add_max_resident(p)


# Every option that names an output file, and the flag that names it in messages.
OUTPUTS = (("trace", "--trace"), ("html", "--html"), ("png", "--png"), ("svg", "--svg"), ("pdf", "--pdf"),
           ("output", "--output"))


def _add_figure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=cliargs.figure_size, metavar="WxH",
                   help="figure size in inches, e.g. 13.33x7.5 for a 16:9 slide (default: fitted to the map)")
    p.add_argument("--dpi", type=cliargs.dpi, metavar="N",
                   help=f"PNG resolution in dots per inch, {cliargs.MIN_DPI}..{cliargs.MAX_DPI} "
                        f"(default {FigureOptions().dpi})")
    p.add_argument("--format", type=cliargs.figure_format, metavar="FMT",
                   help="format of the -o file: png, svg or pdf (default: from its name)")


def register(subparsers: Any) -> None:
    """Add ``run``, ``map`` and ``report`` to the ``guestmem`` command's subparsers."""
    run = subparsers.add_parser(
        "run", help="run a scenario: a confidential VM's memory lifecycle",
        description="Run a shipped scenario (by name) or a scenario TOML file, on the model or the "
                    f"kernel. Shipped: {', '.join(shipped())}.")
    run.add_argument("scenario", nargs="?", metavar="NAME|FILE", help="scenario name or path to a .toml")
    run.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    _add_common(run)
    run.add_argument("--trace", metavar="FILE", type=cliargs.output_file,
                     help="write a Chrome/Perfetto trace (open it in ui.perfetto.dev)")
    run.add_argument("--html", metavar="FILE", type=cliargs.output_file,
                     help="also write the self-contained HTML report (maps per phase, charts, summary)")
    run.set_defaults(func=cmd_run)
    mp = subparsers.add_parser(
        "map", help="run a scenario and draw the guest physical map",
        description="Run a scenario, then draw guest physical memory per 2 MiB: private, shared, "
                    "double-backed or unallocated, and the guest's mapping level where visible.")
    mp.add_argument("scenario", metavar="NAME|FILE", help="scenario name or path to a .toml")
    _add_common(mp)
    mp.add_argument("--png", metavar="FILE", type=cliargs.output_file, help="also write the map as PNG")
    mp.add_argument("--svg", metavar="FILE", type=cliargs.output_file, help="also write the map as SVG")
    mp.add_argument("--pdf", metavar="FILE", type=cliargs.output_file, help="also write the map as PDF")
    mp.add_argument("-o", "--output", metavar="FILE", type=cliargs.output_file,
                    help="also write the map to FILE, in --format or the format its name ends in")
    _add_figure_options(mp)
    mp.add_argument("--before", action="store_true", help="also draw the map before the run, beside it")
    mp.add_argument("--phases", action="store_true",
                    help="draw the map before the run and after every phase, side by side")
    mp.set_defaults(func=cmd_map)
    rp = subparsers.add_parser(
        "report", help="run a scenario and write one self-contained HTML report",
        description="Run a scenario and write one HTML file that needs no network: the summary, the "
                    "guest physical map after every phase (with a slider), resident memory and "
                    "conversions over time, exits per vCPU.")
    rp.add_argument("scenario", metavar="NAME|FILE", help="scenario name or path to a .toml")
    _add_common(rp)
    rp.add_argument("-o", "--output", metavar="FILE", type=cliargs.output_file, required=True,
                    help="the HTML file to write")
    rp.set_defaults(func=cmd_report)


@contextlib.contextmanager
def _progress(console: Console, label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as prog:
        task = prog.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def _run_from_args(args: argparse.Namespace, console: Console, *, snapshots: bool) -> ScenarioReport:
    """Load, check and run (raises the exceptions the commands turn into exit codes)."""
    if args.backend not in guestmem.BACKENDS:
        raise BadInput(f"--backend: unknown backend {args.backend!r}; choose one of "
                       f"{', '.join(guestmem.BACKENDS)}")
    if args.flavour is not None and args.flavour not in FLAVOURS:
        raise UnknownFlavour(args.flavour)
    memory = args.memory
    seen: dict[Path, str] = {}
    for opt, flag in OUTPUTS:
        path = getattr(args, opt, None)
        if not path:
            continue
        try:
            check_writable(path)  # argparse checked it too; this keeps library callers safe
        except OutputError as exc:
            raise BadInput(f"{flag}: {exc}") from None
        key = Path(path).resolve()
        if key in seen:
            raise BadInput(f"{seen[key]} and {flag} name the same file; give each its own")
        seen[key] = flag
    if getattr(args, "output", None) and hasattr(args, "format"):
        try:
            cliargs.format_for(args.output, args.format)
        except ValueError as exc:
            raise BadInput(f"--output: {exc}") from None
    # Before the run: the figure's pixels (a fitted map is at most about a 16x9 inch slide).
    too_big = cliargs.check_pixels(getattr(args, "size", None) or (16.0, 9.0),
                                   getattr(args, "dpi", None) or FigureOptions().dpi)
    if too_big:
        raise BadInput(too_big)
    scn = load(args.scenario)
    plan = make_plan(scn, vcpus=args.vcpus, memory=memory)
    # The memory guard: every guest page populated on both sides (discard off, double backing) plus
    # slack is the most a run can hold, whatever the backend; the model's cost per page is close to
    # the page itself (measured: boot at 1G holds ~1.1 GiB).
    estimate = cliargs.BASE_RESIDENT + 2 * (plan.memory + scn.vmm.slack.absolute)
    reason = cliargs.check_fits(estimate, args.max_resident,
                                f"{scn.name} with {plan.memory >> 20} MiB of memory")
    if reason:
        raise BadInput(reason)
    limit = cliargs.resident_limit(args.max_resident)
    if args.backend == "kernel" and plan.memory > KERNEL_QUICK_BYTES:
        # This host's KVM runs guest code in its instruction emulator: about 2 s per MiB of guest
        # memory the scenario walks (measured: balloon at 64M took about 2 minutes).
        eta = plan.memory / (1 << 20) * KERNEL_S_PER_MIB
        console.print(f"[yellow]note:[/] the kernel backend on a host that emulates guest instructions "
                      f"takes about {eta / 60:.0f} min for {plan.memory >> 20} MiB (about "
                      f"{KERNEL_S_PER_MIB:g} s per MiB); use --memory to run less")
    with _progress(console, f"{scn.name} on {args.backend}", not args.json) as progress:
        return run_scenario(scn, backend=args.backend, flavour=args.flavour, vcpus=args.vcpus,
                            memory=memory, progress=progress, snapshots=snapshots,
                            timeout_s=args.timeout, device=getattr(args, "device", None),
                            max_resident=limit, model=dict(getattr(args, "model", None) or []) or None,
                            trace=snapshots or bool(getattr(args, "trace", None)),
                            cpu=getattr(args, "cpu", None))


def _stopped_at_bound(cmd: str, report: ScenarioReport) -> int | None:
    """A run stopped by the resident bound ends with one line and exit 1, and writes no files."""
    if report.extra.get("resident_limit"):
        return _fail(cmd, f"{report.scenario} stopped: {report.extra['resident_limit']}; use "
                     "--max-resident SIZE to allow more, or less --memory", EXIT_FAILED)
    return None


def _guarded(cmd: str, args: argparse.Namespace, fn: Callable[[], int]) -> int:
    """Run a command; whatever ends it early is one line on stderr and an exit status, and with
    ``--json`` also a JSON object on stdout (so a script reading stdout always gets JSON)."""
    code = _guarded_inner(cmd, args, fn)
    if code and getattr(args, "json", False) and not getattr(args, "_json_printed", False):
        print(json.dumps({"ok": False, "command": cmd, "exit_status": code,
                          "error": _last_error[0] if _last_error else None}))
    return code


def _guarded_inner(cmd: str, args: argparse.Namespace, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (ScenarioError, UnknownFlavour, BadInput, OutputError, ModelSwitchOff) as exc:
        return _fail(cmd, str(exc), EXIT_BAD_INPUT)
    except CapabilityMissing as exc:
        name = getattr(args, "scenario", None) or "the scenario"
        return _fail(cmd, f"{name} cannot run on the {args.backend} backend: {exc}", EXIT_UNSUPPORTED)
    except KvmError as exc:  # building the machine: the backend refused what the scenario asks for
        name = getattr(args, "scenario", None) or "the scenario"
        return _fail(cmd, f"the {args.backend} backend refused to set up {name}: {exc}", EXIT_BAD_INPUT)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    if args.list and args.scenario:
        return _fail("run", "--list takes no scenario; give one or the other", EXIT_BAD_INPUT)
    if args.list:
        return _list(console, args.json)
    if not args.scenario:
        return _fail("run", f"name a scenario ({', '.join(shipped())}) or a .toml file; see --list",
                     EXIT_BAD_INPUT)

    def go() -> int:
        report = _run_from_args(args, console, snapshots=bool(args.html))
        stopped = _stopped_at_bound("run", report)
        if stopped is not None:
            return stopped
        if args.trace:
            write_text(args.trace, trace_json(report.trace, process=f"guestmem {report.scenario} "
                                              f"({report.backend}, {report.flavour})",
                                              meta=_trace_meta(report)))
        if args.html:
            write_text(args.html, build_html(report))
        files = {k: getattr(args, k) for k in ("trace", "html") if getattr(args, k)}
        if args.json:
            args._json_printed = True
            print(json.dumps(report.summary() | files, indent=2))
        else:
            console.print(summary_table(report))
            if args.trace:
                console.print(f"trace written to {args.trace} ({len(report.trace)} events; open it in "
                              "https://ui.perfetto.dev)")
            if args.html:
                console.print(f"HTML report written to {args.html} (self-contained; open it in a browser)")
        return EXIT_OK if report.ok else EXIT_FAILED

    return _guarded("run", args, go)


def _figure_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(path, format) of every figure the ``map`` command was asked to write."""
    files = [(getattr(args, fmt), fmt) for fmt in cliargs.FIGURE_FORMATS if getattr(args, fmt, None)]
    if args.output:
        files.append((args.output, cliargs.format_for(args.output, args.format)))
    return files


def cmd_map(args: argparse.Namespace, console: Console) -> int:
    def go() -> int:
        report = _run_from_args(args, console, snapshots=True)
        stopped = _stopped_at_bound("map", report)
        if stopped is not None:
            return stopped
        after = report.after
        assert after is not None
        panels = run_panels(report, before=args.before, phases=args.phases)
        files = _figure_files(args)
        if files:
            options = FigureOptions(size=args.size, dpi=args.dpi or FigureOptions().dpi)
            fig = map_figure(panels, title=run_title(report),
                             subtitle=map_subtitle([s for _, s in panels], report.memory), options=options)
            for path, fmt in files:
                write_bytes(path, figure_bytes(fig, fmt))
        if args.json:
            out: dict[str, Any] = {"scenario": report.scenario, "backend": report.backend,
                                   "flavour": report.flavour, "ok": report.ok, "error": report.error,
                                   "wall_s": round(report.wall_s, 6), "map": after.as_dict()}
            if args.before and report.before is not None:
                out["before"] = report.before.as_dict()
            if args.phases:
                out["phases"] = [s.as_dict() for s in report.phase_maps]
            out["files"] = {k: getattr(args, k) for k in ("png", "svg", "pdf", "output") if getattr(args, k)}
            args._json_printed = True
            print(json.dumps(out, indent=2))
        else:
            colours = terminal_colours(console)
            for _, snap in panels:
                console.print(render_terminal(snap, colours))
            if report.error:
                console.print(f"[red]the run failed:[/] {report.error}")
            for path, fmt in files:
                console.print(f"{fmt.upper()} written to {path}")
        return EXIT_OK if report.ok else EXIT_FAILED

    return _guarded("map", args, go)


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """``guestmem report``: run with snapshots, write the HTML page, print the summary."""
    def go() -> int:
        report = _run_from_args(args, console, snapshots=True)
        stopped = _stopped_at_bound("report", report)
        if stopped is not None:
            return stopped
        write_text(args.output, build_html(report))
        if args.json:
            args._json_printed = True
            print(json.dumps(report.summary() | {"html": args.output}, indent=2))
        else:
            console.print(summary_table(report))
            console.print(f"HTML report written to {args.output} (self-contained; open it in a browser)")
        return EXIT_OK if report.ok else EXIT_FAILED

    return _guarded("report", args, go)


def _list(console: Console, as_json: bool = False) -> int:
    if as_json:
        print(json.dumps([{"name": n, "flavours": list(load(n).flavours), "description": load(n).description,
                           "requires": list(load(n).requires)} for n in shipped()], indent=2))
        return EXIT_OK
    table = Table(title="shipped scenarios", show_edge=False)
    table.add_column("name", style="bold")
    table.add_column("flavours")
    table.add_column("description")
    for name in shipped():
        scn = load(name)
        table.add_row(name, ", ".join(scn.flavours), scn.description)
    console.print(table)
    return EXIT_OK


def _trace_meta(report: ScenarioReport) -> dict[str, Any]:
    return {"scenario": report.scenario, "backend": report.backend, "flavour": report.flavour,
            "ok": report.ok, "vcpus": report.vcpus, "memory": report.memory}


# --- the showcase ------------------------------------------------------------------------------------

SHOWCASE_MEMORY = 64 << 20
KERNEL_PART = ("balloon", 8 << 20, 1)  # scenario, memory, vCPUs: the part this host can run for real


C_GUEST_PART = ("c-guest-snp", 8 << 20)  # the C guest on the model's x86 CPU: scenario, memory


def _c_guest_step(console: Console) -> dict[str, Any]:
    """The freestanding C guest as an SNP-like guest on the model's x86 CPU: its map after the
    device round trips (the bounce page shared), and what it reported.  Skipped (said so) when gcc
    is missing (or the model cannot run it)."""
    console.rule("[bold]a guest written in C runs on the model's x86 CPU (SNP-like)")
    console.print("Compiled with gcc, it finds its C-bit in CPUID, builds its own page tables, PVALIDATEs "
                  "each data page on first use, shares one page with a device (GHCB page-state change), "
                  "and takes it back.")
    try:
        name, memory = C_GUEST_PART
        report = run_scenario(load(name), backend="model", memory=memory, snapshots=True)
    except CapabilityMissing as exc:  # no gcc to build the guest
        console.print(f"[yellow]skipped:[/] {exc}")
        return {"skipped": str(exc)}
    shared = [m for m in report.phase_maps if m.title.endswith(": device")]
    if shared:
        console.print(render_terminal(shared[0], terminal_colours(console)))
    console.print(summary_table(report))
    return {"ok": report.ok, **report.summary()}


def run_showcase(console: Console, more: Callable[[Console], dict[str, Any]] | None = None, *,
                 device: str | None = None, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A short CoCo memory lifecycle on the model, with the guest physical map before and after,
    then the part of it the host kernel supports, run for real; returns both summaries.  ``more``
    (e.g. the step-by-step real-kernel demo) runs before the closing pointers; its result is
    kept under ``"more"``.  ``device`` is the KVM device of the real part (default /dev/kvm)."""
    console.rule("[bold]a confidential VM boots (model)")
    console.print("A software-protected VM with 64 MiB in a low and a high region boots: firmware shares "
                  "the PCI hole (MMIO, ignored), each vCPU accepts half its memory lazily, the host "
                  "converts and pre-faults the rest.")
    model = run_scenario(load("boot"), backend="model", memory=SHOWCASE_MEMORY, snapshots=True,
                         model=model_options)
    assert model.before is not None and model.after is not None
    console.print(render_terminal(model.before, terminal_colours(console)))
    console.print(render_terminal(model.after, terminal_colours(console)))
    console.print(kinds_table(model.before, model.after))
    console.print(summary_table(model))
    result: dict[str, Any] = {"ok": model.ok, "model": model.summary()}

    name, memory, vcpus = KERNEL_PART
    console.rule(f"[bold]for real: {name} on this host's {device or '/dev/kvm'}")
    try:
        kernel = run_scenario(load(name), backend="kernel", memory=memory, vcpus=vcpus, device=device)
    except CapabilityMissing as exc:
        console.print(f"[yellow]skipped:[/] the kernel backend cannot run it here: {exc}")
        result["kernel"] = {"skipped": str(exc)}
    else:
        console.print(summary_table(kernel))
        result["kernel"] = kernel.summary()
        result["ok"] = result["ok"] and kernel.ok

    result["c_guest"] = _c_guest_step(console)
    if result["c_guest"].get("ok") is False:
        result["ok"] = False

    if more is not None:
        extra = more(console)
        result["more"] = extra
        if extra.get("ok") is False:
            result["ok"] = False

    console.rule("[bold]next")
    for line in (
        "guestmem run --list                                  the shipped scenarios",
        "guestmem run conversion-storm --trace storm.json     then open storm.json in ui.perfetto.dev",
        "guestmem map selftest-conversions --png map.png      double-backed memory when discard is off",
        "guestmem run boot --flavour snp                      lazy accept through memory-fault exits",
        "guestmem run bounce-io --backend kernel              the shared-only subset on /dev/kvm",
        "guestmem run c-guest-tdx                             the C guest as a TDX-like guest",
        "guestmem run c-guest-snp --backend kernel            its shared subset on /dev/kvm",
    ):
        console.print(f"  {line}")
    return result
