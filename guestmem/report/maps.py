"""The guest physical map, drawn: in the terminal (rich), and the shared geometry and palette the
PNG and SVG renderers use.

One cell per 2 MiB of guest RAM (coarser for very large guests), one row per 128 MiB, a header
per RAM region.  A cell's colour says what is resident there -- private, shared, both kinds
(mixed), the same page on both sides (double-backed: the waste the discard policy exists to
prevent), or nothing (unallocated).  Its glyph says how the guest maps it, where the backend can
tell: 2 MiB/1 GiB mappings, 4 KiB mappings, or resident but not mapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text

from guestmem.scenarios.sizes import fmt_size
from guestmem.vmm.snapshot import Cell, MapSnapshot

COLUMNS = 64

KIND_COLOURS = {
    "private": "#8e44ad",
    "shared": "#27ae60",
    "mixed": "#f1c40f",
    "double": "#e74c3c",
    "unallocated": "#c8ccd0",
}
KIND_LABELS = {
    "private": "private",
    "shared": "shared",
    "mixed": "private + shared",
    "double": "double-backed",
    "unallocated": "unallocated",
}
LEVEL_GLYPHS = {"1G": "█", "2M": "█", "4K": "▒", "-": "░", None: "█"}
LEVEL_LABELS = {"2M": "mapped 2M/1G", "4K": "mapped 4K", "-": "resident, not mapped"}


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
    """``(kind, label)`` for every kind in the palette."""
    return [(k, KIND_LABELS[k]) for k in KIND_COLOURS]


def render_terminal(snap: MapSnapshot) -> Group:
    """A rich renderable of the map."""
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
                glyph = "·" if c.kind == "unallocated" else LEVEL_GLYPHS[c.level]
                line.append(glyph, style=KIND_COLOURS[c.kind])
            parts.append(line)
    legend = Text("  ")
    for kind, label in legend_items(snap):
        legend.append("█" if kind != "unallocated" else "·", style=KIND_COLOURS[kind])
        legend.append(f" {label}   ")
    parts.append(legend)
    if snap.levels_known:
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
    for kind, label in KIND_LABELS.items():
        row: list[Text | str] = [Text(label, style=KIND_COLOURS[kind])]
        if before is not None:
            row.append(str(kb.get(kind, 0)))
        row.append(str(ka.get(kind, 0)))
        table.add_row(*row)
    return table
