"""RangeMap against a per-index reference, driven by hypothesis."""

from hypothesis import given, settings
from hypothesis import strategies as st

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
