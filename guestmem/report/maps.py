"""The guest physical map in the terminal (rich), and the row geometry the figures share.

One cell per 2 MiB of guest RAM (coarser for very large guests), 64 cells per row, a header per
RAM region.  A cell's colour says what is resident there -- private, shared, both kinds (mixed), the
same page on both sides (double-backed: the waste the discard policy exists to prevent), or nothing
(unallocated).  With colour, its glyph says how the guest maps it, where the backend can tell:
2 MiB/1 GiB mappings, 4 KiB mappings, or resident but not mapped.  Without colour (a pipe, a log,
``NO_COLOR``) the glyph must say the kind instead, or every kind would look the same: one letter
per kind, from :mod:`guestmem.report.palette`, which the figures and the HTML report share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from guestmem.report.palette import (
    KIND_COLOURS,
    KIND_COLOURS_16,
    KIND_GLYPHS_MONO,
    KIND_LABELS,
    KINDS,
    LEVEL_GLYPHS,
    LEVEL_LABELS,
)
from guestmem.scenarios.sizes import fmt_size
from guestmem.vmm.snapshot import Cell, MapSnapshot

COLUMNS = 64


@dataclass(frozen=True)
class RegionRows:
    name: str
    gpa: int
    size: int
    rows: list[list[Cell]]


def region_rows(snap: MapSnapshot) -> list[RegionRows]:
    out = []
    for name, gpa, size in snap.regions:
        cells = [c for c in snap.cells if c.region == name]
        rows = [cells[i : i + COLUMNS] for i in range(0, len(cells), COLUMNS)]
        out.append(RegionRows(name, gpa, size, rows))
    return out


def describe_cell(c: Cell) -> str:
    lvl = "" if c.mapped is None else ", mapped " + ", ".join(f"{k} {v}" for k, v in c.mapped.items() if v)
    return (f"{c.region} gpa {c.gpa:#x}+{fmt_size(c.size)}: {KIND_LABELS[c.kind]}; private {c.private} / "
            f"shared {c.shared} pages; resident private {c.private_resident}, shared {c.shared_resident}, "
            f"double {c.double}{lvl}")


def legend_items(snap: MapSnapshot) -> list[tuple[str, str]]:
    """``(kind, label)`` for every kind in the palette (all of them, present or not: a legend that
    changes with the data cannot be learned once)."""
    return [(k, KIND_LABELS[k]) for k in KINDS]


def terminal_colours(console: Console) -> Mapping[str, str] | None:
    """The kind colours ``console`` can show: None when it writes to a pipe or file or under
    ``NO_COLOR`` (draw letters), named ANSI colours on a 16-colour terminal, else the palette's."""
    if console.color_system is None or console.no_color:
        return None
    return KIND_COLOURS_16 if console.color_system == "standard" else KIND_COLOURS


def cell_glyph(c: Cell, colour: bool) -> str:
    """The character for a cell: with colour, the mapping level; without, the kind."""
    if not colour:
        return KIND_GLYPHS_MONO[c.kind]
    return "·" if c.kind == "unallocated" else LEVEL_GLYPHS[c.level]


def render_terminal(snap: MapSnapshot, colours: Mapping[str, str] | None = KIND_COLOURS) -> Group:
    """A rich renderable of the map in ``colours`` (kind -> rich colour; see
    :func:`terminal_colours`).  ``colours=None`` draws each kind with its own letter and says the
    mapping levels are shown only with colour."""
    colour = colours is not None
    parts: list[object] = []
    if snap.title:
        parts.append(Text(snap.title, style="bold"))
    for reg in region_rows(snap):
        parts.append(Text(f"{reg.name}  {reg.gpa:#x}-{reg.gpa + reg.size:#x}  ({fmt_size(reg.size)})",
                          style="dim"))
        for row in reg.rows:
            line = Text()
            line.append(f"{row[0].gpa:>#14x} ", style="dim")
            for c in row:
                line.append(cell_glyph(c, colour), style=colours[c.kind] if colours else "")
            parts.append(line)
    legend = Text("  ")
    for kind, label in legend_items(snap):
        if colours:
            legend.append("█" if kind != "unallocated" else "·", style=colours[kind])
        else:
            legend.append(KIND_GLYPHS_MONO[kind])
        legend.append(f" {label}   ")
    parts.append(legend)
    if snap.levels_known and not colour:
        parts.append(Text("  mapping levels: shown with colour, in --png/--svg/--pdf and in --json",
                          style="dim"))
    elif snap.levels_known:
        lv = Text("  ")
        for level, label in LEVEL_LABELS.items():
            lv.append(LEVEL_GLYPHS[level])
            lv.append(f" {label}   ")
        parts.append(lv)
    else:
        parts.append(Text("  mapping levels: not visible on this backend", style="dim"))
    t = snap.totals()
    priv, shared, dbl = (fmt_size(t[k] * 4096) for k in ("private_resident", "shared_resident", "double"))
    resident = fmt_size((t["private_resident"] + t["shared_resident"]) * 4096)
    parts.append(Text(f"  one cell = {fmt_size(snap.cell_size)}; resident {resident} (private {priv}, shared "
                      f"{shared}, double-backed {dbl}); residency {snap.residency}", style="dim"))
    return Group(*parts)  # type: ignore[arg-type]


def kinds_table(before: MapSnapshot | None, after: MapSnapshot) -> Table:
    """Cells per kind, before and after."""
    table = Table(title="guest physical map (cells)", show_edge=False)
    table.add_column("kind")
    if before is not None:
        table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    kb, ka = (before.kinds() if before else {}), after.kinds()
    for kind in KINDS:
        label = KIND_LABELS[kind]
        row: list[Text | str] = [Text(label, style=KIND_COLOURS[kind])]
        if before is not None:
            row.append(str(kb.get(kind, 0)))
        row.append(str(ka.get(kind, 0)))
        table.add_row(*row)
    return table
