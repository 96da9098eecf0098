"""A hand-made guest physical map holding every kind at every mapping level: fast, and certain to
exercise the whole legend.  (A module of its own, not conftest.py: test files import it by name, and
``conftest`` would resolve to another directory's conftest when several test directories run.)"""

from __future__ import annotations

from guestmem.vmm.snapshot import Cell, MapSnapshot

CELL = 2 << 20
PAGES = CELL // 4096


def _cell(i: int, region: str, base: int, kind: str, level: str | None) -> Cell:
    priv = {"private": PAGES, "shared": 0, "mixed": PAGES // 2, "double": PAGES, "unallocated": 0}[kind]
    shr = {"private": 0, "shared": PAGES, "mixed": PAGES // 2, "double": 8, "unallocated": 0}[kind]
    mapped = None if level is None else {"4K": 0, "2M": 0, "1G": 0} | ({} if level == "-" else {level: PAGES})
    return Cell(gpa=base + i * CELL, size=CELL, region=region, private=priv, shared=PAGES - priv,
                private_resident=priv, shared_resident=shr, double=8 if kind == "double" else 0,
                mapped=mapped if kind != "unallocated" else ({} if level is not None else None))


def every_kind_snapshot(levels: bool = True, title: str = "synthetic") -> MapSnapshot:
    """Two regions, a gap between them; every kind at every level, and enough cells for two rows."""
    kinds = ("private", "shared", "mixed", "double", "unallocated")
    lvls: tuple[str | None, ...] = ("2M", "1G", "4K", "-") if levels else (None,)
    combos = [(k, lv) for k in kinds for lv in lvls]
    low = [_cell(i, "low", 0, k, lv) for i, (k, lv) in enumerate(combos)]
    high_base = 1 << 32
    high = [_cell(i, "high", high_base, kinds[i % 4], lvls[0]) for i in range(70)]
    regions = [("low", 0, len(low) * CELL), ("high", high_base, len(high) * CELL)]
    return MapSnapshot(CELL, low + high, regions, levels, "measured", title)
