"""Figures a person can put on a slide, drawn with matplotlib: the guest physical map (one panel per
moment: before, after each phase, after), the ``guestmem compare`` chart, and the charts over time
the HTML report shows (resident memory and conversions; exits per vCPU).

Why matplotlib: it gives a real axis (GPA labels, a scale), fonts that scale with the DPI, a legend
laid out without overlaps, and PNG, SVG and PDF from one drawing.  Only the object API is used
(``Figure`` directly, never ``pyplot``), so no GUI backend or global state is involved and figures
can be drawn from any thread.

The map panel: one square per cell (2 MiB by default) in its kind's colour from
:mod:`guestmem.report.palette`, 64 cells per row at most, each RAM region starting a new row under
a header with its name, range and size.  The y axis gives the GPA at which each row starts, the x
axis the offset within the row.  The mapping level is drawn inside the square: solid for 2 MiB, a
dark border for 1 GiB, hatched for 4 KiB mappings only, an outline for memory that is resident but
not mapped.  The legend always lists every kind, double-backed included, so it reads the same for
every run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guestmem.report.maps import COLUMNS, region_rows
from guestmem.report.palette import (
    BACKGROUND,
    EXIT_COLOURS,
    INK,
    KIND_COLOURS,
    KIND_LABELS,
    KINDS,
    LEVEL_STYLES,
    MUTED,
    SEQUENCE,
    SERIES_COLOURS,
    cell_style,
    pale,
)
from guestmem.scenarios.sizes import fmt_size
from guestmem.vmm.snapshot import MapSnapshot

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from guestmem.scenarios.run import ScenarioReport
    from guestmem.vmm.trace import EventTrace

FORMATS = ("png", "svg", "pdf")
DEFAULT_DPI = 150
PAGE = 4096
LEVEL_SAMPLE = "#5b6470"  # the neutral colour the legend draws the mapping levels in
INSET = 0.07  # gap around each cell, in cells
MIN_COLUMNS = 20  # a panel is at least this many cells wide, or its headers and totals would not fit


@dataclass(frozen=True)
class FigureOptions:
    """How big to draw: ``size`` in inches (width, height; None = fitted to the content) and
    ``dpi`` (pixels per inch for PNG; SVG and PDF are vector, but the DPI still scales nothing)."""

    size: tuple[float, float] | None = None
    dpi: int = DEFAULT_DPI


def _figure(size: tuple[float, float], dpi: int) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=dpi, layout="constrained", facecolor=BACKGROUND)


def figure_bytes(fig: Figure, fmt: str, *, salt: str = "guestmem", text_as_text: bool = False) -> bytes:
    """``fig`` as PNG, SVG or PDF bytes, reproducibly (no dates in the metadata; SVG ids derived from
    ``salt``, so several SVGs can share one HTML page without clashing ids).  ``text_as_text``
    keeps SVG text as ``<text>`` elements (searchable, smaller; for the HTML report) instead of
    outlines (identical on every viewer; for files)."""
    import matplotlib

    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; choose one of {', '.join(FORMATS)}")
    metadata: dict[str, Any] = {"png": {"Software": "guestmem"},
                                "svg": {"Date": None, "Creator": None, "Format": None, "Type": None},
                                "pdf": {"CreationDate": None, "Creator": "guestmem"}}[fmt]
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none" if text_as_text else "path"}):
        fig.savefig(buf, format=fmt, metadata=metadata, facecolor=BACKGROUND)
    return buf.getvalue()


# --- the map -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """A panel's rows: ("header", region text) or ("cells", cells of one row)."""

    rows: list[tuple[str, Any]]
    columns: int  # the axis' width in cells (at least MIN_COLUMNS, so the labels fit a tiny guest)
    used: int  # the longest row


def _layout(snap: MapSnapshot) -> _Layout:
    rows: list[tuple[str, Any]] = []
    columns = 1
    for reg in region_rows(snap):
        rows.append(("header", f"{reg.name}  {reg.gpa:#x}–{reg.gpa + reg.size:#x}  ({fmt_size(reg.size)})"))
        for row in reg.rows:
            rows.append(("cells", row))
            columns = max(columns, len(row))
    used = min(COLUMNS, columns)
    return _Layout(rows, max(MIN_COLUMNS, used), used)


def resident_line(snap: MapSnapshot) -> str:
    """The totals under a panel: what is resident, per side, and how much twice."""
    t = snap.totals()
    total = fmt_size((t["private_resident"] + t["shared_resident"]) * PAGE)
    return (f"resident {total}: private {fmt_size(t['private_resident'] * PAGE)}, shared "
            f"{fmt_size(t['shared_resident'] * PAGE)}, double-backed {fmt_size(t['double'] * PAGE)}")


def _draw_map(ax: Axes, snap: MapSnapshot, label: str, layout: _Layout, fontsize: float,
              header_h: float = 1.0) -> None:
    """One panel; a region header is ``header_h`` cells tall (more than one when cells are smaller
    than its text, or the text would run into the row above)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    groups: dict[tuple[str, str], list[Rectangle]] = {}
    yticks: list[float] = []
    ylabels: list[str] = []
    y = 0.0
    for what, item in layout.rows:
        if what == "header":
            ax.text(0, y + header_h * 0.6, item, fontsize=fontsize, color=INK, va="center", ha="left",
                    fontweight="bold")
            y += header_h
            continue
        yticks.append(y + 0.5)
        ylabels.append(f"{item[0].gpa:#x}")
        for x, c in enumerate(item):
            key = (c.kind, cell_style(c.kind, c.level))
            groups.setdefault(key, []).append(Rectangle((x + INSET, y + INSET), 1 - 2 * INSET, 1 - 2 * INSET))
        y += 1
    for (kind, style), rects in groups.items():
        colour = KIND_COLOURS[kind]
        kw: dict[str, Any] = {"facecolor": colour, "edgecolor": "none", "linewidth": 0}
        if style == "border":
            kw.update(edgecolor=INK, linewidth=1.2)
        elif style == "hatched":
            kw.update(hatch="////", edgecolor=pale(colour, 0.65), linewidth=0)
        elif style == "outline":
            kw.update(facecolor=BACKGROUND, edgecolor=colour, linewidth=1.5)
        ax.add_collection(PatchCollection(rects, match_original=False, **kw))
    ax.set_xlim(0, layout.columns)
    ax.set_ylim(y, 0)
    ax.set_aspect("equal")
    step = max(1, math.ceil(len(yticks) / 16))  # at most ~16 GPA labels per panel
    ax.set_yticks(yticks[::step], ylabels[::step], fontsize=fontsize * 0.9, family="monospace")
    xstep = next(s for s in (2, 4, 8, 16, 32, 64) if layout.used / s <= 8)  # labels 2+ cells apart
    xt = list(range(0, layout.used + 1, xstep))
    ax.set_xticks(xt, ["+0" if x == 0 else f"+{fmt_size(x * snap.cell_size)}" for x in xt],
                  fontsize=fontsize * 0.9)
    ax.tick_params(length=2, color=MUTED, labelcolor=INK)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(label, fontsize=fontsize * 1.15, color=INK, loc="left")
    ax.set_xlabel(resident_line(snap), fontsize=fontsize, color=INK)
    ax.set_ylabel("GPA", fontsize=fontsize * 0.9, color=MUTED)


def map_legend_handles(levels_known: bool) -> list[Any]:
    """Legend entries: every kind, and (where the backend shows them) the mapping levels, ordered
    for a legend of ``len(KINDS)`` columns filled column by column: kinds on the first row, levels
    on the second."""
    from matplotlib.patches import Patch

    kinds: list[Any] = [Patch(facecolor=KIND_COLOURS[k], edgecolor="none", label=KIND_LABELS[k])
                        for k in KINDS]
    if not levels_known:
        return kinds
    handles: list[Any] = []
    for style, label in LEVEL_STYLES:
        kw: dict[str, Any] = {"facecolor": LEVEL_SAMPLE, "edgecolor": "none"}
        if style == "border":
            kw.update(edgecolor=INK, linewidth=1.2)
        elif style == "hatched":
            kw.update(hatch="////", edgecolor=pale(LEVEL_SAMPLE, 0.65), linewidth=0)
        elif style == "outline":
            kw.update(facecolor=BACKGROUND, edgecolor=LEVEL_SAMPLE, linewidth=1.5)
        handles.append(Patch(label=label, **kw))
    handles += [Patch(facecolor="none", edgecolor="none", label="")] * (len(kinds) - len(handles))
    return [h for pair in zip(kinds, handles, strict=True) for h in pair]


def map_figure(panels: Sequence[tuple[str, MapSnapshot]], *, title: str, subtitle: str = "",
               options: FigureOptions = FigureOptions(), legend: bool = True) -> Figure:
    """The map at each moment in ``panels`` (label, snapshot), side by side in reading order.

    The figure is sized to the content unless ``options.size`` says otherwise; cells stay square.
    """
    if not panels:
        raise ValueError("a map figure needs at least one snapshot")
    layouts = [_layout(s) for _, s in panels]
    columns = max(lay.columns for lay in layouts)
    headers = max(sum(1 for what, _ in lay.rows if what == "header") for lay in layouts)
    cell_rows = max(sum(1 for what, _ in lay.rows if what == "cells") for lay in layouts)
    n = len(panels)
    cell_in = min(0.2, max(0.09, 6.0 / columns))
    extra_h = (0.6 if title or subtitle else 0.1) + (0.55 if legend else 0.0)

    def font_for(width: float) -> float:
        return min(12.0, max(7.0, 0.7 * width))  # grows with the figure, for slides

    def header_cells(width: float, cell: float) -> float:
        """A region header's height in cells: its text's height, at least one cell."""
        return max(1.0, font_for(width) * 1.5 / 72 / cell)

    def natural(per_row: int) -> tuple[float, float]:
        width = max(7.0, per_row * (columns * cell_in + 1.3) + 0.3)
        cell = ((width - 0.3) / per_row - 1.3) / columns  # cells stay square: the width sets the height
        units = cell_rows + headers * header_cells(width, cell)
        return width, -(-n // per_row) * (units * cell + 0.8) + extra_h

    def cell_at(per_row: int, size: tuple[float, float]) -> float:
        """The cell size (in) that ``per_row`` panels per row would get in a figure of ``size``."""
        across = ((size[0] - 0.3) / per_row - 1.3) / columns
        units = cell_rows + headers * header_cells(size[0], across)
        down = ((size[1] - extra_h) / -(-n // per_row) - 0.8) / units
        return min(across, down)

    choices = range(1, min(n, 4) + 1)
    if options.size:  # the size is given: the arrangement with the biggest cells
        per_row = max(choices, key=lambda k: cell_at(k, options.size))  # type: ignore[arg-type]
    else:  # closest to a 16:9 slide, at most 16 in wide
        fits = [k for k in choices if natural(k)[0] <= 16] or [1]
        per_row = min(fits, key=lambda k: abs(math.log(natural(k)[0] / natural(k)[1] / (16 / 9))))
    grid_rows = -(-n // per_row)
    size = options.size or natural(per_row)
    fig = _figure(size, options.dpi)
    fontsize = font_for(size[0])
    header_h = header_cells(size[0], cell_at(per_row, size))
    axes = fig.subplots(grid_rows, per_row, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        label, snap = panels[i]
        _draw_map(ax, snap, label, layouts[i], fontsize, header_h)
    if title or subtitle:
        fig.suptitle("\n".join(t for t in (title, subtitle) if t), fontsize=fontsize * 1.35, color=INK)
    if legend:
        levels_known = all(s.levels_known for _, s in panels)
        handles = map_legend_handles(levels_known)
        fig.legend(handles=handles, loc="outside lower center", ncols=len(KINDS),
                   fontsize=fontsize, frameon=False, handlelength=1.4, handleheight=1.2)
    return fig


def map_subtitle(snaps: Sequence[MapSnapshot], memory: int) -> str:
    """What every panel shares: the guest's size, the cell size, where residency and levels came
    from."""
    s = snaps[-1]
    levels = "" if all(x.levels_known for x in snaps) else "; mapping levels not visible on this backend"
    return (f"guest physical memory, {fmt_size(memory)} in {len(s.regions)} region(s); one cell = "
            f"{fmt_size(s.cell_size)}; residency {s.residency}{levels}")


# --- charts over time (the HTML report) ----------------------------------------------------------


def resident_series(trace: EventTrace) -> dict[str, list[tuple[float, float]]]:
    """The sampled ``resident pages`` counter as (ms, MiB) per side."""
    from guestmem.vmm.trace import COUNTER

    out: dict[str, list[tuple[float, float]]] = {k: [] for k in SERIES_COLOURS}
    for e in trace.events():
        if e.cat == COUNTER and e.name == "resident pages":
            for k in out:
                if k in e.args:
                    out[k].append((e.ts_ns / 1e6, e.args[k] * PAGE / (1 << 20)))
    return out


def conversion_series(trace: EventTrace) -> dict[str, list[tuple[float, float]]]:
    """Cumulative MiB converted to private and to shared, as (ms, MiB) at the end of each
    conversion that changed pages."""
    from guestmem.vmm.trace import CONVERSION

    out: dict[str, list[tuple[float, float]]] = {"to private": [(0.0, 0.0)], "to shared": [(0.0, 0.0)]}
    total = {k: 0.0 for k in out}
    for e in sorted(trace.events(), key=lambda e: e.ts_ns + (e.dur_ns or 0)):
        if e.cat == CONVERSION and e.name in out and e.args.get("changed_pages"):
            total[e.name] += e.args["changed_pages"] * PAGE / (1 << 20)
            out[e.name].append(((e.ts_ns + (e.dur_ns or 0)) / 1e6, total[e.name]))
    return out


def phase_starts(trace: EventTrace) -> list[tuple[float, str]]:
    """(ms, name) of each phase that ran."""
    from guestmem.vmm.trace import PHASE

    return [(e.ts_ns / 1e6, e.name) for e in trace.events() if e.cat == PHASE and "phase" in e.args]


def timeline_figure(trace: EventTrace, *, title: str, options: FigureOptions = FigureOptions()
                    ) -> Figure:
    """Resident memory (sampled) and cumulative conversions over the run, phases marked (their names
    above the plot, on two staggered lines, so neither the data nor each other hide them)."""
    fig = _figure(options.size or (9.0, 5.2), options.dpi)
    top, bottom = fig.subplots(2, 1, sharex=True)
    res = resident_series(trace)
    for k, pts in res.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            # double-backed pages are also private and shared ones: dashed, so the lines under it show
            style = "--" if k == "double" else "-"
            top.step(xs, ys, where="post", color=SERIES_COLOURS[k], label=KIND_LABELS[k], linewidth=1.8,
                     linestyle=style)
            top.plot(xs, ys, "o", color=SERIES_COLOURS[k], markersize=3)
    top.set_ylabel("resident MiB\n(dots: samples)")
    conv = conversion_series(trace)
    colours = {"to private": KIND_COLOURS["private"], "to shared": KIND_COLOURS["shared"]}
    for k, pts in conv.items():
        xs, ys = zip(*pts, strict=True)
        bottom.step(xs, ys, where="post", color=colours[k], label=f"converted {k}", linewidth=1.8)
    bottom.set_ylabel("MiB, cumulative")
    bottom.set_xlabel("time since the run started (ms)")
    bottom.set_title("conversions that changed pages", loc="left", fontsize=10)
    for ax in (top, bottom):
        for ms, _name in phase_starts(trace):
            ax.axvline(ms, color=MUTED, linewidth=0.8, linestyle="--")
        ax.grid(axis="y", color="#e6e6e6")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # off the data
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for i, (ms, name) in enumerate(phase_starts(trace)):  # staggered: phases can start close together
        top.annotate(name, (ms, 1.0), xycoords=("data", "axes fraction"), xytext=(2, 3 + 11 * (i % 2)),
                     textcoords="offset points", fontsize=8, color=MUTED, va="bottom")
    fig.suptitle(title, fontsize=12, color=INK)
    return fig


EXIT_ORDER = ("hypercall", "memoryfault", "mmio", "sync", "halt")


def exits_figure(vcpu_exits: Sequence[Mapping[str, int]], *, title: str,
                 options: FigureOptions = FigureOptions()) -> Figure:
    """Exits per vCPU, stacked by reason (one bar per vCPU)."""
    reasons = [r for r in EXIT_ORDER if any(v.get(r) for v in vcpu_exits)]
    reasons += sorted({r for v in vcpu_exits for r in v} - set(reasons))
    n = len(vcpu_exits)
    fig = _figure(options.size or (9.0, max(2.2, 0.45 * n + 1.6)), options.dpi)
    ax = fig.subplots()
    left = [0] * n
    for i, reason in enumerate(reasons):
        counts = [v.get(reason, 0) for v in vcpu_exits]
        colour = EXIT_COLOURS.get(reason, SEQUENCE[i % len(SEQUENCE)])
        ax.barh(range(n), counts, left=left, color=colour, label=reason, height=0.6)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {total}", va="center", fontsize=8, color=INK)
    ax.set_yticks(range(n), [f"vCPU {i}" for i in range(n)])
    ax.invert_yaxis()
    ax.set_xlabel("exits")
    if reasons:
        fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncols=len(reasons))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=12, color=INK)
    return fig


# --- the compare chart ---------------------------------------------------------------------------

COMPARE_PANELS: tuple[tuple[str, str], ...] = (
    ("peak_frames", "peak frames"), ("final_frames", "final frames"),
    ("double_frames_peak", "double-backed (peak)"), ("double_frames_final", "double-backed (end)"),
    ("invalidations", "invalidation calls"), ("conversions", "conversions"),
    ("zaps", "SPTE zaps"), ("hugepage_mappings", "2M mappings kept"),
    ("directmap_splits", "direct-map splits"), ("directmap_restores", "direct-map restores"),
    ("stale_pages", "freed while mapped"), ("wall_s", "wall time (s)"))


def compare_figure(rows: Sequence[Mapping[str, Any]], *, title: str,
                   options: FigureOptions = FigureOptions()) -> Figure:
    """One panel per measured column, one bar per design (the same colour in every panel)."""
    n = len(rows)
    cols = 4
    grid = -(-len(COMPARE_PANELS) // cols)
    fig = _figure(options.size or (14.0, grid * (0.32 * n + 0.9) + 0.9), options.dpi)
    axes = fig.subplots(grid, cols, squeeze=False, sharey=True)
    labels = [str(r["label"]) for r in rows]
    colours = [SEQUENCE[i % len(SEQUENCE)] for i in range(n)]
    for p, ax in enumerate(axes.flat):
        if p >= len(COMPARE_PANELS):
            ax.set_visible(False)
            continue
        key, name = COMPARE_PANELS[p]
        values = [float(r[key]) for r in rows]
        ax.barh(range(n), values, color=colours, height=0.7)
        top = max(values) or 1.0
        for i, v in enumerate(values):
            ax.text(v + top * 0.02, i, f"{v:.2f}" if key == "wall_s" else f"{int(v)}", va="center",
                    fontsize=8, color=INK)
        ax.set_xlim(0, top * 1.3)
        ax.set_title(name, loc="left", fontsize=10, color=INK)
        ax.set_yticks(range(n), labels, fontsize=8.5)
        if p == 0:
            ax.invert_yaxis()  # shared by every panel: the first design on top
        ax.tick_params(axis="x", labelsize=7.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=13, color=INK)
    return fig


# --- a run's pictures --------------------------------------------------------------------------


def run_title(report: ScenarioReport) -> str:
    """What a picture of a run is of: scenario, flavour, backend (and FAILED if it failed)."""
    verdict = "" if report.ok else " (FAILED)"
    return f"{report.scenario}{verdict} — {report.flavour} on the {report.backend} backend"


def run_panels(report: ScenarioReport, *, before: bool = False, phases: bool = False
               ) -> list[tuple[str, MapSnapshot]]:
    """The moments to draw for a run: before (if asked and taken), after each phase (if asked), and
    after the run -- left out when it is the same picture as the last phase's."""
    panels: list[tuple[str, MapSnapshot]] = []
    if (before or phases) and report.before is not None:
        panels.append(("before", report.before))
    if phases:
        panels += [(s.title, s) for s in report.phase_maps]
    if report.after is not None and not (phases and report.phase_maps
                                         and report.phase_maps[-1].cells == report.after.cells):
        panels.append(("after" if before or phases else "after the run", report.after))
    return panels
