"""RangeMap's three layouts (flat, chunked, compiled) are one behaviour at every size.

The compiled layout (``guestmem._rangemap``) now serves maps from their first interval, so small
maps — most of the model's — run C where it is built and the flat Python layout otherwise.  These
tests hold the two to the same rule: the same ``==`` calls in the same order, the same value
objects kept, the same answers from every method, the same pickles, and a working C API for other
accelerators.  Tests that need the compiled layout are skipped, saying so, when it is not built.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import pickle
import weakref
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ranges_layout import BUILT as _BUILT
from ranges_layout import layout

from guestmem.ranges import RangeMap

needs_core = pytest.mark.skipif(_BUILT is None, reason="guestmem._rangemap is not built")

# (implementation, _LOAD): flat only (512), flat then chunked (2), compiled (512 and 2).
LAYOUTS = [("python", 512), ("python", 2), ("c-extension", 512), ("c-extension", 2)]


class Logged:
    """A value whose ``==`` is recorded (with both operands) and decided by ``key``."""

    log: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, ident: int, key: int) -> None:
        self.ident, self.key = ident, key

    def __eq__(self, other: object) -> bool:
        o = other.ident if isinstance(other, Logged) else -1
        Logged.log.append((self.ident, o))
        return isinstance(other, Logged) and other.key == self.key

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"L{self.ident}/{self.key}"


edit = st.tuples(st.integers(0, 40), st.integers(0, 6), st.integers(0, 3))


def _replay(impl: str, load: int, ops: list[tuple[int, int, int]]) -> tuple[list[Any], list[Any]]:
    """Run the edits with fresh Logged values (ident = op number, key from the op; key 0 equals
    the default): the ``==`` log and, after each op, the stored intervals with value identities."""
    Logged.log = []
    trace: list[Any] = []
    with layout(impl, load):
        m: RangeMap[Logged] = RangeMap(Logged(-2, 0))
        for n, (s, k, key) in enumerate(ops):
            m.set(s, s + k, Logged(n, key))
            trace.append([(a, b, v.ident) for a, b, v in m.items()])
    return list(Logged.log), trace


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(edit, min_size=1, max_size=50))
def test_every_layout_makes_the_same_eq_calls_and_keeps_the_same_objects(ops):
    """Values with a recording ``__eq__``: flat, chunked and compiled maps call ``==`` with the
    same operands in the same order, and keep the very same value objects, op by op."""
    want_log, want_trace = _replay("python", 512, ops)
    for impl, load in LAYOUTS[1:]:
        if impl == "c-extension" and _BUILT is None:
            continue
        log, trace = _replay(impl, load, ops)
        assert trace == want_trace, (impl, load)
        assert log == want_log, (impl, load)


PAGES = 64
page_op = st.one_of(
    st.tuples(st.just("set"), st.integers(-1, PAGES), st.integers(1, 1), st.integers(0, 4)),
    st.tuples(st.just("set"), st.integers(-1, PAGES), st.integers(0, 12), st.integers(0, 4)),
    st.tuples(st.just("bump"), st.integers(-1, PAGES), st.integers(0, 12), st.integers(1, 4)),
    st.tuples(st.just("clear"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("copy"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("pickle"), st.just(0), st.just(0), st.just(0)),
)


@pytest.mark.parametrize(("impl", "load"), LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(page_op, min_size=1, max_size=80), default=st.integers(0, 1))
def test_small_maps_match_a_per_page_dict(impl, load, ops, default):
    """Small maps (a few to a few dozen intervals, where the model lives) in every layout, against
    a dict of pages after every step: get, [], segments, items, len, all_equal, any_match,
    first_match, count, distinct; copy and pickle round trips included."""
    with layout(impl, load):
        m: RangeMap[int] = RangeMap(default)
        pages: dict[int, int] = {}
        for kind, s, k, v in ops:
            e = s + k
            if kind == "set":
                m.set(s, e, v)
                pages.update({p: v for p in range(s, e)})
            elif kind == "bump":
                m.update(s, e, lambda old, d=v: (old + d) % 5)
                for p in range(s, e):
                    pages[p] = (pages.get(p, default) + v) % 5
            elif kind == "clear":
                m.clear()
                pages = {}
            elif kind == "copy":
                twin = m.copy()
                twin.set(0, PAGES, 4)
                _compare(m, pages, default)  # the source did not see the copy's edit
                m = twin
                pages = pages | {p: 4 for p in range(PAGES)}
            else:
                m = pickle.loads(pickle.dumps(m))
            m.check()
            _compare(m, pages, default)


def _compare(m: RangeMap[int], pages: dict[int, int], default: int) -> None:
    want = [pages.get(p, default) for p in range(-3, PAGES + 16)]
    assert [m.get(p) for p in range(-3, PAGES + 16)] == want
    assert [m[p] for p in range(-3, PAGES + 16)] == want
    got: list[int] = []
    for s, e, v in m.segments(-3, PAGES + 16):
        got += [v] * (e - s)
    assert got == want
    stored = {p: v for s, e, v in m.items() for p in range(s, e)}
    assert stored == {p: v for p, v in pages.items() if v != default}
    assert len(m) == len(list(m.items()))
    for a in range(-2, PAGES + 4, 5):
        for b in (a, a + 1, a + 7):
            piece = want[a + 3 : b + 3]
            assert m.all_equal(a, b, 2) == all(x == 2 for x in piece)
            assert m.any_match(a, b, lambda x: x == 3) == any(x == 3 for x in piece)
            assert m.first_match(a, b, lambda x: x == 1) == (a + piece.index(1) if 1 in piece else None)
            assert m.count(a, b, lambda x: x > 1) == sum(1 for x in piece if x > 1)
            runs = sum(1 for i in range(len(piece)) if i == 0 or piece[i] != piece[i - 1])
            assert m.distinct(a, b) == runs


# --- the compiled layout at every size ----------------------------------------------------------


@needs_core
def test_a_new_map_is_compiled_while_native_is_set_and_flat_otherwise():
    with layout("c-extension", 512):
        m: RangeMap[int] = RangeMap(0)
        assert type(m).__name__ == "_NativeRangeMap" and isinstance(m, RangeMap)
        assert m.default == 0 and len(m) == 0 and m.get(5) == 0
        m.set(3, 4, 1)
        assert type(m).__name__ == "_NativeRangeMap" and list(m.items()) == [(3, 4, 1)]
        m.set(3, 4, 0)  # empty again: still compiled (no size threshold)
        assert type(m).__name__ == "_NativeRangeMap" and len(m) == 0
    with layout("python", 512):
        f: RangeMap[int] = RangeMap(0)
        assert type(f) is RangeMap
        f.set(3, 4, 1)
        assert type(f) is RangeMap and list(f.items()) == [(3, 4, 1)]


@needs_core
def test_a_small_compiled_map_takes_any_key_by_moving_to_the_flat_layout():
    """A key the core cannot hold arrives at a small map: it moves to the flat layout (not the
    chunked one, which needs chunks) and answers as the flat layout does, before and after."""
    with layout("c-extension", 512):
        m: RangeMap[int] = RangeMap(0)
        m.set(0, 4, 1)
        assert m.get(2**64) == 0 and type(m).__name__ == "_NativeRangeMap"  # beyond int64: default
        assert list(m.segments(-(2**70), 2)) == [(-(2**70), 0, 0), (0, 2, 1)]
        assert m.all_equal(2**64, 2**65, 0) and not m.any_match(-(2**65), 0, bool)
        assert type(m).__name__ == "_NativeRangeMap"
        m.set(2**64, 2**64 + 2, 3)
        assert type(m) is RangeMap
        m.check()
        assert list(m.items()) == [(0, 4, 1), (2**64, 2**64 + 2, 3)]
        n: RangeMap[int] = RangeMap(0)
        n.set(0, 4, 1)
        assert n.get(1.5) == 1 and type(n) is RangeMap  # a float: the Python layout's answer
        o: RangeMap[int] = RangeMap(0)
        o.set(0, 4, 1)
        with pytest.raises(TypeError):
            o.get("x")
        assert type(o) is RangeMap and o.get(2) == 1  # moved, and nothing else changed


@needs_core
@pytest.mark.parametrize("n", [0, 1, 5, 300])
def test_compiled_maps_copy_pickle_and_deepcopy_in_their_layout(n):
    with layout("c-extension", 4):
        m: RangeMap[object] = RangeMap(None)
        for i in range(n):
            m.set(3 * i, 3 * i + 2, [i])
        for twin in (m.copy(), pickle.loads(pickle.dumps(m)), copy.deepcopy(m), copy.copy(m)):
            twin.check()
            assert type(twin) is type(m) and list(map(repr, twin.items())) == list(map(repr, m.items()))
            twin.set(0, 1, "new")
            assert m.get(0) == ([0] if n else None) and twin.get(0) == "new"
    with layout("python", 4):  # unpickled where the compiled layout is off: a Python layout
        back = pickle.loads(pickle.dumps(m))
        back.check()
        assert type(back).__name__ == ("_ChunkedRangeMap" if n > 8 else "RangeMap")
        assert list(map(repr, back.items())) == list(map(repr, m.items()))


@needs_core
def test_a_cycle_through_a_value_is_collected():
    """A value that refers to its own map: the garbage collector sees through the compiled layout
    (tp_traverse) and frees both."""

    class Node:
        pass

    with layout("c-extension", 512):
        m: RangeMap[object] = RangeMap(None)
        node = Node()
        node.map = m  # type: ignore[attr-defined]
        m.set(0, 1, node)
        gone = weakref.ref(node)
        del m, node
        gc.collect()
        assert gone() is None


class CycleNode:
    """A value that will refer to its own map (module level: a pickle names its class)."""


@needs_core
@pytest.mark.parametrize("way", ["set", "after_ints", "after_clear", "copy", "pickle", "c_api"])
def test_a_cycle_is_collected_however_the_value_entered_the_map(way):
    """The compiled layout skips its values in tp_traverse while none was ever of a GC type (a map
    of a million ints would otherwise cost every collection a million visits); a GC value stored
    any way at all -- set, after int values, after clear(), through a copy or a pickle's load, or
    the C API -- turns the visits back on, so a cycle through it is still found."""
    with layout("c-extension", 4):
        m: RangeMap[object] = RangeMap(0)
        for i in range(40):
            m.set(2 * i, 2 * i + 1, i % 3 + 1)
        node = CycleNode()
        if way == "after_clear":
            m.set(100, 101, CycleNode())
            m.clear()
        if way == "c_api":
            assert _capi().set(m, 500, 501, node) == 0
            m2 = m
        elif way in ("copy", "pickle"):
            m.set(500, 501, node)
            m2 = m.copy() if way == "copy" else pickle.loads(pickle.dumps(m))
            node = m2.get(500)
            del m
        else:
            m.set(500, 501, node)
            m2 = m
        node.map = m2  # type: ignore[attr-defined]
        assert m2.get(500) is node
        gone = weakref.ref(node)
        m = m2 = node = None  # type: ignore[assignment]
        gc.collect()
        assert gone() is None, way


@needs_core
def test_an_iterator_survives_edits_of_a_small_map():
    with layout("c-extension", 512):
        m: RangeMap[int] = RangeMap(0)
        m.set(0, 2, 1)
        m.set(4, 6, 2)
        it = m.segments(0, 8)
        assert next(it) == (0, 2, 1)
        m.set(2, 4, 3)  # fills the gap the iterator is about to yield
        assert list(it) == [(2, 4, 3), (4, 6, 2), (6, 8, 0)]


# --- the C API for other accelerators --------------------------------------------------------------


class _CApi(ctypes.Structure):
    """The capsule's struct (PYFUNCTYPE: called with the GIL held, a set exception raised)."""

    _fields_ = [
        ("abi", ctypes.c_int),
        ("is_native", ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object)),
        ("get", ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object, ctypes.c_int64)),
        ("set", ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.py_object)),
        ("length", ctypes.PYFUNCTYPE(ctypes.c_ssize_t, ctypes.py_object)),
        ("piece", ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object, ctypes.c_int64,
                                    ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64))),
    ]


def _capi() -> _CApi:
    assert _BUILT is not None
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ptr = get_pointer(_BUILT._C_API, b"guestmem._rangemap._C_API")
    return ctypes.cast(ptr, ctypes.POINTER(_CApi)).contents


@needs_core
def test_the_c_api_reads_and_edits_a_compiled_map_as_its_methods_do():
    api = _capi()
    assert api.abi == 1
    with layout("c-extension", 2):
        m: RangeMap[int] = RangeMap(0)
        ref: RangeMap[int] = RangeMap(0)
        assert api.is_native(m) == 1
        for i, (s, e, v) in enumerate([(0, 5, 1), (2, 3, 2), (2, 3, 1), (9, 12, 3), (4, 10, 0),
                                       (-(2**63), -(2**63) + 1, 2), (2**63 - 2, 2**63 - 1, 2),
                                       (7, 7, 3), (8, 6, 3)]):
            assert api.set(m, s, e, v) == 0
            ref.set(s, e, v)
            m.check()
            assert list(m.items()) == list(ref.items()), i
            assert api.length(m) == len(m)
            for x in (-(2**63), -1, 0, 2, 3, 4, 9, 11, 12, 2**63 - 2, 2**63 - 1):
                assert api.get(m, x) == m.get(x) == ref.get(x)
                lo, hi = ctypes.c_int64(), ctypes.c_int64()
                v = api.piece(m, x, ctypes.byref(lo), ctypes.byref(hi))
                assert lo.value <= x < hi.value or hi.value == 2**63 - 1
                assert v == m.get(x)
                # the maximal piece: what segments yields around x (a gap open to the right ends
                # at INT64_MAX in the API)
                before = list(m.segments(-(2**63), x + 1))[-1]
                after = next(iter(m.segments(x, 2**63)))
                assert (lo.value, hi.value) == (before[0], min(after[1], 2**63 - 1)), (i, x)
    with layout("python", 512):
        assert api.is_native(RangeMap(0)) == 0  # a Python layout: call its methods instead
    with layout("c-extension", 512):
        moved: RangeMap[int] = RangeMap(0)
        moved.set(2**64, 2**64 + 1, 1)
        assert api.is_native(moved) == 0


@needs_core
def test_the_c_api_set_reports_an_eq_that_raises():
    class Bad:
        def __eq__(self, other: object) -> bool:
            raise ValueError("no")

        __hash__ = None  # type: ignore[assignment]

    api = _capi()
    with layout("c-extension", 512):
        m: RangeMap[object] = RangeMap(0)
        m.set(0, 4, 1)
        with pytest.raises(ValueError, match="no"):
            api.set(m, 1, 2, Bad())
        assert list(m.items()) == [(0, 4, 1)]


@needs_core
def test_an_eq_that_moves_the_map_to_python_does_not_lose_the_edit():
    """A value's ``__eq__`` gives the map a key beyond int64 while the core is comparing: the map
    moves to a Python layout mid-edit, and the edit is made there (not in the core it left)."""

    class Mover:
        def __init__(self, m: RangeMap[object]) -> None:
            self.m, self.done = m, False

        def __eq__(self, other: object) -> bool:
            if not self.done:
                self.done = True
                self.m.set(2**64, 2**64 + 1, 9)
            return False

        __hash__ = None  # type: ignore[assignment]

    with layout("c-extension", 512):
        m: RangeMap[object] = RangeMap(0)
        m.set(0, 4, 1)
        value = Mover(m)
        m.set(2, 6, value)
        assert type(m) is RangeMap
        m.check()
        assert list(m.items()) == [(0, 2, 1), (2, 6, value), (2**64, 2**64 + 1, 9)]


@needs_core
@pytest.mark.parametrize("n", [0, 3, 40])
def test_default_is_one_value_in_every_layout_and_every_way_a_map_is_made(n):
    """``default`` is a plain slot of RangeMap (C readers find it by offset) and the core's own
    copy: the two agree for new maps, copies, unpickled maps and flat maps that take the compiled
    layout — erasing with ``default`` works in each."""
    assert type(RangeMap.__dict__["default"]).__name__ == "member_descriptor"
    dflt = ("d",)
    with layout("c-extension", 4):
        m: RangeMap[object] = RangeMap(dflt)
        for i in range(n):
            m.set(3 * i, 3 * i + 2, i)
        made = [m, m.copy(), pickle.loads(pickle.dumps(m)), copy.deepcopy(m)]
    with layout("python", 4):
        flat: RangeMap[object] = RangeMap(dflt)
        for i in range(8):  # 2 * _LOAD: still flat
            flat.set(3 * i, 3 * i + 2, i)
        assert type(flat) is RangeMap
    with layout("c-extension", 4):
        flat.set(1000, 1001, 1)  # a flat map growing past 2 * _LOAD takes the compiled layout
        assert type(flat).__name__ == "_NativeRangeMap"
        made.append(flat)
        for x in made:
            assert x.default == dflt and x.get(-5) == x.default
            x.set(-10, 10**6, ("d",))  # an equal default erases everything
            x.check()
            assert len(x) == 0 and list(x.segments(0, 2)) == [(0, 2, x.default)]
