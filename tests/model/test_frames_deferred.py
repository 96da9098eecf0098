"""Deferred frame contents (``FramePool.defer``): no reader can tell them from contents written at
once.  A differential test runs the same operations on a pool that defers and on one that writes
at once, and compares every byte; then the TDX accept that uses it, the compiled vCPU path that
records it, threads, and the chunk whose address went out."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guestmem.model.mm.encryption import EncryptionEngine
from guestmem.model.mm.frames import FramePool
from guestmem.uapi import PAGE_SIZE

PAGES = 16
CHUNK = 4 * PAGE_SIZE  # small chunks, so runs cross them


class Pattern:
    """A filler whose page ``pfn`` is ``(pfn * 7 + seed) & 0xff`` repeated; counts its pages."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.pages = 0

    def materialize(self, pfn: int, dst: np.ndarray) -> None:
        n = dst.size // PAGE_SIZE
        for i in range(n):
            dst[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = (((pfn + i) * 7 + self.seed) & 0xFF)
        self.pages += n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.seed == self.seed

    def __hash__(self) -> int:
        return hash(self.seed)


@pytest.fixture
def pool() -> Iterator[FramePool]:
    """A small pool (chunks of 4 frames) with every frame allocated."""
    p = FramePool(PAGES * PAGE_SIZE, chunk_bytes=CHUNK)
    assert p.alloc_range(PAGES) == [(0, PAGES)]
    yield p
    p.close()


def _pools() -> tuple[FramePool, FramePool]:
    lazy, eager = (FramePool(PAGES * PAGE_SIZE, chunk_bytes=CHUNK) for _ in range(2))
    for p in (lazy, eager):
        assert p.alloc_range(PAGES) == [(0, PAGES)]
    return lazy, eager


def _raw(pool: FramePool) -> bytes:
    """The memfd's bytes, read around the pool (no settling)."""
    return os.pread(pool.fileno(), PAGES * PAGE_SIZE, 0)


run = st.tuples(st.integers(0, PAGES - 1), st.integers(1, PAGES)).map(
    lambda t: (t[0], min(t[1], PAGES - t[0])))
# byte spans; some run off the end of the pool (refused with ValueError, changing nothing)
span = st.tuples(st.integers(0, PAGES * PAGE_SIZE - 1), st.integers(1, 3 * PAGE_SIZE)).map(
    lambda t: (t[0], t[1] if t[1] % 5 == 0 else min(t[1], PAGES * PAGE_SIZE - t[0])))
ops = st.one_of(
    st.tuples(st.just("defer"), run, st.integers(0, 2)),
    st.tuples(st.just("view"), run),
    st.tuples(st.just("views"), run),
    st.tuples(st.just("read"), span),
    st.tuples(st.just("write"), span, st.integers(0, 255)),
    st.tuples(st.just("fill_bytes"), span, st.integers(0, 255)),
    st.tuples(st.just("fill"), run, st.integers(0, 255)),
    st.tuples(st.just("copy"), st.tuples(st.integers(0, PAGES - 1), st.integers(1, 4)),
              st.integers(0, PAGES - 1)),  # either run may go off the end: refused
    st.tuples(st.just("zero"), run),
    st.tuples(st.just("free"), run),
    st.tuples(st.just("expose"), st.integers(0, PAGES * PAGE_SIZE // CHUNK - 1)),
)


def _apply(pool: FramePool, op: tuple, defer: bool) -> bytes | str | None:
    try:
        return _apply1(pool, op, defer)
    except ValueError as exc:
        return f"ValueError: {exc}"


def _apply1(pool: FramePool, op: tuple, defer: bool) -> bytes | None:
    kind = op[0]
    if kind == "defer":
        (p, n), seed = op[1], op[2]
        if defer:
            pool.defer(p, n, Pattern(seed))
        else:
            Pattern(seed).materialize(p, pool.view(p, n))
        return None
    if kind == "view":
        (p, n) = op[1]
        return pool.view(p, n).tobytes()
    if kind == "views":
        (p, n) = op[1]
        return b"".join(v.tobytes() for v in pool.views(p, n))
    if kind == "read":
        addr, n = op[1]
        return pool.read(addr // PAGE_SIZE, addr % PAGE_SIZE, n)
    if kind == "write":
        (addr, n), b = op[1], op[2]
        pool.write(addr // PAGE_SIZE, addr % PAGE_SIZE, bytes((b + i) & 0xFF for i in range(n)))
        return None
    if kind == "fill_bytes":
        (addr, n), b = op[1], op[2]
        pool.fill_bytes(addr // PAGE_SIZE, addr % PAGE_SIZE, n, b)
        return None
    if kind == "fill":
        (p, n), b = op[1], op[2]
        pool.fill(p, n, b)
        return None
    if kind == "copy":
        (src, n), dst = op[1], op[2]
        if dst + n <= PAGES and dst < src + n and src < dst + n:
            return None  # overlapping: not a valid copy (one off the end is refused below)
        pool.copy(dst, src, n)
        return None
    if kind == "zero":
        (p, n) = op[1]
        pool.zero(p, n)
        return None
    if kind == "free":
        (p, n) = op[1]
        pool.free(p, n)
        return repr(pool.alloc_range(n)).encode()
    if kind == "expose":
        pool.chunk_address(op[1])
        return None
    raise AssertionError(kind)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=25))
@example([("defer", (0, 2), 1), ("copy", (15, 2), 0)])  # a refused copy must keep dst's deferral
def test_deferred_contents_read_like_contents_written_at_once(seq: list[tuple]) -> None:
    lazy, eager = _pools()
    try:
        for op in seq:
            assert _apply(lazy, op, True) == _apply(eager, op, False), op
            # bytes outside the deferred runs are already what they should be
            raw_l, raw_e = _raw(lazy), _raw(eager)
            pending = np.zeros(PAGES, dtype=bool)
            for p, n in lazy.deferred_runs():
                pending[p:p + n] = True
            for p in range(PAGES):
                page = slice(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
                if not pending[p]:
                    assert raw_l[page] == raw_e[page], (op, p)
        assert lazy.read(0, 0, PAGES * PAGE_SIZE) == eager.read(0, 0, PAGES * PAGE_SIZE)
        assert lazy.deferred_runs() == []  # reading everything settled everything
    finally:
        lazy.close()
        eager.close()


def test_defer_writes_nothing_until_reached(pool: FramePool) -> None:
    f = Pattern(3)
    pool.defer(2, 9, f)
    assert pool.deferred_runs() == [(2, 9)]
    assert f.pages == 0 and pool.resident_bytes() == 0
    assert pool.read(5, 100, 10) == bytes([(5 * 7 + 3) & 0xFF]) * 10  # settles frame 5 only
    assert f.pages == 1 and pool.deferred_runs() == [(2, 3), (6, 5)]
    pool.fill(6, 5, 0xAA)  # whole pages overwritten: forgotten, never written
    assert f.pages == 1 and pool.deferred_runs() == [(2, 3)]
    pool.free(2, 3)  # freed: forgotten
    assert pool.deferred_runs() == [] and f.pages == 1


def test_an_exposed_chunk_is_settled_and_takes_no_deferral(pool: FramePool) -> None:
    f = Pattern(1)
    pool.defer(0, 8, f)  # chunks 0 and 1
    addr = pool.chunk_address(1)
    assert pool.deferred_runs() == [(0, 4)] and f.pages == 4
    raw = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * CHUNK).from_address(addr))
    assert raw[0] == (4 * 7 + 1) & 0xFF
    pool.defer(3, 3, Pattern(2))  # crosses into the exposed chunk: written at once, all of it
    assert pool.deferred_runs() == [(0, 3)]
    assert raw[PAGE_SIZE] == (5 * 7 + 2) & 0xFF
    with pytest.raises(ValueError):
        pool.chunk_address(PAGES * PAGE_SIZE // CHUNK)


def test_refused_calls_change_nothing(pool: FramePool) -> None:
    for bad in ((-1, 2), (PAGES - 1, 2), (0, -1)):
        with pytest.raises(ValueError):
            pool.defer(*bad, Pattern(0))
    assert pool.deferred_runs() == []
    pool.close()
    with pytest.raises(ValueError):
        pool.defer(0, 1, Pattern(0))


class SlowPattern(Pattern):
    def materialize(self, pfn: int, dst: np.ndarray) -> None:
        time.sleep(0.02)
        super().materialize(pfn, dst)


def test_threads_reading_one_deferred_run_write_it_once(pool: FramePool) -> None:
    f = SlowPattern(9)
    pool.defer(0, 4, f)
    seen: list[bytes] = []
    threads = [threading.Thread(target=lambda: seen.append(pool.read(1, 0, 16))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [bytes([(7 + 9) & 0xFF]) * 16] * 4
    assert f.pages == 1  # one writer; the others waited for it


def test_free_while_another_thread_settles_does_not_deadlock(pool: FramePool) -> None:
    stop = time.monotonic() + 1.0
    errors: list[BaseException] = []

    def settle() -> None:
        try:
            while time.monotonic() < stop:
                pool.defer(0, 8, Pattern(4))
                pool.view(0, 8)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def churn() -> None:
        try:
            while time.monotonic() < stop:
                pool.free(8, 8)
                pool.alloc_range(8)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=settle), threading.Thread(target=churn)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert not any(t.is_alive() for t in ts) and not errors


def test_encrypted_zeros_are_the_engine_s_zero_pages_and_counted_once(pool: FramePool) -> None:
    engine = EncryptionEngine(bytes(range(64)))
    engine.defer_zeros(pool, 3, 5)
    assert engine.pages_encrypted == 5 and pool.deferred_runs() == [(3, 5)]
    expect = engine.encrypt(3, np.zeros(5 * PAGE_SIZE, dtype=np.uint8))
    assert engine.pages_encrypted == 10
    assert pool.view(3, 5).tobytes() == expect.tobytes()
    assert engine.pages_encrypted == 10  # writing the deferred pages is not a second count
    assert engine.decrypt(3, pool.view(3, 5)).tobytes() == bytes(5 * PAGE_SIZE)


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_tdx_accept_defers_its_encrypted_zeros(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TD accepting pages lazily through the VMM layer: the frames are deferred (not written),
    counted as encrypted, and then read as the engine's zero pages -- ciphertext on the host side,
    zeros to the guest -- on the compiled vCPU path and the Python one alike."""
    from guestmem import bench_vmm
    from guestmem.guest.ops import Accept, Program, Verify
    from guestmem.model.kvm import vcpu as vcpu_mod

    if path == "compiled" and vcpu_mod._fast is None:
        pytest.skip("the _fastfault accelerator is not built (or GUESTMEM_PURE is set)")
    if path == "python":
        monkeypatch.setattr(vcpu_mod, "_fast", None)
    kvm, m = bench_vmm._machine("tdx", 8 << 20)
    try:
        m.create_vcpus(1)
        n = 12
        m.load({0: Program([Accept(bench_vmm.GPA + i * PAGE_SIZE, PAGE_SIZE) for i in range(n)])})
        bench_vmm._drive(m)
        vm = m.regions[0].vm
        engine, pool = vm.arch.engine, kvm.pool
        runs = pool.deferred_runs()
        assert sum(k for _, k in runs) == n and engine.pages_encrypted == n
        m.load({0: Program([Verify(bench_vmm.GPA, n * PAGE_SIZE, 0)])})
        bench_vmm._drive(m)  # the guest reads zeros through its key (a mismatch fails the run)
        assert pool.deferred_runs() == []  # reading them wrote them
        for pfn, k in runs:
            expect = engine.encrypt(pfn, np.zeros(k * PAGE_SIZE, dtype=np.uint8))
            assert pool.view(pfn, k).tobytes() == expect.tobytes()
        vm.check_invariants()
    finally:
        m.close()
        kvm.close()


def test_a_refused_copy_keeps_the_destination_s_deferral(pool: FramePool) -> None:
    pool.defer(0, 2, Pattern(5))
    with pytest.raises(ValueError):
        pool.copy(0, PAGES - 1, 2)  # the source runs off the pool
    assert pool.deferred_runs() == [(0, 2)]
    assert pool.read(1, 0, 4) == bytes([(7 + 5) & 0xFF]) * 4


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_what_a_guest_reads_from_a_page_it_accepted_and_never_wrote(flavour: str) -> None:
    """TDX's ACCEPT clears the page (the guest reads zeros through its key, deferred or not);
    SNP's PVALIDATE does not, so the guest reads the decryption of whatever the frame held (a fresh
    frame's zeros), which is not zeros: a guest must not rely on it."""
    from guestmem import bench_vmm
    from guestmem.guest.ops import Accept, Program, Verify

    kvm, m = bench_vmm._machine(flavour, 8 << 20)
    try:
        m.create_vcpus(1)
        m.load({0: Program([Accept(bench_vmm.GPA, 4 * PAGE_SIZE), Verify(bench_vmm.GPA, 4 * PAGE_SIZE, 0)])})
        if flavour == "tdx":
            bench_vmm._drive(m)
        else:
            with pytest.raises(RuntimeError, match="expected 0x00"):
                bench_vmm._drive(m)
    finally:
        m.close()
        kvm.close()


def test_an_empty_view_at_the_end_of_the_pool(pool: FramePool) -> None:
    """``view(capacity, 0)`` is an empty run, not an index past the last chunk."""
    assert pool.view(PAGES, 0).size == 0 and pool.view(3, 0).size == 0
    with pytest.raises(ValueError):
        pool.view(PAGES, 1)
