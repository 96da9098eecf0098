"""``guestmem compare [WORKLOAD]``: one guest workload under the five designs, side by side.

Why it exists: the seed threads argue about double allocation (seed 001's reply), invalidation per
page versus per folio and the 2 MiB direct map (seed 000's reply), and the posting history says
which design replaced which; this command runs the same guest under v7 (memfile_notifier), v8
(inaccessible memfd), v9 (memfd_restricted), guest_memfd (v14, Linux 6.8+) and in-place
conversion (seed 004) on the model, and prints what each one cost.  Every number is read from the
model's counters during that run (:mod:`guestmem.model.designs.workloads`); the guest program and
what the guest sees are the same for every design, which the run checks.

``run_compare`` is the library entry point; ``register(subparsers)`` adds the subcommand to an
argparse parser (``guestmem.cli`` wires it in); ``python -m guestmem.compare`` runs it standalone.
Output: a rich table (with a caption saying what each row and column is), ``--png/--svg/--pdf
FILE`` (a chart drawn with matplotlib, ``--size`` and ``--dpi`` for slides) and ``--json`` (one
object per design).  Bad input: one error line, status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from guestmem import cliargs
from guestmem.model.designs.harness import DESIGNS, REPLY_DESIGN, Design
from guestmem.model.designs.workloads import DEFAULT_RAM, FLAVOURS, MIN_RAM, PHASES, SUMMARIES, run
from guestmem.report.atomic import OutputError, check_writable, write_bytes

MiB = 1 << 20
DEFAULT_WORKLOAD = "all"

# What each row is: who owns the private file, how the memslot names it, who tracks shared/private,
# when KVM hears about invalidation.
ROW_CAPTIONS: dict[str, str] = {
    "memfile_notifier": "seed 001: the VMM's memfds in one KVM_MEM_PRIVATE slot, private MFD_INACCESSIBLE "
                        "(private_fd) and shared sealed F_SEAL_AUTO_ALLOCATE (hva); KVM tracks private "
                        "(ENCRYPT_REG_REGION); shmem invalidates per folio, a range without order",
    "inaccessible_memfd": "seed 002: memfd_create(MFD_INACCESSIBLE), a shim over tmpfs; same slot and "
                          "REG_REGION; one invalidate per fallocate, after it",
    "restrictedmem": "seed 000: memfd_restricted(), the shim as a syscall (restricted_fd); "
                     "invalidate_start/end around each fallocate, a range without order",
    "restrictedmem_folio": "seed 000's reply: v9 invalidating once per folio, with its order",
    "guest_memfd": "Linux 6.8+: guest_memfd created by KVM, bound to the VM; SET_MEMORY_ATTRIBUTES; pages "
                   "released per folio",
    "in_place": "seed 004: one mmap-able guest_memfd for both kinds; SET_MEMORY_ATTRIBUTES2 converts in "
                "place",
}

# The columns: (JSON key(s), header, what it shows).
COLUMNS: list[tuple[tuple[str, ...], str, str]] = [
    (("peak_frames",), "peak", "4 KiB frames allocated at the peak"),
    (("final_frames",), "final", "... at the end"),
    (("double_frames_peak", "double_frames_final"), "double", "pages with both a shared and a private copy "
     "(peak/end)"),
    (("invalidations",), "inval", "invalidation calls from the private file into KVM"),
    (("conversions",), "conv", "conversions that changed state"),
    (("zaps",), "zaps", "SPTE zaps"),
    (("hugepage_mappings",), "2M\nkept", "hugepage mappings at the end"),
    (("directmap_splits",), "DM\nsplit", "SEV-SNP 2 MiB direct-map splits"),
    (("directmap_restores",), "DM\nrest", "... and restores (need a whole 2 MiB folio with its order)"),
    (("stale_pages",), "stale", "pages freed while still mapped"),
    (("wall_s",), "sec", "run time"),
]
MAX_CHANGES = 5  # numbers listed per transition

# Why upstream moved from each design to the next (history), and the column that shows it; the
# numbers printed after it are measured in the run.
TRANSITIONS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("memfile_notifier", "inaccessible_memfd"): ("shmem left alone: a shim over tmpfs and no new seal",
                                                 ("inval", "double")),
    ("inaccessible_memfd", "restrictedmem"): ("invalidate before the pages are freed", ("stale",)),
    ("restrictedmem", "restrictedmem_folio"): ("invalidate per folio, with its order", ("DM rest",)),
    ("restrictedmem", "guest_memfd"): ("KVM owns the file; pages released per folio", ("DM rest",)),
    ("restrictedmem_folio", "guest_memfd"): ("KVM owns the file; one call per punch", ("inval",)),
    ("guest_memfd", "in_place"): ("one copy of guest memory", ("double", "2M kept")),
}


def run_compare(workload: str = DEFAULT_WORKLOAD, *, ram: int = DEFAULT_RAM, flavour: str = "snp",
                rounds: int = 8, reply: bool = False, check: bool = True,
                model: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``workload`` under each design; one metrics dict per design, in design order.

    ``reply`` adds v9 with the reply's per-folio invalidation after v9.  Raises ``ValueError`` for
    bad arguments and ``RuntimeError`` if the designs disagree on what the guest saw.
    """
    if workload not in PHASES:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(PHASES)}")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    designs: list[type[Design]] = list(DESIGNS)
    if reply:
        designs.insert(designs.index(DESIGNS[2]) + 1, REPLY_DESIGN)
    rows, seen = [], None
    for d in designs:
        result = run(d, workload, ram=ram, flavour=flavour, rounds=rounds, check=check, model=model)
        guest = (result.digest, tuple(result.trace))
        if seen is not None and guest != seen[1]:
            raise RuntimeError(f"{d.key} and {seen[0]} disagree on what the guest saw")
        seen = seen or (d.key, guest)
        rows.append(result.metrics)
    return rows


# --- presentation -------------------------------------------------------------------------------------

def _cell(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    if keys == ("wall_s",):
        return f"{row['wall_s']:.2f}"
    return "/".join(str(row[k]) for k in keys)


def transition_lines(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """For each design and the next: why upstream moved on, then the numbers that changed
    (the transition's own column first)."""
    out = []
    for a, b in itertools.pairwise(rows):
        why, headline = TRANSITIONS.get((a["design"], b["design"]), ("", ()))
        changed = [(name, f"{name} {_cell(a, keys)} -> {_cell(b, keys)}")
                   for keys, header, _ in COLUMNS if keys != ("wall_s",) and _cell(a, keys) != _cell(b, keys)
                   for name in [header.replace("\n", " ")]]
        changed.sort(key=lambda c: (c[0] not in headline, headline.index(c[0]) if c[0] in headline else 0))
        more = f"; +{len(changed) - MAX_CHANGES} more" if len(changed) > MAX_CHANGES else ""
        numbers = "; ".join(text for _, text in changed[:MAX_CHANGES]) + more or "no difference here"
        out.append((f"{a['label']} -> {b['label']}", f"{why}. {numbers}" if why else numbers))
    return out


def make_table(rows: list[dict[str, Any]]) -> Table:
    first = rows[0]
    ram = first["ram_bytes"]
    flavour = {"snp": "SEV-SNP-like", "sw": "software-protected"}[first["flavour"]]
    title = (f"guestmem compare {first['workload']}: {SUMMARIES[first['workload']]}\n"
             f"{flavour} VM, {ram // MiB} MiB guest RAM = {ram // 4096} frames, 2 MiB private folios")
    table = Table(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
                  padding=0, show_edge=False,
                  caption=f"Every number is measured in this run. The guest's view (trace and memory digest "
                          f"{first['guest_digest'][:12]}) was identical under every design.")
    table.add_column("design", no_wrap=True)
    for keys, header, _ in COLUMNS:
        width = max(*(len(_cell(r, keys)) for r in rows), *(len(line) for line in header.split("\n")))
        table.add_column(header, justify="right", no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(row["label"], *(_cell(row, keys) for keys, _, _ in COLUMNS))
    return table


def make_legend(rows: list[dict[str, Any]]) -> Group:
    """What each row and column shows, and why upstream moved from each design to the next."""
    def grid(title: str, items: list[tuple[str, str]]) -> Table:
        g = Table.grid(padding=(0, 1))
        g.title, g.title_justify, g.title_style = title, "left", "bold"
        g.add_column(no_wrap=True, style="cyan")
        g.add_column()
        for key, text in items:
            g.add_row(key, text)
        return g

    columns = Text.assemble(("Columns: ", "bold"), "; ".join(
        f"{header.replace(chr(10), ' ')} = {what}" for _, header, what in COLUMNS) + ".")
    return Group(
        grid("What each row is", [(r["label"], ROW_CAPTIONS[r["design"]]) for r in rows]),
        columns,
        grid("Why upstream moved on, and what changed in this run", transition_lines(rows)),
    )


def chart_title(rows: list[dict[str, Any]]) -> str:
    """What the chart shows: workload, flavour, guest size (the same words as the table's title)."""
    first = rows[0]
    flavour = {"snp": "SEV-SNP-like", "sw": "software-protected"}[first["flavour"]]
    return (f"guestmem compare {first['workload']}: {SUMMARIES[first['workload']]}\n{flavour} VM on the "
            f"model, {first['ram_bytes'] // MiB} MiB guest RAM; every bar measured in this run")


def chart_bytes(rows: list[dict[str, Any]], fmt: str, *, size: tuple[float, float] | None = None,
                dpi: int | None = None) -> bytes:
    """The chart (one panel per measured column, one bar per design) as PNG, SVG or PDF bytes."""
    from guestmem.report.figures import FigureOptions, compare_figure, figure_bytes

    options = FigureOptions(size=size, dpi=dpi or FigureOptions().dpi)
    return figure_bytes(compare_figure(rows, title=chart_title(rows), options=options), fmt)


def write_png(rows: list[dict[str, Any]], path: str) -> None:
    """The chart as a PNG file, written atomically (kept for library callers)."""
    write_bytes(path, chart_bytes(rows, "png"))


# --- the command ----------------------------------------------------------------------------------------

MAX_RAM = 1 << 40  # what a scenario may use too; the memory guard refuses far less on most hosts


def _ram_mib(text: str) -> int:
    value = cliargs.int_in(MIN_RAM // MiB, MAX_RAM // MiB, "MiB")(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"guest RAM must be an even number of MiB >= {MIN_RAM // MiB} "
                                         f"(got {value})")
    return value


def _rounds(text: str) -> int:
    return cliargs.int_in(1, 64, "rounds")(text)


def _memory_mib(text: str) -> int:
    """``--memory SIZE`` (the vocabulary of every other subcommand), as whole MiB for the runner."""
    size = cliargs.byte_size(MIN_RAM, 1 << 40)(text)
    if size % (2 * MiB):
        raise argparse.ArgumentTypeError(f"{text!r} must be a multiple of 2M")
    return _ram_mib(str(size // MiB))


_FLAVOUR_NAMES = {"sw-protected": "sw", "sw": "sw", "snp": "snp"}


def _flavour(text: str) -> str:
    """The flavour names ``run``/``map`` use (``sw-protected``); ``sw`` is kept as an alias."""
    if text not in _FLAVOUR_NAMES:
        raise argparse.ArgumentTypeError(f"unknown flavour {text!r}; compare runs sw-protected or snp")
    return _FLAVOUR_NAMES[text]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", nargs="?", default=DEFAULT_WORKLOAD, choices=list(PHASES),
                        help="what the guest does (default: all = boot, bounce-io and balloon in one guest)")
    parser.add_argument("--memory", type=_memory_mib, dest="ram", default=DEFAULT_RAM // MiB, metavar="SIZE",
                        help=f"guest RAM, e.g. 64M (a multiple of 2M, >= {MIN_RAM // MiB}M; "
                        f"default {DEFAULT_RAM // MiB}M)")
    parser.add_argument("--ram", type=_ram_mib, dest="ram", metavar="MIB", help=argparse.SUPPRESS)
    parser.add_argument("--flavour", type=_flavour, default="snp", metavar="NAME",
                        help="VM flavour: snp (SEV-SNP-like, default) or sw-protected")
    parser.add_argument("--rounds", type=_rounds, default=8, help="bounce-buffer I/O rounds (default 8)")
    from guestmem.report.commands import model_switch

    parser.add_argument("--model", action="append", type=model_switch, metavar="NAME=VALUE", default=[],
                        help="a model switch for every design's host (repeatable), e.g. gmem_folio_order=0; "
                        "the switches a design itself needs win")
    parser.add_argument("--reply", action="store_true",
                        help="add v9 with seed 000's reply (per-folio invalidation with order) as a row")
    for fmt in cliargs.FIGURE_FORMATS:
        parser.add_argument(f"--{fmt}", metavar="FILE", type=cliargs.output_file,
                            help=f"also draw the numbers as a chart ({fmt.upper()}; its directory is checked "
                                 "first)")
    parser.add_argument("--size", type=cliargs.figure_size, metavar="WxH",
                        help="chart size in inches, e.g. 13.33x7.5 for a 16:9 slide (default 14 wide)")
    parser.add_argument("--dpi", type=cliargs.dpi, metavar="N",
                        help=f"PNG resolution, {cliargs.MIN_DPI}..{cliargs.MAX_DPI} dots per inch "
                             "(default 150)")
    parser.add_argument("--json", action="store_true",
                        help="print the numbers as JSON (one object per design)")
    cliargs.add_max_resident(parser)
    parser.set_defaults(func=cmd_compare)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to an argparse ``add_subparsers()`` object; returns the new parser."""
    parser = subparsers.add_parser("compare", help="one guest workload under v7, v8, v9, guest_memfd and "
                                   "in-place conversion, side by side",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    return parser


def cmd_compare(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console(stderr=bool(args.json))
    # One design's machine at a time; each holds about its guest RAM (measured: --ram 256 peaks at
    # ~310 MiB), so twice the RAM is a safe bound.
    reason = cliargs.check_fits(cliargs.BASE_RESIDENT + 2 * args.ram * MiB,
                                getattr(args, "max_resident", None), f"compare --memory {args.ram}M")
    if reason:
        print(f"guestmem compare: error: {reason}", file=sys.stderr)
        return 2
    charts = [(getattr(args, fmt), fmt) for fmt in cliargs.FIGURE_FORMATS if getattr(args, fmt, None)]
    named = [os.path.realpath(path) for path, _ in charts]
    if len(set(named)) != len(named):
        print("guestmem compare: error: two chart options name the same file; give each its own",
              file=sys.stderr)
        return 2
    size, dpi = getattr(args, "size", None), getattr(args, "dpi", None)
    too_big = cliargs.check_pixels(size or (14.0, 12.0), dpi or 150)
    if too_big:
        print(f"guestmem compare: error: {too_big}", file=sys.stderr)
        return 2
    for path, _ in charts:
        try:
            check_writable(path)
        except OutputError as exc:
            print(f"guestmem compare: error: {exc}", file=sys.stderr)
            return 2
    try:
        rows = run_compare(args.workload, ram=args.ram * MiB, flavour=args.flavour, rounds=args.rounds,
                           reply=args.reply, model=dict(args.model) or None)
    except ValueError as e:
        print(f"guestmem compare: error: {e}", file=sys.stderr)
        return 2
    console.print(make_table(rows))
    console.print(make_legend(rows))
    for path, fmt in charts:
        write_bytes(path, chart_bytes(rows, fmt, size=size, dpi=dpi))
        console.print(f"chart written to {path}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="guestmem compare", description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
