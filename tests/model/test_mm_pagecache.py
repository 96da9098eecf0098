"""PageCache: delta-encoded ranges, folios (split/merge/migrate), zero-on-first-use, pins, contents.

The stateful test drives a PageCache and a per-page dict reference with the same operations.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guestmem.errors import KvmError
from guestmem.model.mm import FramePool, PageCache
from guestmem.uapi import PAGE_SIZE

MiB = 1 << 20


@pytest.fixture
def pool() -> Iterator[FramePool]:
    with FramePool(4 << 30) as p:  # sparse; 1 GiB chunks: orders up to 18
        yield p


@pytest.fixture
def small() -> Iterator[FramePool]:
    with FramePool(8 * MiB, chunk_bytes=2 * MiB) as p:
        yield p


def test_contiguous_population_is_one_range(pool: FramePool) -> None:
    pc = PageCache(pool)
    assert pc.populate(0, 16384) == [(0, 16384, 0)]
    assert pc.range_count() == 1 and pc.nr_pages == 16384
    assert list(pc.lookup_range(0, 16384)) == [(0, 16384, 0, 0)]
    # Faulting page by page from a fresh pool also stays one range (consecutive pfns).
    pc2 = PageCache(pool)
    for i in range(5000, 6000):
        pc2.populate(i, i + 1)
    assert pc2.range_count() == 1
    assert pc2.lookup(5000) == (16384, 0) and pc2.lookup(5999) == (16384 + 999, 0)
    pc.check()
    pc2.check()


def test_one_tib_file_is_cheap(pool: FramePool) -> None:
    pc = PageCache(pool)
    top = (1 << 40) // PAGE_SIZE
    pc.populate(top - 3, top)
    pc.write((top - 1) * PAGE_SIZE, b"end")
    assert pc.read((top - 1) * PAGE_SIZE, 3) == b"end"
    assert pc.read(0, 8) == bytes(8)
    assert pc.allocated_count(0, top) == 3 and pc.holes(0, top) == [(0, top - 3)]
    assert pool.resident_bytes() == PAGE_SIZE


def test_populate_keeps_existing_pages(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(10, 20)
    before = [pc.lookup(i) for i in range(10, 20)]
    pieces = pc.populate(0, 30)
    assert [pc.lookup(i) for i in range(10, 20)] == before
    assert sum(e - s for s, e, _ in pieces) == 30 and pieces[0][0] == 0 and pieces[-1][1] == 30
    assert pc.nr_pages == 30 == pool.allocated
    assert pc.populate(5, 25) == [(s, e, p) for s, e, p, _ in pc.lookup_range(5, 25)]


@pytest.mark.parametrize("order", [9, 18])
def test_large_folios_are_naturally_aligned(pool: FramePool, order: int) -> None:
    pool.alloc()  # make pfns unaligned
    pc = PageCache(pool)
    size = 1 << order
    pc.populate(size + 5, size + 6, order)
    head, head_pfn, o = pc.folio(size + 5)  # type: ignore[misc]
    assert (head, o) == (size, order) and head_pfn % size == 0
    assert pc.nr_pages == size and pc.lookup(size + 5) == (head_pfn + 5, order)
    assert not pc.is_allocated(size - 1) and not pc.is_allocated(2 * size)
    pc.check()


def test_populate_falls_back_to_order0(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(3, 4)
    pc.populate(0, 1024, 9)  # block 0 is partly present: its missing pages are order 0
    assert pc.lookup(0)[1] == 0 and pc.lookup(511)[1] == 0  # type: ignore[index]
    assert pc.lookup(512)[1] == 9  # type: ignore[index]
    assert pc.nr_pages == 1024
    pc2 = PageCache(pool)
    pc2.populate(0, 10, 9, limit=100)  # the folio would end past the limit
    assert pc2.nr_pages == 10 and pc2.lookup(0)[1] == 0  # type: ignore[index]
    pc.check()
    pc2.check()


def test_populate_is_all_or_nothing(small: FramePool) -> None:
    pc = PageCache(small)
    pc.populate(0, 1500)
    with pytest.raises(KvmError) as e:
        pc.populate(2000, 2000 + 600)
    assert e.value.errno == errno.ENOMEM
    assert pc.nr_pages == 1500 == small.allocated
    with pytest.raises(KvmError):
        pc.populate(2000, 3100, 9)  # one folio fits, the second does not
    assert pc.nr_pages == 1500 == small.allocated


def test_remove_splits_a_partly_covered_folio(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(0, 512, 9)
    pc.fill(0, 512 * PAGE_SIZE, 0x11)
    pfn0 = pc.lookup(0)[0]  # type: ignore[index]
    assert pc.remove(100, 200) == 100
    assert pc.folio(0) == (0, pfn0, 0) and pc.folio(300) == (300, pfn0 + 300, 0)
    assert pc.nr_pages == 412 == pool.allocated
    assert pc.stats.splits == 1
    assert pc.read(99 * PAGE_SIZE, 2 * PAGE_SIZE) == b"\x11" * PAGE_SIZE + bytes(PAGE_SIZE)
    assert pc.remove(0, 1 << 20) == 412 and pool.allocated == 0
    pc.check()


def test_remove_pinned_partial_folio_zeroes_instead(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(0, 512, 9)
    pc.fill(0, 512 * PAGE_SIZE, 0x22)
    pc.add_ref(0, 1)
    assert pc.remove(100, 200) == 0
    assert pc.folio(150)[2] == 9 and pc.nr_pages == 512  # type: ignore[index]
    assert pc.read(100 * PAGE_SIZE, 100 * PAGE_SIZE) == bytes(100 * PAGE_SIZE)
    assert pc.read(99 * PAGE_SIZE, 1) == b"\x22" and pc.read(200 * PAGE_SIZE, 1) == b"\x22"
    # Whole-folio removal drops the pin with the page.
    assert pc.remove(0, 512) == 512 and pc.stats.removed_pinned == 1
    pc.check()


def test_split_merge_in_place(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(512, 1024, 9)
    pfn = pc.lookup(512)[0]  # type: ignore[index]
    assert pc.split(600, 601) == 1
    assert pc.lookup(700) == (pfn + 188, 0)
    assert pc.split(512, 1024) == 0
    assert pc.merge(512) is True
    assert pc.folio(700) == (512, pfn, 9)
    assert pc.stats.merges == 1 and pc.stats.migrations == 0
    assert pc.merge(512) is True and pc.stats.merges == 1  # already one folio
    with pytest.raises(ValueError):
        pc.merge(513)
    pc.add_ref(520, 521)
    with pytest.raises(KvmError) as e:
        pc.split(512, 513)
    assert e.value.errno == errno.EAGAIN and pc.folio(512)[2] == 9  # type: ignore[index]
    # Splitting 1 GiB to 2 MiB pieces.
    pc.populate(1 << 18, (1 << 18) + 1, 18)
    assert pc.split(1 << 18, (1 << 18) + 1, 9) == 1
    assert pc.folio((1 << 18) + 600)[:1] == ((1 << 18) + 512,)  # type: ignore[index]
    assert pc.folio((1 << 18) + 600)[2] == 9  # type: ignore[index]
    pc.check()


def test_merge_by_migration_copies_contents(small: FramePool) -> None:
    pc = PageCache(small)
    pc.populate(0, 256)
    small.alloc()  # someone else takes the next frame: the block is no longer contiguous
    pc.populate(256, 512)
    pc.write(100, b"hello")
    pc.write(400 * PAGE_SIZE, b"world")
    assert pc.range_count() == 2
    assert pc.merge(0) is False
    assert pc.merge(0, migrate=True) is True
    head, pfn, order = pc.folio(0)  # type: ignore[misc]
    assert order == 9 and pfn % 512 == 0 and pc.range_count() == 1
    assert pc.read(100, 5) == b"hello" and pc.read(400 * PAGE_SIZE, 5) == b"world"
    assert small.allocated == 513 and pc.stats.migrations == 1
    new = pc.migrate(7)
    assert new == pc.lookup(7)[0] and new != pfn + 7  # type: ignore[index]
    assert pc.read(100, 5) == b"hello"
    pc.add_ref(3, 4)
    with pytest.raises(KvmError) as e:
        pc.migrate(0)
    assert e.value.errno == errno.EAGAIN
    with pytest.raises(KvmError) as e:
        pc.migrate(4000)
    assert e.value.errno == errno.ENOENT
    pc.check()


def test_prepare_zeroes_once() -> None:
    with FramePool(8 * MiB, chunk_bytes=2 * MiB, poison=0xEE) as p:
        pc = PageCache(p)
        pc.populate(0, 8)
        assert pc.read(0, 4) == bytes(4)  # not uptodate: reads as zeros
        assert pc.read(0, 4, raw=True) == b"\xee" * 4  # but the frame holds garbage
        assert pc.not_uptodate(0, 8) == [(0, 8)]
        assert pc.prepare(2, 4) == 2
        assert pc.uptodate(0, 8) == [(2, 4)] and pc.not_uptodate(0, 8) == [(0, 2), (4, 8)]
        assert pc.prepare(0, 8) == 6
        assert pc.prepare(0, 8) == 0
        assert pc.read(0, 8 * PAGE_SIZE, raw=True) == bytes(8 * PAGE_SIZE)
        assert pc.stats.zeroed == 8 and pc.uptodate_count(0, 8) == 8
        # A partial write zeroes only the rest of a fresh edge page; a full page needs no zeroing.
        pc.populate(8, 12)
        pc.write(8 * PAGE_SIZE + 100, b"x" * (PAGE_SIZE + 10))
        raw = pc.read(8 * PAGE_SIZE, 2 * PAGE_SIZE, raw=True)
        assert raw == bytes(100) + b"x" * (PAGE_SIZE + 10) + bytes(PAGE_SIZE - 110)
        assert pc.stats.zeroed == 10
        pc.write(10 * PAGE_SIZE, b"y" * PAGE_SIZE)
        assert pc.stats.zeroed == 10 and pc.is_uptodate(10) and not pc.is_uptodate(11)
        # Removal forgets uptodate: the next allocation must be zeroed again.
        pc.remove(0, 1)
        pc.populate(0, 1)
        assert not pc.is_uptodate(0) and pc.prepare(0, 1) == 1
        pc.check()


def test_write_without_allocate(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(0, 1)
    with pytest.raises(KvmError) as e:
        pc.write(PAGE_SIZE - 1, b"ab", allocate=False)
    assert e.value.errno == errno.EFAULT and pc.read(PAGE_SIZE - 1, 1) == b"\0"
    pc.fill(10, 3, 0x41, allocate=False)
    assert pc.read(9, 5) == b"\0AAA\0"


def test_zero_bytes_skips_holes(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(0, 2)
    pc.populate(3, 4)
    pc.fill(0, 4 * PAGE_SIZE, 0x33)
    pc.zero_bytes(100, 3 * PAGE_SIZE)
    assert pc.read(0, 101) == b"\x33" * 100 + b"\0"
    assert pc.read(3 * PAGE_SIZE + 99, 2) == b"\0\x33"
    assert pc.nr_pages == 4 and not pc.is_allocated(4)


def test_refs(pool: FramePool) -> None:
    pc = PageCache(pool)
    pc.populate(0, 100)
    pc.add_ref(10, 20, 2)
    pc.add_ref(15, 30)
    assert (pc.get_ref(9), pc.get_ref(10), pc.get_ref(15), pc.get_ref(25)) == (0, 2, 3, 1)
    assert pc.first_elevated(0, 100) == 10 and pc.first_elevated(30, 100) is None
    with pytest.raises(ValueError):
        pc.add_ref(5, 12, -1)  # 5..9 would underflow; nothing changes
    assert pc.get_ref(10) == 2
    with pytest.raises(ValueError):
        pc.add_ref(99, 101)  # 100 is a hole
    pc.add_ref(10, 30, -1)
    pc.add_ref(10, 20, -1)
    assert pc.first_elevated(0, 100) == 15 and pc.pinned(0, 100)
    pc.add_ref(15, 20, -1)
    assert not pc.pinned(0, 100)


# --- stateful: PageCache against a per-page reference -----------------------------------------

N = 1024  # two 2 MiB blocks
BLOCK = 512
idx = st.integers(0, N)


class PageCacheMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.pool = FramePool(8 * MiB, chunk_bytes=2 * MiB)
        self.pc = PageCache(self.pool)
        self.pfn: dict[int, int] = {}
        self.order: dict[int, int] = {}
        self.uptodate: set[int] = set()
        self.refs: dict[int, int] = {}
        self.data = bytearray(N * PAGE_SIZE)
        self.foreign: list[int] = []

    def teardown(self) -> None:
        if hasattr(self, "pool"):
            self.pool.close()

    # reference helpers
    def _folio(self, i: int) -> tuple[int, int]:
        o = self.order[i]
        h = i & ~((1 << o) - 1)
        return h, h + (1 << o)

    def _pinned(self, s: int, e: int) -> bool:
        return any(self.refs.get(i, 0) for i in range(s, e))

    def _drop(self, i: int) -> None:
        del self.pfn[i], self.order[i]
        self.uptodate.discard(i)
        self.refs.pop(i, None)
        self.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)

    @rule(a=idx, b=idx, big=st.booleans())
    def populate(self, a: int, b: int, big: bool) -> None:
        s, e = min(a, b), max(a, b)
        order = 9 if big else 0
        try:
            self.pc.populate(s, e, order)
        except KvmError as err:  # fragmentation: no free aligned block; nothing may change
            assert err.errno == errno.ENOMEM and big
            return
        if s >= e:
            return
        new: dict[int, int] = {}
        if big:
            for h in range(s & ~(BLOCK - 1), e, BLOCK):
                if all(i not in self.pfn for i in range(h, h + BLOCK)):
                    new.update((i, 9) for i in range(h, h + BLOCK))
        new.update((i, 0) for i in range(s, e) if i not in self.pfn and i not in new)
        for i, o in new.items():
            p = self.pc.lookup(i)
            assert p is not None and p[1] == o, (i, p, o)
            self.pfn[i], self.order[i] = p[0], o

    @precondition(lambda self: len(self.foreign) < 64)
    @rule(block=st.integers(0, N // BLOCK - 1), cut=st.integers(1, BLOCK - 1))
    def populate_fragmented(self, block: int, cut: int) -> None:
        """Fill a block in two steps with someone else's allocation in between (not contiguous)."""
        h = block * BLOCK
        self.populate(h, h + cut, False)
        self.foreign_alloc()
        self.populate(h + cut, h + BLOCK, False)

    @rule(a=idx, b=idx)
    def remove(self, a: int, b: int) -> None:
        s, e = min(a, b), max(a, b)
        got = self.pc.remove(s, e)
        if s >= e:
            assert got == 0
            return
        lo, hi = s, e
        for edge in {s, e - 1}:
            if edge not in self.pfn or self.order[edge] == 0:
                continue
            fs, fe = self._folio(edge)
            if s <= fs and fe <= e:
                continue
            if self._pinned(fs, fe):
                cs, ce = max(fs, s), min(fe, e)
                self.data[cs * PAGE_SIZE : ce * PAGE_SIZE] = bytes((ce - cs) * PAGE_SIZE)
                if edge == s:
                    lo = max(lo, fe)
                if edge == e - 1:
                    hi = min(hi, fs)
            else:
                for i in range(fs, fe):
                    self.order[i] = 0
        gone = [i for i in range(lo, hi) if i in self.pfn]
        for i in gone:
            self._drop(i)
        assert got == len(gone)

    @rule(a=idx, b=idx)
    def split(self, a: int, b: int) -> None:
        s, e = min(a, b), max(a, b)
        heads = {self._folio(i)[0] for i in range(s, e) if self.order.get(i, 0) == 9}
        if any(self._pinned(h, h + BLOCK) for h in heads):
            with pytest.raises(KvmError):
                self.pc.split(s, e)
            return
        assert self.pc.split(s, e) == len(heads)
        for h in heads:
            for i in range(h, h + BLOCK):
                self.order[i] = 0

    @rule(block=st.integers(0, N // BLOCK - 1), migrate=st.booleans())
    def merge(self, block: int, migrate: bool) -> None:
        h = block * BLOCK
        present = all(i in self.pfn for i in range(h, h + BLOCK))
        contiguous = present and all(self.pfn[h + k] == self.pfn[h] + k for k in range(BLOCK))
        aligned = present and self.pfn[h] % BLOCK == 0
        if present and not (contiguous and aligned) and migrate and self._pinned(h, h + BLOCK):
            with pytest.raises(KvmError):
                self.pc.merge(h, migrate=True)
            return
        try:
            got = self.pc.merge(h, migrate=migrate)
        except KvmError as err:  # no free aligned block to migrate into; nothing may change
            assert err.errno == errno.ENOMEM and migrate
            return
        assert got == (present and ((contiguous and aligned) or migrate))
        if got:
            base = self.pc.lookup(h)[0]  # type: ignore[index]
            for k in range(BLOCK):
                self.pfn[h + k], self.order[h + k] = base + k, 9

    @rule(a=idx, b=idx, n=st.sampled_from([1, 2, -1]))
    def add_ref(self, a: int, b: int, n: int) -> None:
        s, e = min(a, b), max(a, b)
        ok = all(i in self.pfn for i in range(s, e)) and all(
            self.refs.get(i, 0) + n >= 0 for i in range(s, e)
        )
        if not ok:
            with pytest.raises(ValueError):
                self.pc.add_ref(s, e, n)
            return
        self.pc.add_ref(s, e, n)
        for i in range(s, e):
            self.refs[i] = self.refs.get(i, 0) + n

    @rule(off=st.integers(0, N * PAGE_SIZE - 1), n=st.integers(1, 3 * PAGE_SIZE), byte=st.integers(1, 255))
    def fill(self, off: int, n: int, byte: int) -> None:
        n = min(n, N * PAGE_SIZE - off)
        first, last = off // PAGE_SIZE, (off + n + PAGE_SIZE - 1) // PAGE_SIZE
        self.populate(first, last, False)
        self.pc.fill(off, n, byte)
        self.data[off : off + n] = bytes([byte]) * n
        self.uptodate.update(range(first, last))

    @rule(off=st.integers(0, N * PAGE_SIZE - 1), data=st.binary(min_size=1, max_size=64))
    def write(self, off: int, data: bytes) -> None:
        data = data[: N * PAGE_SIZE - off]
        first, last = off // PAGE_SIZE, (off + len(data) + PAGE_SIZE - 1) // PAGE_SIZE
        self.populate(first, last, False)
        self.pc.write(off, data)
        self.data[off : off + len(data)] = data
        self.uptodate.update(range(first, last))

    @rule(a=idx, b=idx)
    def prepare(self, a: int, b: int) -> None:
        s, e = min(a, b), max(a, b)
        want = [i for i in range(s, e) if i in self.pfn and i not in self.uptodate]
        assert self.pc.prepare(s, e) == len(want)
        self.uptodate.update(want)

    @precondition(lambda self: len(self.foreign) < 64)
    @rule()
    def foreign_alloc(self) -> None:
        self.foreign.append(self.pool.alloc())

    @precondition(lambda self: self.foreign)
    @rule(k=st.integers(0, 63))
    def foreign_free(self, k: int) -> None:
        self.pool.free(self.foreign.pop(k % len(self.foreign)), 1)

    @rule(off=st.integers(0, N * PAGE_SIZE), n=st.integers(0, 2 * PAGE_SIZE))
    def read(self, off: int, n: int) -> None:
        assert self.pc.read(off, n) == bytes(self.data[off : off + n]).ljust(n, b"\0")

    @invariant()
    def matches_reference(self) -> None:
        pc = self.pc
        pc.check()
        assert pc.nr_pages == len(self.pfn)
        assert self.pool.allocated == len(self.pfn) + len(self.foreign)
        for s, e, pfn, order in pc.lookup_range(0, N):
            for i in (s, e - 1):  # ends of each piece (the pieces are checked to be uniform)
                if pfn is None:
                    assert i not in self.pfn
                else:
                    assert (self.pfn[i], self.order[i]) == (pfn + i - s, order)
            if pfn is not None:
                assert all(self.pfn.get(i) == pfn + i - s for i in range(s, e))
                assert all(self.order[i] == order for i in range(s, e))
            else:
                assert all(i not in self.pfn for i in range(s, e))
        assert pc.uptodate_count(0, N) == len(self.uptodate)
        assert all(pc.is_uptodate(i) for i in self.uptodate)
        elevated = sorted(i for i, r in self.refs.items() if r)
        assert pc.first_elevated(0, N) == (elevated[0] if elevated else None)
        assert sum(pc.get_ref(i) for i in elevated) == sum(self.refs.values())


TestPageCacheStateful = PageCacheMachine.TestCase
TestPageCacheStateful.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
