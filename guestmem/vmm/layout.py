"""The guest physical layout: RAM regions and the holes between them.

Every conversion request is checked against this map first.  A request is cut into pieces that
each lie in one RAM region or in a hole (QEMU's ``memory_region_find`` loop with its
"next_memory_region" split), so a range crossing two memslots converts both, and a range over an
MMIO hole can be treated as firmware expects (to-shared accepted and ignored, to-private refused).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from guestmem import uapi as u

PAGE = u.PAGE_SIZE


@dataclass(frozen=True)
class RegionSpec:
    """One RAM region: ``size`` bytes at guest physical ``gpa`` (both page aligned)."""

    name: str
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class Piece:
    """A part of a request: ``[gpa, gpa+size)`` inside ``region`` (an index), or a hole (None)."""

    gpa: int
    size: int
    region: int | None

    @property
    def end(self) -> int:
        return self.gpa + self.size


class LayoutError(ValueError):
    """Regions that overlap, are empty, or are not page aligned."""


class Layout:
    """Sorted, disjoint RAM regions; everything else is a hole."""

    def __init__(self, regions: Sequence[RegionSpec]) -> None:
        regs = sorted(regions, key=lambda r: r.gpa)
        if not regs:
            raise LayoutError("a guest needs at least one RAM region")
        names: set[str] = set()
        for r in regs:
            if r.size <= 0 or r.gpa < 0 or r.gpa % PAGE or r.size % PAGE:
                raise LayoutError(f"region {r.name!r}: gpa {r.gpa:#x} and size {r.size:#x} must be "
                                  "page aligned and the size positive")
            if r.name in names:
                raise LayoutError(f"region name {r.name!r} used twice")
            names.add(r.name)
        for a, b in pairwise(regs):
            if a.end > b.gpa:
                raise LayoutError(f"regions {a.name!r} and {b.name!r} overlap")
        self.regions: tuple[RegionSpec, ...] = tuple(regs)
        self._starts = [r.gpa for r in regs]
        self._ends = [r.end for r in regs]

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def region_at(self, gpa: int) -> int | None:
        """Index of the region holding ``gpa``, or None (a hole)."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._ends[i]:
            return i
        return None

    def split(self, gpa: int, size: int) -> list[Piece]:
        """Cover ``[gpa, gpa+size)`` with pieces, each in one region or in one hole."""
        out: list[Piece] = []
        pos, end = gpa, gpa + size
        while pos < end:
            i = self.region_at(pos)
            if i is not None:
                stop = min(end, self.regions[i].end)
            else:
                j = bisect_right(self._starts, pos)
                stop = min(end, self.regions[j].gpa) if j < len(self.regions) else end
            out.append(Piece(pos, stop - pos, i))
            pos = stop
        return out

    # --- RAM-offset space: all regions concatenated in GPA order --------------------------------
    def ram_to_gpa(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Translate ``[offset, offset+size)`` of the concatenated RAM into GPA pieces (regions that
        touch give one piece: a request over it crosses memslots and the manager splits it)."""
        if offset < 0 or size < 0 or offset + size > self.ram_bytes:
            raise ValueError(f"RAM range [{offset:#x}, {offset + size:#x}) is outside the guest's "
                             f"{self.ram_bytes:#x} bytes of RAM")
        out: list[tuple[int, int]] = []
        base = 0
        for r in self.regions:
            a, b = max(offset, base), min(offset + size, base + r.size)
            if a < b:
                g = r.gpa + a - base
                if out and out[-1][0] + out[-1][1] == g:  # regions that touch: one GPA piece
                    out[-1] = (out[-1][0], out[-1][1] + b - a)
                else:
                    out.append((g, b - a))
            base += r.size
        return out

    def __iter__(self) -> Iterator[RegionSpec]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)
