"""Per-page state the VMM keeps for guest RAM, in range maps (QEMU's RamBlockAttributes bitmap,
without the bitmap).

For every RAM gfn the tracker holds three bits: the page's shared/private attribute as the VMM set
it, and, for each side of a separate-backing region, whether that side may hold a populated page
(it was not discarded since the page last had that kind).  The second and third bits are the
VMM's upper bound on residency, used where the backend cannot measure it; a page with both is
"double backed".  Pins (DMA in flight) and discards deferred because of them live here too.
All state is per range, so a 1 TiB guest that converted in 2 MiB chunks costs what its number of
distinct runs costs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from guestmem.ranges import RangeMap

PRIVATE = 1 << 0  # attribute: private
SHARED_POP = 1 << 1  # the shared side may hold a page
PRIVATE_POP = 1 << 2  # the private side may hold a page


@dataclass(frozen=True)
class TrackedCounts:
    """Pages by attribute and by (possibly) populated side, over all RAM."""

    private: int
    shared: int
    shared_populated: int
    private_populated: int
    double: int


class PageTracker:
    """Attributes, populated-side bounds, pins and deferred discards for RAM gfns.

    Every change of ``state`` and ``deferred_discard`` is made by the conversion manager under its
    conversion lock (and this tracker's lock, for readers that do not hold the former); ``pins``
    change under this tracker's lock alone."""

    def __init__(self, ram_gfns: list[tuple[int, int]]) -> None:
        self._lock = threading.RLock()
        self.state: RangeMap[int] = RangeMap(0)
        self.pins: RangeMap[int] = RangeMap(0)
        self.deferred_discard: RangeMap[bool] = RangeMap(False)
        # Whether any page may be pinned: read without the lock by the one-page conversion, which
        # then skips the pin lookup (a pin being taken meanwhile is one taken after the check).
        self.any_pins = False
        self.ram: list[tuple[int, int]] = list(ram_gfns)
        for s, e in self.ram:
            # Fresh RAM is shared, and the guest may populate the shared side at any time.
            self.state.set(s, e, SHARED_POP)

    # --- attributes ---------------------------------------------------------------------------
    def is_private(self, gfn: int) -> bool:
        with self._lock:
            return bool(self.state.get(gfn) & PRIVATE)

    def kind_runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Maximal runs ``(s, e, private)`` of uniform attribute over ``[start, end)``."""
        with self._lock:
            pieces = [(s, e, bool(v & PRIVATE)) for s, e, v in self.state.segments(start, end)]
        merged: list[tuple[int, int, bool]] = []
        for s, e, p in pieces:
            if merged and merged[-1][2] == p and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e, p)
            else:
                merged.append((s, e, p))
        return iter(merged)

    def changing_runs(self, start: int, end: int, to_private: bool) -> list[tuple[int, int]]:
        """The runs of ``[start, end)`` whose attribute differs from the target."""
        if end == start + 1:  # one page (every memory fault): one lookup, no run list
            with self._lock:
                private = bool(self.state.get(start) & PRIVATE)
            return [] if private == to_private else [(start, end)]
        return [(s, e) for s, e, p in self.kind_runs(start, end) if p != to_private]

    def _update(self, start: int, end: int, fn: Callable[[int], int]) -> None:
        """``state.update`` with a shortcut for one page (the fault path converts one at a time)."""
        if end == start + 1:
            old = self.state.get(start)
            new = fn(old)
            if new != old:
                self.state.set(start, end, new)
        else:
            self.state.update(start, end, fn)

    def set_kind(self, start: int, end: int, private: bool) -> None:
        """Record a conversion: the new side may be populated from now on."""
        with self._lock:
            if private:
                self._update(start, end, lambda v: v | PRIVATE | PRIVATE_POP)
            else:
                self._update(start, end, lambda v: (v & ~PRIVATE) | SHARED_POP)

    def dropped(self, start: int, end: int, side_bit: int) -> None:
        """One side of ``[start, end)`` was discarded: it holds nothing now."""
        with self._lock:
            self._update(start, end, lambda v: v & ~side_bit)

    def touched(self, start: int, end: int, side_bit: int) -> None:
        """One side of ``[start, end)`` was populated on purpose (preallocation)."""
        with self._lock:
            self.state.update(start, end, lambda v: v | side_bit)

    # --- pins -----------------------------------------------------------------------------------
    def pin(self, start: int, end: int, delta: int) -> None:
        with self._lock:
            if delta > 0:
                self.any_pins = True  # before the pin exists: never False while one does
            self.pins.update(start, end, lambda n: n + delta)
            if delta < 0:
                self.pins.check()
                self.any_pins = len(self.pins) > 0

    def pinned(self, gfn: int) -> bool:
        """Whether page ``gfn`` is pinned for DMA."""
        with self._lock:
            return self.pins.get(gfn) > 0

    def pinned_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        with self._lock:
            if end == start + 1:
                return [(start, end)] if self.pins.get(start) > 0 else []
            return [(s, e) for s, e, n in self.pins.segments(start, end) if n > 0]

    def unpinned_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        with self._lock:
            if end == start + 1:
                return [] if self.pins.get(start) > 0 else [(start, end)]
            return [(s, e) for s, e, n in self.pins.segments(start, end) if n == 0]

    # --- counting -------------------------------------------------------------------------------
    def counts(self) -> TrackedCounts:
        priv = shared = sp = pp = dbl = 0
        with self._lock:
            for s, e in self.ram:
                for a, b, v in self.state.segments(s, e):
                    n = b - a
                    if v & PRIVATE:
                        priv += n
                    else:
                        shared += n
                    if v & SHARED_POP:
                        sp += n
                    if v & PRIVATE_POP:
                        pp += n
                    if v & SHARED_POP and v & PRIVATE_POP:
                        dbl += n
        return TrackedCounts(priv, shared, sp, pp, dbl)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        with self._lock:
            return iter(list(self.state.segments(start, end)))
