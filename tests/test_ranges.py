"""RangeMap against a per-index reference, driven by hypothesis."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import ranges
from guestmem.ranges import RangeMap

N = 48
edits = st.lists(
    st.tuples(st.integers(0, N), st.integers(0, N), st.integers(0, 3)), min_size=1, max_size=40
)


@settings(max_examples=300, deadline=None)
@given(edits, st.integers(0, N), st.integers(0, N))
def test_rangemap_matches_reference(ops, a, b):
    m: RangeMap[int] = RangeMap(0)
    ref = [0] * N
    for s, e, v in ops:
        s, e = min(s, e), max(s, e)
        m.set(s, e, v)
        ref[s:e] = [v] * (e - s)
        m.check()
        assert [m.get(i) for i in range(N)] == ref
    a, b = min(a, b), max(a, b)
    covered = []
    for s, e, v in m.segments(a, b):
        covered += [v] * (e - s)
    assert covered == ref[a:b]
    assert m.count(a, b, lambda v: v == 1) == ref[a:b].count(1)
    first = m.first_match(a, b, lambda v: v == 2)
    assert first == (a + ref[a:b].index(2) if 2 in ref[a:b] else None)


def test_uniform_range_is_one_entry():
    m: RangeMap[int] = RangeMap(0)
    tib_pages = (1 << 40) >> 12
    for i in range(0, tib_pages, 1 << 18):
        m.set(i, i + (1 << 18), 8)
    assert len(m) == 1
    m.set(5, 6, 0)
    assert len(m) == 2 and m.get(5) == 0 and m.get(6) == 8


# --- every method against a piecewise reference, on any integers, in both layouts -----------------

LO, HI = -(2**70), 2**70  # beyond every index drawn below


class _Ref:
    """The obvious model: a list of pieces covering [LO, HI), merged after every edit."""

    def __init__(self, default: int) -> None:
        self.default = default
        self.pieces: list[list[int]] = [[LO, HI, default]]

    def _split(self, x: int) -> None:
        for k, (s, e, v) in enumerate(self.pieces):
            if s < x < e:
                self.pieces[k : k + 1] = [[s, x, v], [x, e, v]]
                return

    def _apply(self, start: int, end: int, fn) -> None:
        if start >= end:
            return
        self._split(start)
        self._split(end)
        for p in self.pieces:
            if start <= p[0] and p[1] <= end:
                p[2] = fn(p[2])
        merged: list[list[int]] = []
        for p in self.pieces:
            if merged and merged[-1][2] == p[2]:
                merged[-1][1] = p[1]
            else:
                merged.append(list(p))
        self.pieces = merged

    def set(self, start: int, end: int, value: int) -> None:
        self._apply(start, end, lambda _v: value)

    def update(self, start: int, end: int, fn) -> None:
        self._apply(start, end, fn)

    def get(self, x: int) -> int:
        return next(v for s, e, v in self.pieces if s <= x < e)

    def items(self) -> list[tuple[int, int, int]]:
        return [(s, e, v) for s, e, v in self.pieces if v != self.default]

    def segments(self, a: int, b: int) -> list[tuple[int, int, int]]:
        if a >= b:
            return []
        return [(max(s, a), min(e, b), v) for s, e, v in self.pieces if s < b and e > a]


index = st.one_of(
    st.integers(-8, 80),  # dense: lots of touching and overlapping intervals
    st.integers(2**64 - 8, 2**64 + 8),  # around 2**64
    st.integers(-(2**64), 2**64),  # anywhere, negatives included
)
op = st.one_of(
    st.tuples(st.just("set"), index, index, st.integers(0, 3)),
    st.tuples(st.just("short"), index, st.integers(0, 6), st.integers(0, 3)),  # set [s, s + k)
    st.tuples(st.just("update"), index, index, st.integers(1, 3)),
    st.tuples(st.just("clear"), st.just(0), st.just(0), st.just(0)),
)


def _check_queries(m: RangeMap[int], ref: _Ref, a: int, b: int) -> None:
    """Every query method over [a, b) (a >= b included) and at a, against the reference."""
    assert m.get(a) == m[a] == ref.get(a)
    segs = ref.segments(a, b)
    assert list(m.segments(a, b)) == segs
    assert m.all_equal(a, b, 1) == all(v == 1 for _, _, v in segs)
    assert m.any_match(a, b, lambda v: v == 2) == any(v == 2 for _, _, v in segs)
    assert m.first_match(a, b, lambda v: v == 3) == next((s for s, _, v in segs if v == 3), None)
    assert m.count(a, b, lambda v: v > 1) == sum(e - s for s, e, v in segs if v > 1)
    assert m.distinct(a, b) == len(segs)


@pytest.mark.parametrize("load", [2, 3, 512])
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=60), queries=st.lists(st.tuples(index, index), max_size=6),
       default=st.integers(0, 1))
def test_every_method_matches_reference(load, ops, queries, default):
    """``load`` 2 and 3 push maps through the chunked layout (and back) after a handful of edits."""
    saved, ranges._LOAD = ranges._LOAD, load
    try:
        m: RangeMap[int] = RangeMap(default)
        ref = _Ref(default)
        for kind, s, x, v in ops:
            e = s + x if kind == "short" else x
            if kind in ("set", "short"):
                m.set(s, e, v)
                ref.set(s, e, v)
            elif kind == "update":
                m.update(s, e, lambda old, k=v: (old + k) % 4)
                ref.update(s, e, lambda old, k=v: (old + k) % 4)
            else:
                m.clear()
                ref = _Ref(default)
            m.check()
            assert list(m.items()) == ref.items()
            assert len(m) == len(ref.items())
        for a, b in queries + [(s, s + 1) for _, s, _, _ in ops[:4]]:
            _check_queries(m, ref, a, b)
        # copy() is independent of its source in both directions.
        c = m.copy()
        c.check()
        assert list(c.items()) == ref.items()
        c.set(LO + 1, HI - 1, 3)
        assert list(m.items()) == ref.items()
        m.set(0, 10, 2)
        assert list(c.items()) == [(LO + 1, HI - 1, 3)]
    finally:
        ranges._LOAD = saved


def test_large_map_round_trip_through_the_chunked_layout():
    """Thousands of intervals (chunked), a wide edit over all of them, then erased to nothing."""
    n = 5000
    m: RangeMap[int] = RangeMap(0)
    ref = [0] * (4 * n)
    for i in range(n):
        m.set(4 * i, 4 * i + 3, 1 + i % 3)
        ref[4 * i : 4 * i + 3] = [1 + i % 3] * 3
    m.check()
    assert len(m) == n and type(m).__name__ == "_ChunkedRangeMap"
    for lo, hi, v in ((10, 13_000, 2), (0, 1, 0), (7, 8, 3), (19_000, 19_999, 0)):
        m.set(lo, hi, v)
        ref[lo:hi] = [v] * (hi - lo)
        m.check()
    assert [m.get(i) for i in range(4 * n)] == ref
    pieces = []
    for s, e, v in m.segments(0, 4 * n):
        pieces += [v] * (e - s)
    assert pieces == ref
    assert m.count(0, 4 * n, bool) == sum(1 for v in ref if v)
    m.set(-1, 4 * n, 0)
    m.check()
    assert len(m) == 0 and type(m) is RangeMap and list(m.segments(0, 5)) == [(0, 5, 0)]
