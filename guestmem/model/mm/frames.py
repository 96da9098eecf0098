"""``FramePool``: the model's host physical memory — page frames backed by real, measurable memory.

Every frame the model hands out is a 4 KiB page of one ``memfd`` (a tmpfs file), sized sparse to
the pool's capacity with ``ftruncate`` — a 1 TiB pool costs one inode and no memory.  The file is
mapped lazily in naturally aligned chunks (1 GiB by default, so no folio up to order 18 ever
straddles two mappings), and page contents are reached through ``numpy`` ``uint8`` views of those
mappings (a run that crosses chunks gets a mapping of its own).  Only frames that were touched
are resident; freeing frames punches them out of the file (``fallocate(PUNCH_HOLE | KEEP_SIZE)``),
so resident memory really drops, and :meth:`FramePool.resident_bytes` reads the truth from
``fstat().st_blocks``.  Reads go through ``preadv`` so that reading a never-written frame costs
nothing.

Contents can also be *deferred* (:meth:`FramePool.defer`): a run of frames is recorded as holding
what a filler object will write (a TDX ACCEPT's encrypted zeros), and the filler writes it the
first time anything reaches those bytes.  Every way into frame contents -- views, reads, writes,
fills, copies -- settles the frames it touches first, and a whole-page overwrite (or a free, or a
punch) just forgets the deferral, so no reader can tell; the difference is that a page the guest
accepts and never uses costs neither the host's first-touch fault nor its cipher pass.  The one
way around the pool, a chunk's raw address handed out for another mapper (the x86 CPU's Unicorn),
settles the chunk and turns deferral off in it for good.

Free space is a :class:`~guestmem.ranges.RangeMap` of free runs (cost grows with fragmentation,
never with pages).  Allocation is first-fit for a naturally aligned block of the requested order,
starting from a per-order hint below which no such block is free; so consecutive allocations on a
fresh pool return consecutive frames, which lets page caches store their index->pfn maps as a few
merged ranges.  Freed space coalesces on its own (adjacent free runs merge in the map) and is
reusable by any later allocation whose alignment fits — no buddy lists needed.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from guestmem.errors import KvmError
from guestmem.model.mm._libc import punch_hole
from guestmem.model.mm.stats import FrameStats
from guestmem.ranges import RangeMap
from guestmem.uapi import PAGE_SHIFT, PAGE_SIZE

DEFAULT_CAPACITY_BYTES = 1 << 40  # 1 TiB of frames, sparse
DEFAULT_CHUNK_BYTES = 1 << 30  # mapping granule; also bounds the largest folio order (18)

_Buffer = bytes | bytearray | memoryview | np.ndarray


def _zip2(a: RangeMap, b: RangeMap, start: int, end: int) -> list[tuple[int, int, tuple]]:
    """Pieces of ``[start, end)`` over which both maps are constant, with both values."""
    out = []
    for s, e, va in a.segments(start, end):
        for s2, e2, vb in b.segments(s, e):
            out.append((s2, e2, (va, vb)))
    return out


class Filler(Protocol):
    """What deferred frames hold: ``materialize(pfn, dst)`` writes those whole pages into ``dst``
    (a writable uint8 view of frames ``pfn ..``).  Equal fillers merge in the deferral map."""

    def materialize(self, pfn: int, dst: np.ndarray) -> None: ...


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


class FramePool:
    """Physical frames (pfns ``0 .. capacity_pages-1``) over one sparse memfd.

    ``capacity_bytes`` is rounded up to whole chunks; ``chunk_bytes`` (a power of two) is the
    mapping granule and bounds the folio order (``max_order``: 18 for 1 GiB chunks).

    ``poison``: if set, every newly allocated frame is filled with this byte, as a fresh kernel page
    holds arbitrary old data; with it, a path that forgets to zero a page before first use shows the
    poison instead of (accidentally correct) zeros.  Default off: fresh frames read as zeros and cost
    no memory until written.

    Allocator state is guarded by an internal lock, so the pool may be shared by threads.  Frame
    *contents* are not locked: whoever owns a frame serialises access to it.
    """

    def __init__(
        self,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        poison: int | None = None,
        name: str = "guestmem-frames",
        nodes: int = 1,
    ) -> None:
        if not _is_pow2(chunk_bytes) or chunk_bytes < PAGE_SIZE:
            raise ValueError("chunk_bytes must be a power of two of at least one page")
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        if poison is not None and not 0 <= poison <= 255:
            raise ValueError("poison must be a byte value")
        capacity_bytes = -(-capacity_bytes // chunk_bytes) * chunk_bytes
        self.capacity_pages: int = capacity_bytes >> PAGE_SHIFT
        self.chunk_pages: int = chunk_bytes >> PAGE_SHIFT
        self.max_order: int = self.chunk_pages.bit_length() - 1
        # NUMA: the pfns split into ``nodes`` equal contiguous ranges, node 0 lowest (as firmware
        # describes each node's physical memory range), so a frame's node is a function of its pfn.
        if nodes < 1 or self.capacity_pages // nodes < self.chunk_pages:
            raise ValueError(f"cannot split {self.capacity_pages} frames into {nodes} nodes")
        self.nodes = nodes
        self.node_pages = self.capacity_pages // nodes // self.chunk_pages * self.chunk_pages
        self.poison = poison
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        os.ftruncate(self._fd, capacity_bytes)
        nchunks = self.capacity_pages // self.chunk_pages
        self._maps: list[mmap.mmap | None] = [None] * nchunks
        self._arrays: list[np.ndarray | None] = [None] * nchunks
        self._free: RangeMap[bool] = RangeMap(False)
        self._free.set(0, self.capacity_pages, True)
        self._nfree = self.capacity_pages
        # _hint[k]: no free, naturally aligned 2^k block starts below this pfn.
        self._hint = [0] * (self.max_order + 1)
        self._lock = threading.Lock()
        self._stats = FrameStats()
        self._refs: RangeMap[int] = RangeMap(0)  # extra references per frame
        self._deferred: RangeMap[bool] = RangeMap(False)  # freed by their owner, still referenced
        self._ndeferred = 0
        # Deferred contents (see the module docstring): pfn -> the filler that writes them, or None.
        # _lazy_lock is held while a run is written and then cleared, so a reader that finds a run
        # pending waits for the writer instead of reading the bytes before they are there.
        self._lazy: RangeMap[Filler | None] = RangeMap(None)
        self._lazy_lock = threading.Lock()
        self._exposed: set[int] = set()  # chunks whose raw address went out: no deferral there

    # --- allocation -----------------------------------------------------------------------------
    def alloc(self, order: int = 0) -> int:
        """Allocate one naturally aligned folio of ``2**order`` frames; return its base pfn."""
        return self.alloc_range(1 << order, order)[0][0]

    def node_of(self, pfn: int) -> int:
        """The NUMA node whose memory holds frame ``pfn``."""
        return min(pfn // self.node_pages, self.nodes - 1)

    def alloc_range(self, npages: int, order: int = 0, node: int | None = None) -> list[tuple[int, int]]:
        """Allocate ``npages`` frames as order-``order`` folios; return runs ``(base_pfn, npages)``.

        Runs are maximal physically contiguous stretches (a fresh pool answers one run); every run
        starts and ends on a ``2**order`` boundary, so each aligned block inside is one folio.
        All or nothing: on ``ENOMEM`` nothing is allocated.  ``node`` (None: any) restricts the
        frames to that NUMA node's range, as ``__alloc_pages`` with a bound node does.
        """
        self.check_order(order)
        size = 1 << order
        if npages < 0 or npages % size:
            raise ValueError(f"npages {npages} is not a multiple of the folio size {size}")
        if npages == 0:
            return []
        with self._lock:
            self._check_open()
            runs = (self._find(npages, order, node) if npages <= self._nfree else None)
            if runs is None:
                self._stats.alloc_failures += 1
                raise KvmError(errno.ENOMEM, "alloc_folio", f"no {npages} frames of order {order}")
            for base, n in runs:
                self._free.set(base, base + n, False)
            self._nfree -= npages
            if node is None:
                base, n = runs[-1]
                self._hint[order] = base + n
            st = self._stats
            st.alloc_calls += 1
            st.allocated_total += npages
            st.allocated = self.capacity_pages - self._nfree
            st.peak_allocated = max(st.peak_allocated, st.allocated)
        if self.poison is not None:
            for base, n in runs:
                self.fill(base, n, self.poison)
        return runs

    def _find(self, npages: int, order: int, node: int | None = None) -> list[tuple[int, int]] | None:
        """First-fit runs of aligned blocks from the order's hint (within ``node``'s frames when
        given); None if they do not suffice."""
        size = 1 << order
        mask = size - 1
        runs: list[tuple[int, int]] = []
        remaining = npages
        lo, hi = self._hint[order], self.capacity_pages
        if node is not None:
            if not 0 <= node < self.nodes:
                return None
            lo = max(lo, node * self.node_pages)
            hi = self.capacity_pages if node == self.nodes - 1 else (node + 1) * self.node_pages
        for s, e, free in self._free.segments(lo, hi):
            if not free:
                continue
            a = (s + mask) & ~mask
            b = e & ~mask
            if a >= b:
                continue
            take = min(b - a, remaining)
            runs.append((a, take))  # free runs never touch, so neither do these
            remaining -= take
            if remaining == 0:
                return runs
        return None

    def free(self, pfn: int, npages: int) -> None:
        """Give back ``npages`` allocated frames from ``pfn`` (any piece of earlier allocations).

        The frames are punched out of the backing file first, so their memory returns to the host
        at once and a later allocation of them reads zeros.  A frame that still has extra
        references (:meth:`get_frames`, a GUP pin) is not freed yet: its owner has dropped it, and
        it goes on the last :meth:`put_frames`, as ``folio_put`` frees a truncated folio only when
        the last reference goes.
        """
        self._check_run(pfn, npages)
        if npages == 0:
            return
        with self._lazy_lock, self._lock:  # _release_locked forgets deferred contents: both locks
            self._check_open()
            if self._free.any_match(pfn, pfn + npages, bool) or self._deferred.any_match(
                    pfn, pfn + npages, bool):
                raise ValueError(f"free of frames not allocated in [{pfn:#x}, {pfn + npages:#x})")
            for s, e, refs in list(self._refs.segments(pfn, pfn + npages)):
                if refs:
                    self._deferred.set(s, e, True)
                    self._ndeferred += e - s
                else:
                    self._release_locked(s, e - s)

    # --- extra references (GUP pins) ------------------------------------------------------------
    def get_frames(self, pfn: int, npages: int) -> None:
        """Take an extra reference on each allocated frame of ``[pfn, pfn + npages)``."""
        self._check_run(pfn, npages)
        with self._lock:
            if self._free.any_match(pfn, pfn + npages, bool):
                raise ValueError(f"reference on free frames in [{pfn:#x}, {pfn + npages:#x})")
            self._refs.update(pfn, pfn + npages, lambda v: v + 1)

    def put_frames(self, pfn: int, npages: int) -> None:
        """Drop a reference taken by :meth:`get_frames`; frames their owner already freed go now.
        After :meth:`close` (the whole pool is gone, e.g. at interpreter exit) it does nothing."""
        self._check_run(pfn, npages)
        if self.closed:
            return
        with self._lazy_lock, self._lock:
            if self._refs.any_match(pfn, pfn + npages, lambda v: v <= 0):
                raise ValueError(f"reference count underflow in [{pfn:#x}, {pfn + npages:#x})")
            self._refs.update(pfn, pfn + npages, lambda v: v - 1)
            for s, e, (refs, gone) in _zip2(self._refs, self._deferred, pfn, pfn + npages):
                if gone and not refs:
                    self._deferred.set(s, e, False)
                    self._ndeferred -= e - s
                    self._release_locked(s, e - s)

    @property
    def deferred(self) -> int:
        """Frames their owner freed while references were held: allocated until the last put."""
        return self._ndeferred

    def _release_locked(self, pfn: int, npages: int) -> None:
        """Really free (punch) frames nobody references; the caller holds ``_lazy_lock`` and then
        ``_lock`` (the order every path takes them in)."""
        self._lazy.set(pfn, pfn + npages, None)
        punch_hole(self._fd, pfn << PAGE_SHIFT, npages << PAGE_SHIFT)
        self._free.set(pfn, pfn + npages, True)
        self._nfree += npages
        for k in range(self.max_order + 1):
            h = pfn & ~((1 << k) - 1)
            if h < self._hint[k]:
                self._hint[k] = h
        st = self._stats
        st.free_calls += 1
        st.freed_total += npages
        st.punched_bytes += npages << PAGE_SHIFT
        st.allocated = self.capacity_pages - self._nfree

    # --- queries --------------------------------------------------------------------------------
    @property
    def stats(self) -> FrameStats:
        """A snapshot of the counters (allocated, peak_allocated, frees, ...)."""
        with self._lock:
            return self._stats.snapshot()

    def allocation(self) -> tuple[int, int]:
        """``(allocated, peak_allocated)`` without copying every counter: the VMM's bound check
        reads this after each conversion, so it must cost O(1) and allocate nothing."""
        st = self._stats
        return st.allocated, st.peak_allocated

    @property
    def allocated(self) -> int:
        """Frames currently allocated."""
        return self.capacity_pages - self._nfree

    @property
    def free_pages(self) -> int:
        return self._nfree

    def is_allocated(self, pfn: int, npages: int = 1) -> bool:
        """True if every frame of ``[pfn, pfn + npages)`` is allocated."""
        self._check_run(pfn, npages)
        with self._lock:
            return not self._free.any_match(pfn, pfn + npages, bool)

    def allocated_runs(self) -> list[tuple[int, int]]:
        """Maximal allocated runs ``(pfn, npages)``, for invariant checks."""
        with self._lock:
            return [
                (s, e - s) for s, e, free in self._free.segments(0, self.capacity_pages) if not free
            ]

    def free_runs(self) -> int:
        """How many separate free runs there are (1 on a fresh or fully freed pool)."""
        return len(self._free)

    def resident_bytes(self) -> int:
        """Bytes of host memory the frames really occupy now (the memfd's ``st_blocks * 512``)."""
        self._check_open()
        return os.fstat(self._fd).st_blocks * 512

    def fileno(self) -> int:
        return self._fd

    # --- contents -------------------------------------------------------------------------------
    def view(self, pfn: int, npages: int = 1) -> np.ndarray:
        """A writable ``uint8`` view of the bytes of frames ``[pfn, pfn + npages)``.

        A run inside one chunk (any folio is) is a slice of the cached chunk mapping.  A run that
        crosses chunks gets its own shared mapping of the same frames (coherent with the chunk
        mappings), which lives as long as the returned array does.
        """
        self._check_run(pfn, npages)
        self._settle(pfn, npages)
        return self._raw_view(pfn, npages)

    def _raw_view(self, pfn: int, npages: int) -> np.ndarray:
        """:meth:`view` without settling deferred contents (the caller has, or is writing them)."""
        if npages == 0:  # an empty run (even one at the pool's end, past the last chunk)
            self._check_open()
            return np.empty(0, dtype=np.uint8)
        c = pfn // self.chunk_pages
        if (pfn + npages - 1) // self.chunk_pages != c:
            self._check_open()
            m = mmap.mmap(self._fd, npages << PAGE_SHIFT, mmap.MAP_SHARED, offset=pfn << PAGE_SHIFT)
            return np.frombuffer(m, dtype=np.uint8)
        off = (pfn - c * self.chunk_pages) << PAGE_SHIFT
        return self._chunk(c)[off : off + (npages << PAGE_SHIFT)]

    def views(self, pfn: int, npages: int) -> Iterator[np.ndarray]:
        """Views covering ``[pfn, pfn + npages)`` in order, one per mapping chunk crossed."""
        self._check_run(pfn, npages)
        self._settle(pfn, npages)
        for arr, _ in self._spans(pfn << PAGE_SHIFT, npages << PAGE_SHIFT):
            yield arr

    def _spans(self, addr: int, n: int) -> Iterator[tuple[np.ndarray, int]]:
        """Pieces ``(view, position)`` covering physical bytes ``[addr, addr + n)``, chunk by chunk."""
        if addr < 0 or addr + n > self.capacity_pages << PAGE_SHIFT:
            raise ValueError(f"physical range [{addr:#x}, {addr + n:#x}) outside the pool")
        chunk_bytes = self.chunk_pages << PAGE_SHIFT
        pos = 0
        while pos < n:
            c, off = divmod(addr + pos, chunk_bytes)
            take = min(n - pos, chunk_bytes - off)
            yield self._chunk(c)[off : off + take], pos
            pos += take

    def read(self, pfn: int, offset: int, n: int) -> bytes:
        """``n`` bytes starting ``offset`` bytes into frame ``pfn`` (may run across frames/chunks)."""
        out = np.empty(n, dtype=np.uint8)
        self.read_into(pfn, offset, out)
        return out.tobytes()

    def read_into(self, pfn: int, offset: int, out: np.ndarray) -> None:
        """Fill the contiguous ``uint8`` array ``out`` from the bytes ``offset`` into frame ``pfn``.

        Reads go through ``preadv`` on the memfd rather than the mapping: reading a hole (a frame
        never written, or zeroed by punching) then costs no memory, where a load through a shared
        mapping would fault a fresh page into the file.
        """
        addr = (pfn << PAGE_SHIFT) + offset
        n = len(out)
        if addr < 0 or addr + n > self.capacity_pages << PAGE_SHIFT:
            raise ValueError(f"physical range [{addr:#x}, {addr + n:#x}) outside the pool")
        self._check_open()
        if n:
            self._settle(addr >> PAGE_SHIFT, ((addr + n - 1) >> PAGE_SHIFT) + 1 - (addr >> PAGE_SHIFT))
        buf = out.data.cast("B")
        done = 0
        while done < n:
            got = os.preadv(self._fd, [buf[done:]], addr + done)
            if got <= 0:  # pragma: no cover - a memfd never reads short inside its size
                raise OSError(errno.EIO, "short read from the frame pool")
            done += got

    def write(self, pfn: int, offset: int, data: _Buffer) -> None:
        """Store ``data`` starting ``offset`` bytes into frame ``pfn``."""
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            src = np.frombuffer(data, dtype=np.uint8)
        self._overwriting((pfn << PAGE_SHIFT) + offset, len(src))
        for arr, pos in self._spans((pfn << PAGE_SHIFT) + offset, len(src)):
            arr[:] = src[pos : pos + len(arr)]

    def fill(self, pfn: int, npages: int, byte: int) -> None:
        """Set every byte of frames ``[pfn, pfn + npages)`` to ``byte``."""
        self.fill_bytes(pfn, 0, npages << PAGE_SHIFT, byte)

    def fill_bytes(self, pfn: int, offset: int, n: int, byte: int) -> None:
        """Set ``n`` bytes starting ``offset`` bytes into frame ``pfn`` to ``byte``."""
        self._overwriting((pfn << PAGE_SHIFT) + offset, n)
        for arr, _ in self._spans((pfn << PAGE_SHIFT) + offset, n):
            arr.fill(byte)

    def copy(self, dst_pfn: int, src_pfn: int, npages: int) -> None:
        """Copy the contents of ``npages`` frames from ``src_pfn`` to ``dst_pfn`` (runs must not overlap)."""
        self._check_run(src_pfn, npages)  # both runs checked before dst's deferral is dropped
        self._check_run(dst_pfn, npages)
        self._check_open()
        self._overwriting(dst_pfn << PAGE_SHIFT, npages << PAGE_SHIFT)
        for arr, pos in self._spans(dst_pfn << PAGE_SHIFT, npages << PAGE_SHIFT):
            self.read_into(src_pfn, pos, arr)

    def zero(self, pfn: int, npages: int) -> None:
        """Zero frames ``[pfn, pfn + npages)`` by punching them out of the file.

        The frames stay allocated; their memory goes back to the host until next written, and
        they read as zeros meanwhile.
        """
        self._check_run(pfn, npages)
        if npages == 0:
            return
        self._check_open()
        self._forget(pfn, npages)
        punch_hole(self._fd, pfn << PAGE_SHIFT, npages << PAGE_SHIFT)
        with self._lock:
            self._stats.punched_bytes += npages << PAGE_SHIFT

    # --- deferred contents ----------------------------------------------------------------------
    def defer(self, pfn: int, npages: int, filler: Filler) -> None:
        """Frames ``[pfn, pfn + npages)`` now hold what ``filler.materialize`` writes, written when
        something first reaches them (at once in a chunk whose raw address went out)."""
        self._check_run(pfn, npages)
        if npages == 0:
            return
        self._check_open()
        cp = self.chunk_pages
        if self._exposed and any(c in self._exposed for c in range(pfn // cp, (pfn + npages - 1) // cp + 1)):
            with self._lazy_lock:
                self._lazy.set(pfn, pfn + npages, None)
                self._write_locked(pfn, npages, filler)
            return
        with self._lazy_lock:
            self._lazy.set(pfn, pfn + npages, filler)

    def deferred_runs(self) -> list[tuple[int, int]]:
        """Runs ``(pfn, npages)`` whose contents are deferred (not yet written), for tests and
        pictures."""
        return [(s, e - s) for s, e, f in self._lazy.items() if f is not None]

    def chunk_address(self, c: int) -> int:
        """The address of chunk ``c``'s mapping, for a mapper outside the pool (the x86 CPU):
        its deferred contents are written now, and none are deferred in it again."""
        if not 0 <= c < len(self._arrays):
            raise ValueError(f"chunk {c} outside the pool")
        with self._lazy_lock:
            self._exposed.add(c)
        self._settle(c * self.chunk_pages, self.chunk_pages)
        return int(self._chunk(c).ctypes.data)

    def _none_deferred(self, pfn: int, end: int) -> bool:
        """No frame of ``[pfn, end)`` is deferred (the usual case, answered in O(log n))."""
        lazy = self._lazy
        return not len(lazy) or lazy.all_equal(pfn, end, None)

    def _write_locked(self, pfn: int, npages: int, filler: Filler) -> None:
        """``filler`` writes frames ``[pfn, pfn + npages)``, chunk by chunk; caller holds ``_lazy_lock``."""
        for arr, pos in self._spans(pfn << PAGE_SHIFT, npages << PAGE_SHIFT):
            filler.materialize(pfn + (pos >> PAGE_SHIFT), arr)

    def _settle(self, pfn: int, npages: int) -> None:
        """Write the deferred contents of frames ``[pfn, pfn + npages)``, if any: written first,
        then cleared, so a reader that finds them pending waits on the lock for the writer."""
        if self._none_deferred(pfn, pfn + npages):
            return
        with self._lazy_lock:
            for s, e, filler in list(self._lazy.segments(pfn, pfn + npages)):
                if filler is not None:
                    self._write_locked(s, e - s, filler)
                    self._lazy.set(s, e, None)

    def _forget(self, pfn: int, npages: int) -> None:
        """Drop the deferral of frames about to be overwritten whole (or freed)."""
        if self._none_deferred(pfn, pfn + npages):
            return
        with self._lazy_lock:
            self._lazy.set(pfn, pfn + npages, None)

    def _overwriting(self, addr: int, n: int) -> None:
        """Bytes ``[addr, addr + n)`` are about to be written: forget the frames they cover whole,
        settle the (at most two) they cover in part."""
        if n <= 0 or addr < 0 or addr + n > self.capacity_pages << PAGE_SHIFT:
            return  # nothing to write, or _spans refuses it
        first, last = addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT
        head = addr & (PAGE_SIZE - 1) != 0  # frame `first` is written in part
        tail = (addr + n) & (PAGE_SIZE - 1) != 0  # frame `last` is written in part
        if head:
            self._settle(first, 1)
        if tail:
            self._settle(last, 1)
        lo, hi = first + head, last + 1 - tail
        if hi > lo:
            self._forget(lo, hi - lo)

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the memfd and the mappings (a mapping with live views is left to the GC)."""
        with self._lock:
            if not self._finalizer.alive:
                return
            self._finalizer()
            self._arrays = [None] * len(self._arrays)
            for i, m in enumerate(self._maps):
                if m is not None:
                    try:
                        m.close()
                    except BufferError:  # a caller still holds a view; the GC unmaps it later
                        pass
                    self._maps[i] = None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> FramePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FramePool(capacity={self.capacity_pages} frames, allocated={self.allocated}, "
            f"free_runs={len(self._free)})"
        )

    # --- internals ------------------------------------------------------------------------------
    def _chunk(self, c: int) -> np.ndarray:
        arr = self._arrays[c]
        if arr is not None:
            return arr
        with self._lock:
            self._check_open()
            arr = self._arrays[c]
            if arr is None:
                chunk_bytes = self.chunk_pages << PAGE_SHIFT
                m = mmap.mmap(self._fd, chunk_bytes, mmap.MAP_SHARED, offset=c * chunk_bytes)
                self._maps[c] = m
                arr = self._arrays[c] = np.frombuffer(m, dtype=np.uint8)
            return arr

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError("frame pool is closed")

    def check_order(self, order: int) -> None:
        """ValueError unless ``order`` is a folio order this pool can allocate (0..max_order)."""
        if not 0 <= order <= self.max_order:
            raise ValueError(f"folio order {order} outside 0..{self.max_order}")

    def _check_run(self, pfn: int, npages: int) -> None:
        if pfn < 0 or npages < 0 or pfn + npages > self.capacity_pages:
            raise ValueError(f"frames [{pfn:#x}, {pfn + npages:#x}) outside the pool")
