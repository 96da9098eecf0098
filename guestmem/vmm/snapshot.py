"""A picture of guest physical memory, as data: per cell (2 MiB by default) how many pages are
private or shared, which side holds them, how many are double-backed, and -- where the backend
shows it -- at which level the guest maps them.

The report layer draws this (terminal, PNG, SVG, JSON); nothing here knows about drawing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from guestmem import uapi as u

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

PAGE = u.PAGE_SIZE
LEVEL_NAMES = {0: "4K", 9: "2M", 18: "1G"}
MAX_CELLS = 4096


def auto_cell_size(ram_bytes: int, base: int = u.HPAGE_2M) -> int:
    """2 MiB cells, doubled until the map has at most :data:`MAX_CELLS` cells."""
    size = base
    while ram_bytes // size > MAX_CELLS:
        size *= 2
    return size


@dataclass(frozen=True)
class Cell:
    gpa: int
    size: int
    region: str
    private: int  # pages whose attribute is private
    shared: int
    private_resident: int
    shared_resident: int
    double: int
    mapped: dict[str, int] | None  # pages mapped at each level ("4K", "2M", "1G"); None = unknown

    @property
    def kind(self) -> str:
        """"double", "mixed", "private", "shared" or "unallocated", by what is resident."""
        if self.double:
            return "double"
        if self.private_resident and self.shared_resident:
            return "mixed"
        if self.private_resident:
            return "private"
        if self.shared_resident:
            return "shared"
        return "unallocated"

    @property
    def level(self) -> str | None:
        """The largest level any page of the cell is mapped at, "-" if none, None if unknown."""
        if self.mapped is None:
            return None
        for name in ("1G", "2M", "4K"):
            if self.mapped.get(name):
                return name
        return "-"

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(kind=self.kind, level=self.level)
        return d


@dataclass(frozen=True)
class MapSnapshot:
    cell_size: int
    cells: list[Cell]
    regions: list[tuple[str, int, int]]
    levels_known: bool
    residency: str  # "measured", "tracked" or "mixed"
    title: str = ""

    def totals(self) -> dict[str, int]:
        out = {"private": 0, "shared": 0, "private_resident": 0, "shared_resident": 0, "double": 0}
        for c in self.cells:
            for k in out:
                out[k] += getattr(c, k)
        return out

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.cells:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        return counts

    def as_dict(self) -> dict[str, object]:
        return {"title": self.title, "cell_size": self.cell_size, "levels_known": self.levels_known,
                "residency": self.residency,
                "regions": [{"name": n, "gpa": g, "size": s} for n, g, s in self.regions],
                "totals": self.totals(), "kinds": self.kinds(),
                "cells": [c.as_dict() for c in self.cells]}


def _per_cell(runs: list[tuple[int, int]], base: int, end: int, cell_pages: int) -> list[int]:
    """Spread the lengths of gfn ``runs`` over the cells of ``[base, end)``: O(runs + cells)."""
    out = [0] * ((end - base + cell_pages - 1) // cell_pages)
    for a, b in runs:
        a, b = max(a, base), min(b, end)
        while a < b:
            i = (a - base) // cell_pages
            stop = min(b, base + (i + 1) * cell_pages)
            out[i] += stop - a
            a = stop
    return out


def _intersect_runs(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    a, b = sorted(a), sorted(b)
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def take_snapshot(m: Machine, cell: int = u.HPAGE_2M) -> MapSnapshot:
    cell_pages = cell // PAGE
    cells: list[Cell] = []
    levels_known = True
    sources: set[str] = set()
    for r in m.regions:
        base, end = r.spec.gpa // PAGE, r.spec.end // PAGE
        rr = m.accounting.region_residency(r)
        sources.add("measured" if rr.measured_private and rr.measured_shared else
                    "tracked" if not (rr.measured_private or rr.measured_shared) else "mixed")
        priv_cells = _per_cell([(a, b) for a, b, p in m.tracker.kind_runs(base, end) if p], base, end,
                               cell_pages)
        pres = _per_cell(rr.private, base, end, cell_pages)
        sres = _per_cell(rr.shared, base, end, cell_pages)
        dbl = _per_cell(_intersect_runs(rr.private, rr.shared), base, end, cell_pages)
        levels = (m.introspection.mapping_levels(m.vm, base, end)
                  if m.introspection is not None else None)
        level_cells: dict[str, list[int]] | None = None
        if levels is None:
            levels_known = False
        else:
            level_cells = {name: _per_cell([(a, b) for a, b, o, _ in levels if o == order], base, end,
                                           cell_pages) for order, name in LEVEL_NAMES.items()}
        for i, s in enumerate(range(base, end, cell_pages)):
            n = min(end, s + cell_pages) - s
            mapped = None if level_cells is None else {k: v[i] for k, v in level_cells.items()}
            cells.append(Cell(s * PAGE, n * PAGE, r.spec.name, priv_cells[i], n - priv_cells[i],
                              pres[i], sres[i], dbl[i], mapped))
    source = sources.pop() if len(sources) == 1 else "mixed"
    return MapSnapshot(cell, cells, [(r.spec.name, r.spec.gpa, r.spec.size) for r in m.regions],
                       levels_known, source)
