"""RangeMap against a per-index reference, driven by hypothesis, in every layout it has.

Maps live in the compiled core (``guestmem._rangemap``) at every size where it is built, and in
the Python flat and chunked layouts otherwise; both are tested in every run (the compiled one is
skipped, saying so, when it is not built), and they are compared with each other op by op.
tests/test_ranges_layouts.py holds the small-map side (same ``==`` calls, pickles, the C API).
"""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ranges_layout import BUILT as _BUILT
from ranges_layout import layout

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


IMPLS = ["python", "c-extension"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("load", [2, 3, 6, 512])
@settings(max_examples=120, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=60), queries=st.lists(st.tuples(index, index), max_size=6),
       default=st.integers(0, 1))
def test_every_method_matches_reference(impl, load, ops, queries, default):
    """``load`` 2 and 3 push maps through the large layout (and back) after a handful of edits."""
    with layout(impl, load):
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


@pytest.mark.parametrize("impl", IMPLS)
def test_large_map_round_trip_through_the_large_layout(impl):
    """Thousands of intervals (native or chunked), a wide edit over all of them, then erased: a
    Python map is flat again, a compiled one stays compiled (it has no size threshold)."""
    with layout(impl):
        if impl == "c-extension":
            _round_trip("_NativeRangeMap", "_NativeRangeMap")
        else:
            _round_trip("_ChunkedRangeMap", "RangeMap")


def _round_trip(large: str, small: str) -> None:
    n = 5000
    m: RangeMap[int] = RangeMap(0)
    ref = [0] * (4 * n)
    for i in range(n):
        m.set(4 * i, 4 * i + 3, 1 + i % 3)
        ref[4 * i : 4 * i + 3] = [1 + i % 3] * 3
    m.check()
    assert len(m) == n and type(m).__name__ == large
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
    assert len(m) == 0 and type(m).__name__ == small and list(m.segments(0, 5)) == [(0, 5, 0)]


# --- long random sequences against a per-page dict ------------------------------------------------

PAGES = 160
page_op = st.one_of(
    st.tuples(st.just("page"), st.integers(0, PAGES - 1), st.just(1), st.integers(0, 4)),  # one page
    st.tuples(st.just("page"), st.integers(0, PAGES - 1), st.just(1), st.integers(0, 4)),
    st.tuples(st.just("run"), st.integers(-2, PAGES), st.integers(0, 40), st.integers(0, 4)),
    st.tuples(st.just("bump"), st.integers(-2, PAGES), st.integers(0, 40), st.integers(1, 4)),
)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("load", [4, 8, 512])
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(page_op, min_size=50, max_size=400))
def test_long_sequences_match_a_per_page_dict(impl, load, ops):
    """Hundreds of mostly single-page edits (splits and merges, as a fault storm makes them) on a
    map that grows past the flat layout and shrinks back (load 4 and 8), or stays small (512: the
    flat layout, or the compiled one at a small size): every page, every stored interval and
    every piece of ``segments`` agree with a dict of pages after every step."""
    with layout(impl, load):
        m: RangeMap[int] = RangeMap(0)
        pages: dict[int, int] = {}
        for kind, s, k, v in ops:
            e = s + k
            if kind == "bump":
                m.update(s, e, lambda old, d=v: (old + d) % 5)
                for p in range(s, e):
                    pages[p] = (pages.get(p, 0) + v) % 5
            else:
                m.set(s, e, v)
                for p in range(s, e):
                    pages[p] = v
            m.check()
            for p in range(s - 1, e + 1):
                assert m.get(p) == pages.get(p, 0), (p, kind, s, e)
        want = [pages.get(p, 0) for p in range(-3, PAGES + 41)]
        assert [m.get(p) for p in range(-3, PAGES + 41)] == want
        got = []
        for s, e, v in m.segments(-3, PAGES + 41):
            got += [v] * (e - s)
        assert got == want
        covered = {p: v for s, e, v in m.items() for p in range(s, e)}
        assert covered == {p: v for p, v in pages.items() if v != 0}


# --- the compiled core and the Python layout: the same intervals, the same value objects ---------

NAN = math.nan
VALUES = [1, 1.0, 2, (1, 2), (1, 2), NAN, NAN, "x", None, 0, False]  # equal-but-distinct objects


@pytest.mark.skipif(_BUILT is None, reason="guestmem._rangemap is not built")
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8), st.integers(0, len(VALUES) - 1)),
                    min_size=1, max_size=120),
       default=st.sampled_from([0, None]))
def test_native_and_python_layouts_keep_the_same_objects(ops, default):
    """Which value object a merged interval keeps, and merges decided by ``==`` exactly as Python
    does (NaN never equals itself, 1 == 1.0 == True, equal tuples merge): op by op the compiled
    core holds the very objects the Python chunked layout holds."""
    with layout("python", 2):
        py: RangeMap[object] = RangeMap(default)
    with layout("c-extension", 2):
        nat: RangeMap[object] = RangeMap(default)
    for s, k, vi in ops:
        value = VALUES[vi]
        with layout("python", 2):
            py.set(s, s + k, value)
        with layout("c-extension", 2):
            nat.set(s, s + k, value)
            nat.check()
        a, b = list(py.items()), list(nat.items())
        assert [(s, e) for s, e, _ in a] == [(s, e) for s, e, _ in b]
        assert all(x is y for (_, _, x), (_, _, y) in zip(a, b, strict=True))


@pytest.mark.skipif(_BUILT is None, reason="guestmem._rangemap is not built")
@pytest.mark.parametrize("seed", range(6))
def test_native_matches_python_over_long_seeded_runs(seed):
    """Thousands of edits (page flips, short runs, a few wide erasures that empty and fold chunks)
    at several chunk sizes: the compiled core and the Python layout agree throughout.  (Seed 4
    found a chunk folded into its predecessor twice in one edit, then read after it was freed.)"""
    rnd = random.Random(seed)
    load = rnd.choice([4, 16, 64, 512])
    span = rnd.choice([2000, 20000, 200000])
    wide = 0.1 if seed % 2 == 0 else 0.005
    with layout("python", load):
        py: RangeMap[int] = RangeMap(0)
    with layout("c-extension", load):
        nat: RangeMap[int] = RangeMap(0)
    for step in range(3000):
        r = rnd.random()
        s = rnd.randrange(span)
        e = s + (1 if r < 0.6 else rnd.randrange(1, 50) if r < 1 - wide else rnd.randrange(1, span // 3))
        v = rnd.randrange(4)
        with layout("python", load):
            py.set(s, e, v)
        with layout("c-extension", load):
            nat.set(s, e, v)
            q = rnd.randrange(span)
            assert nat.get(q) == py.get(q)
            if step % 100 == 0 or r >= 1 - wide:
                nat.check()
                assert list(nat.items()) == list(py.items()), step
                a = rnd.randrange(span)
                b = a + rnd.randrange(span // 2)
                assert list(nat.segments(a, b)) == list(py.segments(a, b))


def test_native_map_takes_any_int_key_by_moving_to_python():
    """Keys beyond int64 (or bounds beyond it in a query) on a native map: the same answers."""
    with layout("c-extension", 2):
        m: RangeMap[int] = RangeMap(0)
        for i in range(10):
            m.set(4 * i, 4 * i + 3, 1 + i % 2)
        assert type(m).__name__ == "_NativeRangeMap"
        assert list(m.segments(-(2**70), 3)) == [(-(2**70), 0, 0), (0, 3, 1)]
        assert list(m.segments(37, 2**64)) == [(37, 39, 2), (39, 2**64, 0)]
        assert list(m.segments(2**64, 2**65)) == [(2**64, 2**65, 0)]
        assert list(m.segments(2**65, 2**64)) == []
        assert m.get(2**64) == 0 and m.get(-(2**64)) == 0
        m.set(2**63 - 2, 2**63 - 1, 2)  # the largest int64 end still fits
        assert type(m).__name__ == "_NativeRangeMap" and m.get(2**63 - 2) == 2
        m.set(2**63, 2**63, 1)  # empty: changes nothing, whatever the size
        assert type(m).__name__ == "_NativeRangeMap"
        m.set(2**63 - 1, 2**64, 2)  # merges with [2**63 - 2, 2**63 - 1): must leave the core
        assert type(m).__name__ == "_ChunkedRangeMap"
        m.check()
        assert m.get(2**63 + 5) == 2 and list(m.items())[-1] == (2**63 - 2, 2**64, 2)
        assert m.get(1) == 1 and len(m) == 11


@pytest.mark.skipif(_BUILT is None, reason="guestmem._rangemap is not built")
def test_native_set_survives_an_eq_that_edits_the_map():
    """Comparing values may run Python code (another thread, or this ``__eq__``) that edits the
    map between the core's lookups and its splice: the core notices and looks again, so the map
    ends up as the inner edit followed by the outer one, and stays consistent."""

    class Meddler:
        """Equal to nothing; the first comparisons erase a neighbourhood of the map."""

        def __init__(self, m: RangeMap[object], todo: list[tuple[int, int]]) -> None:
            self.m, self.todo = m, todo

        def __eq__(self, other: object) -> bool:
            if self.todo:
                s, e = self.todo.pop()
                self.m.set(s, e, 0)
            return False

        __hash__ = None  # type: ignore[assignment]

    with layout("c-extension", 4):
        m: RangeMap[object] = RangeMap(0)
        ref: dict[int, object] = {}
        for i in range(200):
            m.set(3 * i, 3 * i + 2, 1 + i % 2)
            ref.update({p: 1 + i % 2 for p in range(3 * i, 3 * i + 2)})
        assert type(m).__name__ == "_NativeRangeMap"
        todo = [(250, 400), (90, 130), (0, 60)]
        edits = list(todo)
        value = Meddler(m, todo)
        m.set(100, 301, value)
        m.check()
        for s, e in reversed(edits):
            for p in range(s, e):
                ref.pop(p, None)
        ref.update({p: value for p in range(100, 301)})
        assert {p: v for s, e, v in m.items() for p in range(s, e)} == ref


@pytest.mark.parametrize("impl", IMPLS)
def test_large_maps_pickle_and_deepcopy(impl):
    """A large map (in either layout) survives pickle and ``copy.deepcopy`` whole and independent."""
    import copy
    import pickle

    with layout(impl, 4):
        m: RangeMap[object] = RangeMap(None)
        for i in range(50):
            m.set(2 * i, 2 * i + 1, [i])
        for twin in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            twin.check()
            assert type(twin) is type(m) and list(twin.items()) == list(m.items())
            twin.set(0, 1, None)
            assert m.get(0) == [0] and twin.get(0) is None and len(twin) == 49
