"""``RangeMap``: a sparse map from integer intervals to values, used for every per-page state.

Attributes, memslot bindings, allocation, mappings and folio layouts all live in one of these, so
an operation over a range costs what the number of distinct ranges it touches costs — never the
number of pages.  Adjacent ranges holding equal values are always merged (as the kernel's maple
tree does for guest_memfd attributes), so a uniform 1 TiB guest is one entry.

Representation: three parallel sorted lists (``starts``, ``ends``, ``values``) of disjoint,
non-empty, non-adjacent-equal intervals ``[start, end)``.  Indices not covered hold ``default``.
Lookups are ``bisect`` (O(log n)); edits splice the lists (O(log n + k) plus a memmove in C).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class RangeMap(Generic[V]):
    __slots__ = ("_starts", "_ends", "_values", "default")

    def __init__(self, default: V) -> None:
        self.default: V = default
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._values: list[V] = []

    # --- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of stored (non-default) intervals."""
        return len(self._starts)

    def get(self, index: int) -> V:
        i = bisect_right(self._starts, index) - 1
        if i >= 0 and index < self._ends[i]:
            return self._values[i]
        return self.default

    __getitem__ = get

    def items(self) -> Iterator[tuple[int, int, V]]:
        """The stored intervals, in order (default-valued gaps are not yielded)."""
        return zip(self._starts, self._ends, self._values, strict=True)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
        """Cover ``[start, end)`` exactly with maximal pieces ``(s, e, value)``, gaps as ``default``."""
        if start >= end:
            return
        i = bisect_right(self._starts, start) - 1
        if i < 0 or self._ends[i] <= start:
            i += 1
        pos = start
        n = len(self._starts)
        while pos < end:
            if i < n and self._starts[i] <= pos:
                e = min(self._ends[i], end)
                yield pos, e, self._values[i]
                pos = e
                i += 1
            else:
                e = min(self._starts[i], end) if i < n else end
                yield pos, e, self.default
                pos = e

    def all_equal(self, start: int, end: int, value: V) -> bool:
        """True if every index in ``[start, end)`` holds ``value``."""
        return all(v == value for _, _, v in self.segments(start, end))

    def any_match(self, start: int, end: int, pred: Callable[[V], bool]) -> bool:
        return any(pred(v) for _, _, v in self.segments(start, end))

    def first_match(self, start: int, end: int, pred: Callable[[V], bool]) -> int | None:
        """The lowest index in ``[start, end)`` whose value satisfies ``pred``, or None."""
        for s, _, v in self.segments(start, end):
            if pred(v):
                return s
        return None

    def count(self, start: int, end: int, pred: Callable[[V], bool]) -> int:
        """How many indices in ``[start, end)`` have a value satisfying ``pred``."""
        return sum(e - s for s, e, v in self.segments(start, end) if pred(v))

    def distinct(self, start: int, end: int) -> int:
        """Number of maximal uniform pieces covering ``[start, end)``."""
        return sum(1 for _ in self.segments(start, end))

    # --- edits --------------------------------------------------------------------------------
    def set(self, start: int, end: int, value: V) -> None:
        """Assign ``value`` to ``[start, end)`` (``default`` erases), merging equal neighbours."""
        if start >= end:
            return
        starts, ends, values = self._starts, self._ends, self._values
        # Entries [lo, hi) intersect or touch [start, end).
        lo = bisect_left(ends, start)
        hi = bisect_right(starts, end)
        new_s: list[int] = []
        new_e: list[int] = []
        new_v: list[V] = []
        # Left remainder of the first touched entry.
        if lo < hi and starts[lo] < start:
            if values[lo] == value:
                start = starts[lo]
            else:
                new_s.append(starts[lo])
                new_e.append(start)
                new_v.append(values[lo])
        elif lo < hi and starts[lo] == start and ends[lo] == start:
            pass
        # Right remainder of the last touched entry.
        right: tuple[int, int, V] | None = None
        if lo < hi and ends[hi - 1] > end:
            if values[hi - 1] == value:
                end = ends[hi - 1]
            else:
                right = (end, ends[hi - 1], values[hi - 1])
        # Touching (adjacent, not overlapping) neighbours with a different value stay whole.
        if lo < hi and ends[lo] == start and starts[lo] < start and values[lo] != value:
            new_s, new_e, new_v = [starts[lo]], [ends[lo]], [values[lo]]
        if lo < hi and starts[hi - 1] == end and ends[hi - 1] > end and values[hi - 1] != value:
            right = (starts[hi - 1], ends[hi - 1], values[hi - 1])
        if value != self.default:
            new_s.append(start)
            new_e.append(end)
            new_v.append(value)
        if right is not None:
            new_s.append(right[0])
            new_e.append(right[1])
            new_v.append(right[2])
        starts[lo:hi] = new_s
        ends[lo:hi] = new_e
        values[lo:hi] = new_v

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._values.clear()

    def update(self, start: int, end: int, fn: Callable[[V], V]) -> None:
        """Replace each piece's value ``v`` in ``[start, end)`` with ``fn(v)``."""
        for s, e, v in list(self.segments(start, end)):
            nv = fn(v)
            if nv != v:
                self.set(s, e, nv)

    def copy(self) -> RangeMap[V]:
        other: RangeMap[V] = RangeMap(self.default)
        other._starts = self._starts.copy()
        other._ends = self._ends.copy()
        other._values = self._values.copy()
        return other

    def check(self) -> None:
        """Assert the representation invariants (sorted, disjoint, non-empty, merged, no default)."""
        prev_end, prev_v = None, None
        for s, e, v in self.items():
            assert s < e, (s, e)
            assert v != self.default, (s, e, v)
            if prev_end is not None:
                assert prev_end <= s, (prev_end, s)
                assert not (prev_end == s and prev_v == v), ("unmerged", s, v)
            prev_end, prev_v = e, v

    def __repr__(self) -> str:
        body = ", ".join(f"[{s:#x},{e:#x})={v!r}" for s, e, v in self.items())
        return f"RangeMap(default={self.default!r}, {body})"
