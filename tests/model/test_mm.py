"""FramePool: allocation order/alignment, coalescing, real memory release, sparseness, threads."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from guestmem.errors import KvmError
from guestmem.model.mm import FramePool
from guestmem.uapi import PAGE_SIZE

MiB = 1 << 20


@pytest.fixture
def pool() -> Iterator[FramePool]:
    with FramePool() as p:
        yield p


@pytest.fixture
def small() -> Iterator[FramePool]:
    """8 MiB of frames in 2 MiB chunks: 2048 frames, order <= 9, chunk crossings are easy."""
    with FramePool(8 * MiB, chunk_bytes=2 * MiB) as p:
        yield p


def test_one_tib_pool_costs_nothing(pool: FramePool) -> None:
    st = os.fstat(pool.fileno())
    assert st.st_size == 1 << 40
    assert pool.capacity_pages == 1 << 28
    assert pool.resident_bytes() == 0
    assert pool.allocated == 0 and pool.free_runs() == 1
    # Touching one frame near the top maps one chunk and costs one page.
    top = pool.alloc_range(1 << 28)[0]
    assert top == (0, 1 << 28)
    pool.write(pool.capacity_pages - 1, 0, b"x")
    assert pool.resident_bytes() == PAGE_SIZE
    pool.free(0, 1 << 28)
    assert pool.resident_bytes() == 0 and pool.allocated == 0


def test_consecutive_order0_allocs_are_consecutive(pool: FramePool) -> None:
    assert [pool.alloc() for _ in range(100)] == list(range(100))


@pytest.mark.parametrize("order", [0, 9, 18])
def test_alignment_per_order(pool: FramePool, order: int) -> None:
    pool.alloc()  # make the next free frame unaligned
    pfns = [pool.alloc(order) for _ in range(3)]
    for pfn in pfns:
        assert pfn % (1 << order) == 0
    assert len(set(pfns)) == 3
    assert pool.allocated == 1 + 3 * (1 << order)


def test_order_out_of_range(small: FramePool) -> None:
    with pytest.raises(ValueError):
        small.alloc(10)  # chunk is 2 MiB: order 9 is the largest
    with pytest.raises(ValueError):
        small.alloc_range(100, 9)  # not a whole number of folios


def test_alloc_range_is_one_run_on_a_fresh_pool(pool: FramePool) -> None:
    assert pool.alloc_range(16384) == [(0, 16384)]
    runs = pool.alloc_range(1024, 9)
    assert runs == [(16384, 1024)]
    assert pool.alloc_range(0) == []


def test_alloc_range_across_holes_returns_several_runs(small: FramePool) -> None:
    small.alloc_range(64)
    small.free(10, 5)
    small.free(30, 2)
    assert small.alloc_range(10) == [(10, 5), (30, 2), (64, 3)]
    assert small.allocated == 67


def test_free_coalesces_and_is_reused_by_any_order(small: FramePool) -> None:
    a, b, c = (small.alloc(9) for _ in range(3))
    assert (a, b, c) == (0, 512, 1024)
    small.free(b, 512)
    assert small.free_runs() == 2
    assert small.alloc(9) == b  # the hole is reused with its alignment
    small.free(b, 512)
    assert [small.alloc() for _ in range(3)] == [b, b + 1, b + 2]  # first fit, low first
    small.free(b, 3)
    for base in (a, c):
        small.free(base, 512)
    assert small.free_runs() == 1 and small.allocated == 0


def test_free_a_piece_of_a_folio(small: FramePool) -> None:
    base = small.alloc(9)
    small.free(base + 1, 511)  # after a split, pieces go back one by one
    assert small.allocated == 1
    assert small.alloc() == base + 1
    with pytest.raises(ValueError):
        small.free(base + 2, 2)  # not allocated
    small.free(base, 2)
    assert small.allocated == 0


def test_enomem_leaves_nothing_allocated(small: FramePool) -> None:
    small.alloc_range(2000)
    with pytest.raises(KvmError) as e:
        small.alloc_range(49)
    assert e.value.errno == errno.ENOMEM and e.value.operation == "alloc_folio"
    assert small.allocated == 2000
    assert small.stats.alloc_failures == 1
    # Fragmentation: 48 free frames, but no aligned pair.
    small.alloc_range(48)
    for pfn in range(0, 96, 2):
        small.free(pfn, 1)
    with pytest.raises(KvmError):
        small.alloc(1)
    assert small.alloc(0) == 0


def test_free_returns_memory_to_the_host(pool: FramePool) -> None:
    runs = pool.alloc_range(2048)
    assert pool.resident_bytes() == 0  # allocation alone touches nothing
    pool.fill(0, 2048, 0x5A)
    assert pool.resident_bytes() == 2048 * PAGE_SIZE
    pool.free(0, 1024)
    assert pool.resident_bytes() == 1024 * PAGE_SIZE
    pool.free(1024, 1024)
    assert pool.resident_bytes() == 0
    assert runs == [(0, 2048)]
    # A reused frame reads as zeros.
    pfn = pool.alloc()
    assert not pool.view(pfn).any()


def test_zero_punches_but_keeps_the_frames(pool: FramePool) -> None:
    pfn = pool.alloc(9)
    pool.fill(pfn, 512, 0xFF)
    pool.zero(pfn + 1, 510)
    assert pool.resident_bytes() == 2 * PAGE_SIZE
    assert pool.is_allocated(pfn, 512)
    data = pool.read(pfn, 0, 512 * PAGE_SIZE)  # read() does not fault the holes back in
    assert pool.resident_bytes() == 2 * PAGE_SIZE
    assert data[:PAGE_SIZE] == b"\xff" * PAGE_SIZE == data[-PAGE_SIZE:]
    assert data[PAGE_SIZE:-PAGE_SIZE].count(0) == 510 * PAGE_SIZE


def test_views_and_byte_helpers_cross_chunks(small: FramePool) -> None:
    small.alloc_range(2048)
    across = small.view(510, 4)  # its own mapping of the same frames
    across[2 * PAGE_SIZE] = 9
    assert small.view(512)[0] == 9 and len(across) == 4 * PAGE_SIZE
    small.view(512)[0] = 0
    assert across[2 * PAGE_SIZE] == 0
    del across
    data = bytes(range(256)) * 40  # 10240 bytes, across the 2 MiB boundary at pfn 512
    small.write(511, 100, data)
    assert small.read(511, 100, len(data)) == data
    assert [len(v) for v in small.views(510, 4)] == [2 * PAGE_SIZE, 2 * PAGE_SIZE]
    small.copy(1023, 511, 3)  # source and destination both straddle a boundary
    assert small.read(1023, 100, len(data)) == data
    small.fill_bytes(511, PAGE_SIZE - 1, 2, 7)
    assert small.read(511, PAGE_SIZE - 1, 2) == b"\x07\x07"
    out = np.zeros(3, dtype=np.uint8)
    small.read_into(512, 0, out)
    assert out.tobytes() == small.read(512, 0, 3)


def test_poison_marks_fresh_frames() -> None:
    with FramePool(8 * MiB, chunk_bytes=2 * MiB, poison=0xA5) as p:
        pfn = p.alloc()
        assert (p.view(pfn) == 0xA5).all()
        p.free(pfn, 1)
        assert (p.view(p.alloc()) == 0xA5).all()


def test_stats(small: FramePool) -> None:
    small.alloc_range(10)
    small.alloc(9)
    small.free(0, 10)
    st = small.stats
    assert (st.allocated, st.peak_allocated, st.alloc_calls, st.free_calls) == (512, 522, 2, 1)
    assert st.allocated_total == 522 and st.freed_total == 10
    assert st.punched_bytes == 10 * PAGE_SIZE
    assert small.allocated_runs() == [(512, 512)]


def test_closed_pool_refuses_work() -> None:
    p = FramePool(8 * MiB, chunk_bytes=2 * MiB)
    pfn = p.alloc()
    v = p.view(pfn)  # a live view must not make close() crash
    p.close()
    p.close()
    assert p.closed
    with pytest.raises(ValueError):
        p.alloc()
    with pytest.raises(ValueError):
        p.resident_bytes()
    del v


def test_threads_never_share_a_frame(small: FramePool) -> None:
    owners = np.zeros(small.capacity_pages, dtype=np.int64)
    errors: list[str] = []

    def worker(tid: int) -> None:
        rng = np.random.default_rng(tid)
        held: list[tuple[int, int]] = []
        for _ in range(300):
            if held and rng.random() < 0.45:
                pfn, n = held.pop(int(rng.integers(len(held))))
                if (owners[pfn : pfn + n] != tid).any():
                    errors.append(f"frames {pfn}+{n} changed hands")
                owners[pfn : pfn + n] = 0
                small.free(pfn, n)
                continue
            order = int(rng.choice([0, 0, 0, 3]))
            try:
                runs = small.alloc_range(int(rng.integers(1, 4)) << order, order)
            except KvmError:
                continue
            for pfn, n in runs:
                if owners[pfn : pfn + n].any():
                    errors.append(f"frames {pfn}+{n} handed out twice")
                owners[pfn : pfn + n] = tid
                held.append((pfn, n))
        for pfn, n in held:
            owners[pfn : pfn + n] = 0
            small.free(pfn, n)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert small.allocated == 0 and small.free_runs() == 1
    st = small.stats
    assert st.allocated_total == st.freed_total
