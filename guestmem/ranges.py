"""``RangeMap``: a sparse map from integer intervals to values, used for every per-page state.

Attributes, memslot bindings, allocation, mappings and folio layouts all live in one of these, so
an operation over a range costs what the number of distinct ranges it touches costs — never the
number of pages.  Adjacent ranges holding equal values are always merged (as the kernel's maple
tree does for guest_memfd attributes), so a uniform 1 TiB guest is one entry.

The intervals ``[start, end)`` are disjoint, non-empty, never hold ``default``, never touch an equal
neighbour, and are kept sorted.  Indices not covered hold ``default``.  Three layouts, one behaviour:

* **compiled** (:class:`_NativeRangeMap`, every map made while the optional compiled core
  ``guestmem._rangemap`` is built): chunks of int64 keys packed in arrays, in C.  Every layout's
  class derives from the core's ``Core`` type, and this one's ``get``, ``set``, ``segments``,
  ``all_equal``, ``any_match``, ``items``, ``len`` and ``[]`` *are* the core's C methods, so a
  call costs one C method call: at 1-100 intervals (almost every map in the model) a ``get`` is
  0.02-0.07 µs and a single-page ``set`` that splits or merges 0.12-0.3 µs, against 0.13-0.3 and
  1.2-1.7 µs in the flat Python layout; at a million ranges a random single-page set is 1.1-1.6 µs,
  where Python lists pay a cache and TLB miss per bisect probe (6-9 µs) — ``guestmem bench
  --only rangemap`` measures both in one run.  ``RangeMap(default)`` is made in this layout
  directly by ``Core.__new__``.  The core only takes keys that are exact ints within int64: given
  any other key it calls ``_unsupported`` before changing anything, and the map moves to a Python
  layout for good (a query with int bounds beyond int64 is answered without moving).
  Other C accelerators can call it without a Python method call through the capsule
  ``guestmem._rangemap._C_API`` (documented in the C file).
* **flat** (:class:`RangeMap`, when the core is absent, ``GUESTMEM_PURE=1``, or ``_native`` is
  set to None, up to ``2 * _LOAD`` intervals): three parallel sorted lists (starts, ends,
  values).  Lookups are one ``bisect``; edits splice the lists, whose memmove is negligible at
  this size.
* **chunked** (:class:`_ChunkedRangeMap`, a Python map past ``2 * _LOAD``): the same lists cut
  into chunks of ``_LOAD``..``2 * _LOAD`` intervals, with ``_mins`` holding each chunk's first
  start — the "list of short sorted lists" of ``sortedcontainers``, specialised.  A point lookup
  is two bisects, O(log n); an edit splices one chunk, so its memmove is bounded by the chunk size
  instead of by n (a flat list paid a memmove of the whole tail: 32 µs per single-page set at 200k
  intervals); an edit covering k intervals drops the chunks it covers whole:
  O(log n + k / _LOAD + _LOAD).

All three apply one ``set`` rule to the letter (:meth:`RangeMap.set` says it): which value object
a merged interval keeps and the ``==`` calls made, in order — so a map behaves the same pure or
compiled, even for values whose ``__eq__`` has effects.  ``IMPLEMENTATION`` says which layout new
maps take in this process.

A map switches layout by reassigning ``__class__`` (all classes share one layout in memory): a
Python flat map to chunked when it grows past ``2 * _LOAD`` (or to the compiled layout, when
``_native`` is set again and its keys fit), back to flat when it shrinks below ``_LOAD // 2``
(chunked: to one chunk that small); a compiled map to flat or chunked on a key it cannot hold.
Callers see one type, :class:`RangeMap`, and cannot tell the layouts apart.

A generic ``sortedcontainers.SortedDict`` (start -> (end, value)) was measured against this in
the same runs and is 2-7x slower per single-page set at 10k-1M intervals, 3-5x per point get: a
split is two inserts each paying SortedList's bookkeeping, and finding the interval before a point
needs its positional index.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from guestmem import native

# Not built (no compiler at install time) or GUESTMEM_PURE set: the Python layouts serve.
_native = native.load("_rangemap")
# The compiled module as imported, whatever ``_native`` is later set to: when built, every layout's
# class derives from its ``Core`` (so ``__class__`` can switch between them, and the compiled
# layout's methods are the C ones themselves, with no Python call in between).
_CORE = _native

V = TypeVar("V")

# Which layout new maps take in this process ("c-extension" or "python"); tests and the bench set
# ``_native`` to None to run the Python ones (Core.__new__ reads it, and _LOAD, at each new map).
IMPLEMENTATION = "c-extension" if _native is not None else "python"

# Intervals per chunk: a flat map becomes chunked above 2 * _LOAD; chunks are cut into pieces of
# _LOAD..2 * _LOAD and joined with a neighbour below _LOAD // 2.  512 balances the in-chunk
# memmove (grows with it) against the length of _mins.  Tests lower it to exercise the chunking.
_LOAD = 512

# Intervals per chunk of the compiled core (never more than _LOAD, so tests that lower _LOAD
# exercise its chunking too): its chunks are packed arrays, and at 1M ranges 128 measured faster
# than 512 (an edit's memmove and the chunk's bisect touch fewer cache lines; ``mins`` stays small).
_NATIVE_LOAD = 128

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _set_in(starts: list[int], ends: list[int], values: list[V], start: int, end: int, value: V,
            default: V) -> tuple[int, int] | None:
    """``set(start, end, value)`` on three parallel sorted lists (a flat map, or one chunk): the
    one rule of every layout.  Returns ``(lo, delta)`` -- the first index edited and the change in
    length -- or None when nothing changed (``start >= end`` is the caller's to refuse).

    The value object a merged interval keeps is always ``value``; the ``==`` calls made, in order:
    ``value == default``, then ``left == value`` and ``right == value`` for the intervals cut or
    touched at either end."""
    # Entries [lo, hi) intersect or touch [start, end): i is the last starting before start; a
    # short edit touches one or two entries after it, looked at before bisecting.
    i = bisect_left(starts, start) - 1
    lo = i if i >= 0 and ends[i] >= start else i + 1
    hi = i + 1
    n = len(starts)
    if hi < n and starts[hi] <= end:
        hi += 1
        if hi < n and starts[hi] <= end:
            hi = bisect_right(starts, end, hi + 1)
    is_default = value == default
    if lo == hi:  # touches nothing: a plain insert
        if is_default:
            return None
        starts.insert(lo, start)
        ends.insert(lo, end)
        values.insert(lo, value)
        return lo, 1
    new_s: list[int] = []
    new_e: list[int] = []
    new_v: list[V] = []
    # Left remainder (or untouched left neighbour) of the first touched entry.
    s_lo = starts[lo]
    if s_lo < start:
        v_lo = values[lo]
        if v_lo == value:
            start = s_lo
        else:
            new_s.append(s_lo)
            e_lo = ends[lo]
            new_e.append(e_lo if e_lo < start else start)
            new_v.append(v_lo)
    if not is_default:
        new_s.append(start)
        new_e.append(end)
        new_v.append(value)
    # Right remainder (or untouched right neighbour) of the last touched entry.
    e_hi = ends[hi - 1]
    if e_hi > end:
        v_hi = values[hi - 1]
        if v_hi == value:
            if is_default:  # erasing up to the end of an entry that holds default: impossible
                raise AssertionError("default value stored")
            new_e[-1] = e_hi
        else:
            s_hi = starts[hi - 1]
            new_s.append(s_hi if s_hi > end else end)
            new_e.append(e_hi)
            new_v.append(v_hi)
    starts[lo:hi] = new_s
    ends[lo:hi] = new_e
    values[lo:hi] = new_v
    return lo, len(new_s) - (hi - lo)


class _PyBase:
    """Every layout's base when the compiled core is absent (a class of its own: ``object`` cannot
    precede ``Generic`` in RangeMap's bases)."""

    __slots__ = ()


# Every layout's base: the compiled core's type where it is built.
_Base: Any = _PyBase if _CORE is None else _CORE.Core


class RangeMap(_Base, Generic[V]):
    """Integer intervals -> values, ``default`` elsewhere; equal neighbours always merged.

    This class is the flat layout; a new map takes the compiled layout instead where it is built
    (and ``_native`` is set), and a flat map that grows large turns itself into the chunked one.
    """

    # Flat layout: _starts/_ends/_values.  Chunked layout: _mins/_ss/_es/_vs/_len.  Compiled
    # layout: the fields of the ``Core`` base.  ``default`` is a plain slot in every layout (the
    # core keeps it in sync with its own copy); ``_core`` is never set (the compiled layout used to
    # keep a separate core object there, and C code that finds RangeMap's slots by name still
    # looks it up: it finds the slot, reads it unset, and treats the map as one it does not know).
    __slots__ = ("_core", "_ends", "_es", "_len", "_mins", "_ss", "_starts", "_values", "_vs", "default")

    def __init__(self, default: V) -> None:
        # (While ``_native`` is set, ``Core.__new__`` makes a new map as ``_NativeRangeMap``
        # instead, and this is not run.)
        self.default: V = default
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._values: list[V] = []

    # --- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of stored (non-default) intervals."""
        return len(self._starts)

    def get(self, index: int) -> V:
        """The value at ``index``: one bisect."""
        i = bisect_right(self._starts, index) - 1
        if i >= 0 and index < self._ends[i]:
            return self._values[i]
        return self.default

    __getitem__ = get

    def items(self) -> Iterator[tuple[int, int, V]]:
        """The stored intervals, in order (default-valued gaps are not yielded)."""
        return zip(self._starts, self._ends, self._values, strict=True)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
        """Cover ``[start, end)`` exactly with maximal pieces ``(s, e, value)``, gaps as ``default``.

        O(log n) to find the first piece, then O(1) per piece.
        """
        if start >= end:
            return
        starts, ends, values = self._starts, self._ends, self._values
        i = bisect_right(starts, start) - 1
        if i < 0 or ends[i] <= start:
            i += 1
        pos = start
        default = self.default
        n = len(starts)
        while i < n:
            s = starts[i]
            if s >= end:
                yield pos, end, default
                return
            if s > pos:
                yield pos, s, default
                pos = s
            e = ends[i]
            if e >= end:
                yield pos, end, values[i]
                return
            yield pos, e, values[i]
            pos = e
            i += 1
        yield pos, end, default

    def all_equal(self, start: int, end: int, value: V) -> bool:
        """True if every index in ``[start, end)`` holds ``value``."""
        return all(v == value for _, _, v in self.segments(start, end))

    def any_match(self, start: int, end: int, pred: Callable[[V], bool]) -> bool:
        """True if some index in ``[start, end)`` has a value satisfying ``pred``."""
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
        """Assign ``value`` to ``[start, end)`` (``default`` erases), merging equal neighbours.

        The one rule of every layout (the chunked one applies it within a chunk, the compiled one
        in C): which value object a merged interval keeps — always ``value`` — and the ``==`` calls
        made, in order: ``value == default``, then ``left == value`` and ``right == value`` for the
        intervals cut or touched at either end.
        """
        if start >= end:
            return
        starts = self._starts
        changed = _set_in(starts, self._ends, self._values, start, end, value, self.default)
        if changed is not None and len(starts) > 2 * _LOAD:
            self._grow()

    def _grow(self) -> None:
        """Leave the flat layout: for the compiled one where it is built and takes these keys, else
        (when large) for the chunked one."""
        if _native is not None:
            try:
                self._reset(min(_LOAD, _NATIVE_LOAD), self.default)
                self._load(self._starts, self._ends, self._values)
            except _native.Unsupported:  # a key beyond int64 (or not an int): stay in Python
                pass
            else:
                self._starts, self._ends, self._values = [], [], []
                self.__class__ = _NativeRangeMap
                return
        if len(self._starts) > 2 * _LOAD:
            self._to_chunked()

    def _to_chunked(self) -> None:
        """Switch to the chunked layout: cut the flat lists into chunks of ``_LOAD``."""
        starts, ends, values = self._starts, self._ends, self._values
        cuts = range(0, len(starts), _LOAD)
        self._mins = [starts[k] for k in cuts]
        self._ss = [starts[k : k + _LOAD] for k in cuts]
        self._es = [ends[k : k + _LOAD] for k in cuts]
        self._vs = [values[k : k + _LOAD] for k in cuts]
        self._len = len(starts)
        self._starts, self._ends, self._values = [], [], []
        self.__class__ = _ChunkedRangeMap

    def clear(self) -> None:
        """Forget every interval: all indices hold ``default``."""
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
        """An independent map with the same intervals (values are shared, not copied)."""
        other = _new_flat(self.default)
        other._starts = self._starts.copy()
        other._ends = self._ends.copy()
        other._values = self._values.copy()
        return other

    def __reduce__(self) -> tuple[Callable[..., RangeMap[V]], tuple[object, ...]]:
        """Pickle and ``copy.deepcopy`` through the intervals (whatever the layout)."""
        starts: list[int] = []
        ends: list[int] = []
        values: list[V] = []
        for s, e, v in self.items():
            starts.append(s)
            ends.append(e)
            values.append(v)
        return _rebuild, (self.default, starts, ends, values)

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


class _ChunkedRangeMap(RangeMap[V]):
    """The chunked layout of a large :class:`RangeMap` (see the module docstring).

    Never constructed directly: a flat map becomes one by ``_to_chunked`` and it holds at least one
    chunk for as long as it lives in this class.  Query helpers (``all_equal``, ``count``...),
    ``update`` and ``__repr__`` are inherited: they only use ``segments``, ``items`` and ``set``.
    """

    __slots__ = ()

    def __len__(self) -> int:
        """Number of stored intervals, kept as a count (chunks would make ``len`` O(n / _LOAD))."""
        return self._len

    def get(self, index: int) -> V:
        """The value at ``index``: two bisects, O(log n)."""
        c = bisect_right(self._mins, index) - 1
        if c >= 0:
            i = bisect_right(self._ss[c], index) - 1  # >= 0: the chunk's first start <= index
            if index < self._es[c][i]:
                return self._vs[c][i]
        return self.default

    __getitem__ = get

    def items(self) -> Iterator[tuple[int, int, V]]:
        """The stored intervals, in order (default-valued gaps are not yielded)."""
        for s, e, v in zip(self._ss, self._es, self._vs, strict=True):
            yield from zip(s, e, v, strict=True)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
        """Cover ``[start, end)`` exactly with maximal pieces ``(s, e, value)``, gaps as ``default``.

        O(log n) to find the first piece, then O(1) per piece.
        """
        if start >= end:
            return
        default = self.default
        c = bisect_right(self._mins, start) - 1
        if c < 0:
            c, i = 0, 0
        else:
            i = bisect_right(self._ss[c], start) - 1
            if self._es[c][i] <= start:
                i += 1
        pos = start
        nchunks = len(self._mins)
        while c < nchunks:
            starts, ends, values = self._ss[c], self._es[c], self._vs[c]
            n = len(starts)
            while i < n:
                s = starts[i]
                if s >= end:
                    yield pos, end, default
                    return
                if s > pos:
                    yield pos, s, default
                    pos = s
                e = ends[i]
                if e >= end:
                    yield pos, end, values[i]
                    return
                yield pos, e, values[i]
                pos = e
                i += 1
            c += 1
            i = 0
        yield pos, end, default

    def set(self, start: int, end: int, value: V) -> None:
        """Assign ``value`` to ``[start, end)`` (``default`` erases), merging equal neighbours.

        Every interval that intersects or touches ``[start, end)`` lies in chunks ``c..ch``; the
        ones strictly between are covered whole and dropped, ``c`` and ``ch`` are joined and the
        splice happens in that one chunk.
        """
        if start >= end:
            return
        mins = self._mins
        # c: the last chunk whose first start is < start (entries before it end before start);
        # entries after the last chunk whose first start is <= end start after end.
        c = bisect_left(mins, start) - 1
        if c < 0:
            c = 0
        if c + 1 < len(mins) and mins[c + 1] <= end:
            self._join(c, bisect_right(mins, end) - 1)
        starts = self._ss[c]
        # (the rule below, within this chunk: one bisect finds the last entry starting before
        # ``start``; a short edit touches one or two entries after it, looked at before bisecting,
        # since each cold bisect costs µs at 1M)
        res = _set_in(starts, self._es[c], self._vs[c], start, end, value, self.default)
        if res is None:
            return
        lo, delta = res
        self._len += delta
        if lo == 0 and starts:
            mins[c] = starts[0]
        n = len(starts)
        if n > 2 * _LOAD or n < _LOAD // 2:
            self._fixup(c, 0)

    def _join(self, c: int, ch: int) -> None:
        """Make chunk ``c`` hold chunks ``c..ch``: those strictly between are dropped whole, which
        is only right when ``set`` is about to overwrite them (every entry in them is covered)."""
        n_dropped = 0
        for k in range(c + 1, ch):
            n_dropped += len(self._ss[k])
        self._ss[c] += self._ss[ch]
        self._es[c] += self._es[ch]
        self._vs[c] += self._vs[ch]
        del self._mins[c + 1 : ch + 1], self._ss[c + 1 : ch + 1]
        del self._es[c + 1 : ch + 1], self._vs[c + 1 : ch + 1]
        self._len -= n_dropped

    def _fixup(self, c: int, delta: int) -> None:
        """Chunk ``c`` gained ``delta`` entries (maybe negative): keep the count, ``_mins`` and the
        chunk sizes right — drop it when empty, cut it into pieces of _LOAD..2*_LOAD above
        2 * _LOAD, join it to a neighbour below _LOAD // 2 (so chunks stay few and full)."""
        self._len += delta
        starts = self._ss[c]
        if not starts:
            del self._mins[c], self._ss[c], self._es[c], self._vs[c]
            if not self._mins:
                self._to_flat()
            return
        self._mins[c] = starts[0]
        n = len(starts)
        if n > 2 * _LOAD:
            pieces = n // _LOAD
            size = -(-n // pieces)
            ends, values = self._es[c], self._vs[c]
            cuts = range(size, n, size)
            self._mins[c + 1 : c + 1] = [starts[k] for k in cuts]
            self._ss[c + 1 : c + 1] = [starts[k : k + size] for k in cuts]
            self._es[c + 1 : c + 1] = [ends[k : k + size] for k in cuts]
            self._vs[c + 1 : c + 1] = [values[k : k + size] for k in cuts]
            del starts[size:], ends[size:], values[size:]
        elif n < _LOAD // 2 and len(self._mins) > 1:
            if c + 1 == len(self._mins):
                c -= 1
            self._ss[c] += self._ss[c + 1]
            self._es[c] += self._es[c + 1]
            self._vs[c] += self._vs[c + 1]
            del self._mins[c + 1], self._ss[c + 1], self._es[c + 1], self._vs[c + 1]
            self._fixup(c, 0)
        elif n < _LOAD // 2:  # the only chunk, and small
            self._to_flat()

    def _to_flat(self) -> None:
        """Switch back to the flat layout (at most one chunk left)."""
        if self._ss:
            self._starts, self._ends, self._values = self._ss[0], self._es[0], self._vs[0]
        else:
            self._starts, self._ends, self._values = [], [], []
        del self._mins, self._ss, self._es, self._vs, self._len
        self.__class__ = RangeMap

    def clear(self) -> None:
        """Forget every interval: all indices hold ``default`` (and the map is flat again)."""
        self._ss.clear()
        self._to_flat()

    def copy(self) -> RangeMap[V]:
        """An independent map with the same intervals (values are shared, not copied)."""
        other = _new_flat(self.default)
        other.__class__ = _ChunkedRangeMap
        other._mins = self._mins.copy()
        other._ss = [s.copy() for s in self._ss]
        other._es = [e.copy() for e in self._es]
        other._vs = [v.copy() for v in self._vs]
        other._len = self._len
        return other

    def check(self) -> None:
        """Assert the representation invariants (sorted, disjoint, non-empty, merged, no default;
        chunks non-empty, parallel, indexed by ``_mins``; the count right)."""
        assert len(self._mins) == len(self._ss) == len(self._es) == len(self._vs)
        for m, s, e, v in zip(self._mins, self._ss, self._es, self._vs, strict=True):
            assert s and len(s) == len(e) == len(v), (len(s), len(e), len(v))
            assert m == s[0], (m, s[0])
            assert len(s) <= 2 * _LOAD, len(s)
        assert self._len == sum(len(s) for s in self._ss), (self._len,)
        prev_end, prev_v = None, None
        for s, e, v in self.items():
            assert s < e, (s, e)
            assert v != self.default, (s, e, v)
            if prev_end is not None:
                assert prev_end <= s, (prev_end, s)
                assert not (prev_end == s and prev_v == v), ("unmerged", s, v)
            prev_end, prev_v = e, v


def _new_flat(default: V) -> RangeMap[V]:
    """An empty map in the flat layout, whatever ``_native`` says (``__init__`` is not run)."""
    m: RangeMap[V] = _Base.__new__(RangeMap)
    m.default = default
    m._starts, m._ends, m._values = [], [], []
    return m


def _rebuild(default: V, starts: list[int], ends: list[int], values: list[V]) -> RangeMap[V]:
    """A map holding these (sorted, merged) intervals, in the layout a new map of them would have:
    how a map is unpickled and deep-copied."""
    m = _new_flat(default)
    m._starts, m._ends, m._values = starts, ends, values
    if _native is not None or len(starts) > 2 * _LOAD:
        m._grow()
    return m


if _CORE is not None:
    _Core = _CORE.Core

    class _NativeRangeMap(RangeMap[V]):
        """The compiled layout of a :class:`RangeMap`: its ``Core`` base holds the intervals, and
        the methods below are the core's own (C, called with no Python frame in between).

        A key the core cannot hold (not an exact int, or beyond int64) makes the core call
        ``_unsupported`` before it changed anything: the map moves to a Python layout for good
        and the call is made again there (a query with int bounds beyond int64 is answered here).
        """

        __slots__ = ()

        __init__ = _Core.__init__  # all done by Core.__new__
        get = _Core.get
        __getitem__ = _Core.__getitem__
        __len__ = _Core.__len__
        set = _Core.set
        segments = _Core.segments
        all_equal = _Core.all_equal
        any_match = _Core.any_match
        items = _Core.items
        clear = _Core.clear
        copy = _Core.copy

        def _unsupported(self, name: str, *args: Any) -> Any:
            """Called by the core for a key it cannot hold, before it changed anything."""
            if name == "segments" and type(args[0]) is int and type(args[1]) is int:
                return self._segments_wide(args[0], args[1])
            if name in ("all_equal", "any_match"):  # over segments, which knows what to do
                return getattr(RangeMap, name)(self, *args)
            self._to_python()
            return getattr(self, name)(*args)

        def _segments_wide(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
            """``segments`` for int bounds beyond int64: every stored key is within it, so the
            pieces are the core's over the clamped bounds, with the default gaps at either end
            widened."""
            if start >= end:
                return
            lo, hi = max(start, _I64_MIN), min(end, _I64_MAX)
            default = self.default
            if lo >= hi:
                yield start, end, default
                return
            pieces = list(_Core.segments(self, lo, hi))
            _, e0, v0 = pieces[0]
            if start < lo:
                if v0 is default:  # a gap (stored values never equal default): widen it
                    pieces[0] = (start, e0, v0)
                else:
                    pieces.insert(0, (start, lo, default))
            s1, _, v1 = pieces[-1]
            if end > hi:
                if v1 is default:
                    pieces[-1] = (s1, end, v1)
                else:
                    pieces.append((hi, end, default))
            yield from pieces

        def _to_python(self) -> None:
            """Move to a Python layout (a key the core cannot hold has arrived): flat, or chunked
            when large."""
            starts, ends, values = self._export()
            _Core.clear(self)
            self.__class__ = RangeMap
            self._starts, self._ends, self._values = starts, ends, values
            if len(starts) > 2 * _LOAD:
                self._to_chunked()

        def check(self) -> None:
            """Assert the representation invariants (the core's structure, then the intervals)."""
            self._check_core()
            assert len(self) == sum(1 for _ in self.items())
            RangeMap.check(self)

    _CORE._register(RangeMap, _NativeRangeMap, globals())
