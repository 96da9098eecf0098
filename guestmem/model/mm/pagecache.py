"""``PageCache``: one file's index -> frame map (the model's ``address_space``), over a FramePool.

Why it exists: every backing file of the model (anonymous memory, memfds, guest_memfd) needs the
same things the kernel's page cache gives it — which frame holds page ``index``, in a folio of which
order, whether the page has been zeroed before first use ("uptodate"), and how many extra references
(pins) it carries — and it must answer over ranges of a 1 TiB file at a cost that grows with the
number of distinct ranges, never with pages.

Representation (four :class:`~guestmem.ranges.RangeMap` s, nothing per page):

* ``index -> pfn - index`` (*delta* encoding): a physically contiguous allocation mapped at
  consecutive indices is one range whatever its length, so populating 16384 pages from a fresh pool
  is one entry, and a page's pfn is ``index + delta``.  Holes hold ``None``.
* ``index -> folio order``: a folio of order ``k`` covers the naturally aligned index block
  ``[i & ~(2^k-1), +2^k)`` and (because its delta is a multiple of ``2^k``) an equally aligned pfn
  block.  Adjacent folios of equal order merge into one range; alignment still names each folio.
* ``index -> uptodate``: the page has been zeroed (or fully written) since it was allocated.
  Allocation does not zero (:meth:`populate`); :meth:`prepare` zeroes at most once, as
  guest_memfd's "zero on first use" requires.  Tracked per page, so a folio may be partly uptodate.
* ``index -> extra references`` (pins, default 0).

Large folios: :meth:`split` turns folios into pieces of a smaller order (to 4 KiB by default), as
the hugepage series' split does before converting part of a huge page; a pinned folio cannot be
split (``EAGAIN``), as ``split_folio`` fails on extra references.  :meth:`merge` reassembles an
aligned block into one large folio: in place when its pages are already physically contiguous and
aligned (metadata only — no copy, pfns unchanged), else, only if the caller allows migration, by
copying the block into a fresh folio and freeing the old frames (pfns change, so the owning file
must invalidate mappings around it; :class:`~guestmem.model.mm.shmem.ShmemFile` does).

Thread safety: an internal re-entrant lock serialises every call; callers that need several calls
to be atomic (fault vs. punch) hold their own lock around them, as the kernel's invalidate lock does.
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from guestmem.errors import KvmError
from guestmem.model.mm.frames import FramePool
from guestmem.model.mm.stats import CacheStats
from guestmem.ranges import RangeMap
from guestmem.uapi import PAGE_SHIFT, PAGE_SIZE

MAX_INDEX = 1 << (63 - PAGE_SHIFT)  # one past the last page index a file (loff_t) can reach

_Buffer = bytes | bytearray | memoryview | np.ndarray


def zip_segments(
    maps: Sequence[RangeMap[Any]], start: int, end: int
) -> Iterator[tuple[int, int, tuple[Any, ...]]]:
    """Cover ``[start, end)`` with the common refinement of several maps: ``(s, e, (v1, v2, ...))``."""
    if start >= end:
        return
    its = [m.segments(start, end) for m in maps]
    cur = [next(it) for it in its]
    pos = start
    while pos < end:
        e = min(c[1] for c in cur)
        yield pos, e, tuple(c[2] for c in cur)
        pos = e
        if pos < end:
            for i, c in enumerate(cur):
                if c[1] == pos:
                    cur[i] = next(its[i])


class PageCache:
    """The pages of one file: index -> (pfn, folio order, uptodate, pins), all held as ranges."""

    def __init__(self, pool: FramePool) -> None:
        self.pool = pool
        self._delta: RangeMap[int | None] = RangeMap(None)
        self._order: RangeMap[int] = RangeMap(0)
        self._uptodate: RangeMap[bool] = RangeMap(False)
        self._refs: RangeMap[int] = RangeMap(0)
        self._nr = 0
        self._lock = threading.RLock()
        self._stats = CacheStats()
        # NUMA placement (None: anywhere, the fast path): ``placement(start, end)`` answers pieces
        # ``(s, e, node)`` saying which node new pages of ``[start, end)`` come from (the file's
        # memory policy, as ``__filemap_get_folio_mpol`` passes it to the allocator).
        self.placement: Callable[[int, int], list[tuple[int, int, int | None]]] | None = None

    # --- lookups --------------------------------------------------------------------------------
    @property
    def nr_pages(self) -> int:
        """Pages present (the kernel's ``mapping->nrpages``)."""
        return self._nr

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats.snapshot()

    def lookup(self, index: int) -> tuple[int, int] | None:
        """``(pfn, order)`` of the page at ``index`` (the page's own pfn, not the folio head's), or None."""
        with self._lock:
            d = self._delta.get(index)
            if d is None:
                return None
            return index + d, self._order.get(index)

    def folio(self, index: int) -> tuple[int, int, int] | None:
        """``(head_index, head_pfn, order)`` of the folio holding ``index``, or None for a hole."""
        with self._lock:
            d = self._delta.get(index)
            if d is None:
                return None
            order = self._order.get(index)
            head = index & ~((1 << order) - 1)
            return head, head + d, order

    def lookup_range(self, start: int, end: int) -> Iterator[tuple[int, int, int | None, int]]:
        """Maximal pieces ``(s, e, pfn_of_s, order)`` covering ``[start, end)``; holes have pfn None.

        Within a piece, pfns are consecutive and each naturally aligned ``2**order`` block of
        indices is one folio.  (A snapshot: the pieces are computed under the lock.)
        """
        with self._lock:
            pieces = [
                (s, e, None if d is None else s + d, 0 if d is None else o)
                for s, e, (d, o) in zip_segments((self._delta, self._order), start, end)
            ]
        return iter(pieces)

    def is_allocated(self, index: int) -> bool:
        return self._delta.get(index) is not None

    def all_allocated(self, start: int, end: int) -> bool:
        with self._lock:
            return not self._delta.any_match(start, end, _is_none)

    def allocated_count(self, start: int, end: int) -> int:
        """How many pages of ``[start, end)`` are present."""
        with self._lock:
            return self._delta.count(start, end, _not_none)

    def holes(self, start: int, end: int) -> list[tuple[int, int]]:
        """The missing pieces ``(s, e)`` of ``[start, end)``."""
        with self._lock:
            return [(s, e) for s, e, d in self._delta.segments(start, end) if d is None]

    def end_index(self) -> int:
        """One past the highest present index (0 if empty)."""
        with self._lock:
            last = 0
            for _, e, _ in self._delta.items():
                last = e
            return last

    def range_count(self) -> int:
        """Stored index->pfn ranges (1 for any physically contiguous file)."""
        return len(self._delta)

    # --- allocation -----------------------------------------------------------------------------
    def populate(
        self, start: int, end: int, order: int = 0, *, limit: int | None = None
    ) -> list[tuple[int, int, int]]:
        """Make ``[start, end)`` present, allocating only missing pages; return ``(s, e, pfn_of_s)``.

        New pages come in folios of ``order``, naturally aligned in index space, so a request is
        widened to whole folios (``populate(5, 6, 9)`` adds ``[0, 512)``).  Where an aligned block is
        already partly present, or would end beyond ``limit`` (an index, e.g. the file's size), the
        missing pages inside ``[start, end)`` get order-0 folios instead.  New pages are not zeroed
        and not uptodate.  All or nothing: on ``ENOMEM`` nothing is added.
        """
        self.pool.check_order(order)
        if start < 0 or end > MAX_INDEX:
            raise ValueError(f"index range [{start:#x}, {end:#x}) out of bounds")
        if start >= end:
            return []
        mask = (1 << order) - 1
        with self._lock:
            plan: list[tuple[int, int, int]] = []  # (index, npages, order)

            def small(s: int, e: int) -> None:
                s, e = max(s, start), min(e, end)
                if s < e:
                    plan.append((s, e - s, 0))

            big_end = MAX_INDEX if limit is None else limit
            for s, e, d in self._delta.segments(start & ~mask, (end + mask) & ~mask):
                if d is not None:
                    continue
                a, b = (s + mask) & ~mask, min(e, big_end) & ~mask
                if order and a < b:
                    small(s, a)
                    plan.append((a, b - a, order))
                    small(b, e)
                else:
                    small(s, e)
            done: list[tuple[int, list[tuple[int, int]], int]] = []
            try:
                for index, npages, o in plan:
                    if self.placement is None:
                        done.append((index, self.pool.alloc_range(npages, o), o))
                        continue
                    for s, e, node in self.placement(index, index + npages):
                        if o:  # a large folio comes from one node: its head's
                            s, e = index, index + npages
                        done.append((s, self.pool.alloc_range(e - s, o, node), o))
                        if o:
                            break
            except KvmError:
                for _, runs, _ in done:
                    for pfn, n in runs:
                        self.pool.free(pfn, n)
                raise
            added = 0
            for index, runs, o in done:
                i = index
                for pfn, n in runs:
                    self._delta.set(i, i + n, pfn - i)
                    if o:
                        self._order.set(i, i + n, o)
                    i += n
                added += i - index
            self._nr += added
            self._stats.populated += added
            return [(s, e, s + d) for s, e, d in self._delta.segments(start, end) if d is not None]

    def remove(self, start: int, end: int) -> int:
        """Remove and free the pages of ``[start, end)``; return how many were removed.

        A large folio only partly inside the range is split first (to order 0) and only its covered
        pages go.  If it cannot be split because it is pinned, its covered pages are zeroed
        instead and stay, as ``truncate_inode_partial_folio`` does.  Extra references on removed
        pages are dropped with them (counted in ``stats.removed_pinned``): the model frees the frame
        at once, because everything that maps a frame is invalidated before the removal.
        """
        with self._lock:
            if (end == start + 1 and self._delta.get(start) is None and not self._order.get(start)
                    and not self._uptodate.get(start) and not self._refs.get(start)):
                return 0  # one page that is a hole with nothing recorded: nothing to split or clear
            lo, hi = self.trim_edges(start, end)
            if lo >= hi:
                return 0
            removed = 0
            for s, e, d in list(self._delta.segments(lo, hi)):
                if d is not None:
                    self.pool.free(s + d, e - s)
                    removed += e - s
            self._stats.removed_pinned += self._refs.count(lo, hi, _positive)
            self._delta.set(lo, hi, None)
            self._order.set(lo, hi, 0)
            self._uptodate.set(lo, hi, False)
            self._refs.set(lo, hi, 0)
            self._nr -= removed
            self._stats.removed += removed
            return removed

    def trim_edges(self, start: int, end: int) -> tuple[int, int]:
        """Get ``[start, end)`` ready for removal; return the sub-range whose folios can go whole.

        A large folio straddling an edge is split to order 0; a pinned one cannot be, so the part
        of it inside the range is zeroed and it is left out of the returned range.
        """
        if start >= end:
            return start, start
        with self._lock:
            lo, hi = start, end
            for edge in {start, end - 1}:
                f = self.folio(edge)
                if f is None or f[2] == 0:
                    continue
                fs, fe = f[0], f[0] + (1 << f[2])
                if start <= fs and fe <= end:
                    continue
                if self._refs.any_match(fs, fe, _positive):
                    cs, ce = max(fs, start), min(fe, end)
                    self.pool.zero(f[1] + (cs - fs), ce - cs)
                    if edge == start:
                        lo = max(lo, fe)
                    if edge == end - 1:
                        hi = min(hi, fs)
                else:
                    self._split_locked(fs, fe, 0)
            return lo, hi

    def clear(self) -> int:
        """Remove every page (the file is going away); return how many."""
        return self.remove(0, MAX_INDEX)

    # --- folio shape ----------------------------------------------------------------------------
    def split(self, start: int, end: int, new_order: int = 0) -> int:
        """Split every folio of order > ``new_order`` touching ``[start, end)`` into ``new_order`` pieces.

        A folio is always split whole (pfns do not change; only the order map does).  Returns
        the number of folios split.  ``EAGAIN`` if any of them carries extra references, and then
        nothing is split.
        """
        with self._lock:
            return self._split_locked(start, end, new_order)

    def _split_locked(self, start: int, end: int, new_order: int) -> int:
        todo: list[tuple[int, int]] = []
        for s, e, o in self._order.segments(start, end):
            if o > new_order:
                mask = (1 << o) - 1
                todo.append((s & ~mask, (e + mask) & ~mask))
                if self._refs.any_match(todo[-1][0], todo[-1][1], _positive):
                    raise KvmError(errno.EAGAIN, "split_folio", "folio has extra references")
        folios = 0
        for s, e in todo:
            folios += (e - s) >> self._order.get(s)
            self._order.set(s, e, new_order)
        self._stats.splits += folios
        return folios

    def merge(self, start: int, order: int = 9, *, migrate: bool = False) -> bool:
        """Make the aligned block ``[start, start + 2**order)`` one folio of ``order``; True on success.

        In place if the block is fully present, physically contiguous and pfn-aligned (no copy);
        otherwise, only when ``migrate`` is set, by copying it into a freshly allocated folio
        (``EAGAIN`` if any page is pinned, ``ENOMEM`` if no aligned folio is free).  False when the
        block is not fully present, or not contiguous and migration was not allowed.
        """
        self.pool.check_order(order)
        size = 1 << order
        if start & (size - 1):
            raise ValueError(f"index {start:#x} is not aligned to order {order}")
        end = start + size
        with self._lock:
            if self._delta.any_match(start, end, _is_none):
                return False
            if self._order.get(start) >= order:
                return True
            segs = [(s, e, d) for s, e, d in self._delta.segments(start, end) if d is not None]
            if len(segs) == 1 and (start + segs[0][2]) & (size - 1) == 0:
                self._order.set(start, end, order)
                self._stats.merges += 1
                return True
            if not migrate:
                return False
            self._move_locked(start, end, segs, order)
            self._stats.merges += 1
            return True

    def migrate(self, index: int, node: int | None = None) -> int:
        """Move the folio holding ``index`` to new frames, copying it; return the page's new pfn.

        ``ENOENT`` for a hole, ``EAGAIN`` if the folio is pinned, ``ENOMEM`` if no frames are free.
        """
        with self._lock:
            f = self.folio(index)
            if f is None:
                raise KvmError(errno.ENOENT, "migrate_folio", f"no page at index {index:#x}")
            head, _, order = f
            end = head + (1 << order)
            new = self._move_locked(head, end, list(self._delta.segments(head, end)), order, node)
            return new + (index - head)

    def _move_locked(self, start: int, end: int, segs: list[tuple[int, int, Any]], order: int,
                     node: int | None = None) -> int:
        if self._refs.any_match(start, end, _positive):
            raise KvmError(errno.EAGAIN, "migrate_folio", "folio has extra references")
        new = self.pool.alloc_range(1 << order, order, node)[0][0]
        for s, e, d in segs:
            self.pool.copy(new + (s - start), s + d, e - s)
        for s, e, d in segs:
            self.pool.free(s + d, e - s)
        self._delta.set(start, end, new - start)
        self._order.set(start, end, order)
        self._stats.migrations += 1
        return new

    # --- uptodate (zero before first use) -------------------------------------------------------
    def is_uptodate(self, index: int) -> bool:
        return self._uptodate.get(index)

    def uptodate(self, start: int, end: int) -> list[tuple[int, int]]:
        """The uptodate pieces ``(s, e)`` of ``[start, end)``."""
        with self._lock:
            return [(s, e) for s, e, up in self._uptodate.segments(start, end) if up]

    def uptodate_count(self, start: int, end: int) -> int:
        with self._lock:
            return self._uptodate.count(start, end, bool)

    def mark_uptodate(self, start: int, end: int) -> None:
        """Mark the present pages of ``[start, end)`` uptodate (holes are skipped)."""
        with self._lock:
            for s, e, d in list(self._delta.segments(start, end)):
                if d is not None:
                    self._uptodate.set(s, e, True)

    def clear_uptodate(self, start: int, end: int) -> None:
        with self._lock:
            self._uptodate.set(start, end, False)

    def not_uptodate(self, start: int, end: int) -> list[tuple[int, int]]:
        """Present pieces ``(s, e)`` of ``[start, end)`` that are not uptodate."""
        with self._lock:
            return [
                (s, e)
                for s, e, (d, up) in zip_segments((self._delta, self._uptodate), start, end)
                if d is not None and not up
            ]

    def get_page(self, index: int, *, zero: bool, limit: int | None = None) -> tuple[int, int]:
        """``populate`` + (``zero``: ``prepare``) + lookup for the one page at ``index``: its
        ``(pfn, order)``.  The same effects as the three range calls, without their run lists:
        a guest fault on one 4 KiB page (lazy accept) takes this path a million times."""
        with self._lock:
            d = self._delta.get(index)
            fresh = d is None
            if fresh:  # populate(index, index + 1, 0) without its plan and run lists
                if index < 0 or index >= MAX_INDEX:
                    raise ValueError(f"index range [{index:#x}, {index + 1:#x}) out of bounds")
                pfn = self.pool.alloc_range(1, 0)[0][0]
                d = pfn - index
                self._delta.set(index, index + 1, d)
                self._nr += 1
                self._stats.populated += 1
            if zero and not self._uptodate.get(index):
                # A frame just taken from the pool already reads as zeros (free frames are punched
                # or were never written) unless the pool poisons new frames: no second punch.
                if not fresh or self.pool.poison is not None:
                    self.pool.zero(index + d, 1)
                self._uptodate.set(index, index + 1, True)
                self._stats.zeroed += 1
            return index + d, self._order.get(index)

    def prepare(self, start: int, end: int) -> int:
        """Zero the present, not-uptodate pages of ``[start, end)`` and mark them uptodate.

        Returns the number zeroed.  A page is zeroed here at most once per allocation, before
        its first use (guest_memfd's ``kvm_gmem_get_pfn`` / user-fault rule).
        """
        with self._lock:
            zeroed = 0
            for s, e, (d, up) in list(zip_segments((self._delta, self._uptodate), start, end)):
                if d is None or up:
                    continue
                self.pool.zero(s + d, e - s)
                self._uptodate.set(s, e, True)
                zeroed += e - s
            self._stats.zeroed += zeroed
            return zeroed

    # --- extra references -----------------------------------------------------------------------
    def get_ref(self, index: int) -> int:
        return self._refs.get(index)

    def add_ref(self, start: int, end: int, n: int = 1) -> None:
        """Add ``n`` (may be negative) extra references to every page of ``[start, end)``.

        The pages must be present, and no count may go below zero (ValueError otherwise; nothing
        changes).
        """
        with self._lock:
            if self._delta.any_match(start, end, _is_none):
                raise ValueError(f"add_ref on missing pages in [{start:#x}, {end:#x})")
            if n < 0 and self._refs.any_match(start, end, lambda v: v + n < 0):
                raise ValueError(f"reference count underflow in [{start:#x}, {end:#x})")
            self._refs.update(start, end, lambda v: v + n)

    def pin(self, start: int, end: int) -> Callable[[], None]:
        """A long-term pin (GUP) on the present pages of ``[start, end)``; returns the unpin.

        The pin is an extra reference on the *pages*, not on the indices: if the pages are
        truncated while pinned they leave the cache (the index reads as a hole, or as a new page
        later) but their frames stay allocated until the unpin, which then frees them
        (:meth:`FramePool.put_frames`).  Unpinning never touches a page that replaced them.
        """
        with self._lock:
            if self._delta.any_match(start, end, _is_none):
                raise ValueError(f"pin of missing pages in [{start:#x}, {end:#x})")
            runs = [(s, s + d, e - s) for s, e, d in self._delta.segments(start, end)]
            self._refs.update(start, end, lambda v: v + 1)
            for _, pfn, n in runs:
                self.pool.get_frames(pfn, n)
        done = False

        def unpin() -> None:
            nonlocal done
            if done:
                return
            done = True
            with self._lock:
                for index, pfn, n in runs:
                    for s, e, d in list(self._delta.segments(index, index + n)):
                        if d is not None and s + d == pfn + (s - index):
                            self._refs.update(s, e, lambda v: max(v - 1, 0))
                    self.pool.put_frames(pfn, n)

        return unpin

    def first_elevated(self, start: int, end: int) -> int | None:
        """The lowest index in ``[start, end)`` with extra references, or None."""
        with self._lock:
            return self._refs.first_match(start, end, _positive)

    def pinned(self, start: int, end: int) -> bool:
        return self.first_elevated(start, end) is not None

    # --- contents at byte granularity -----------------------------------------------------------
    def read(self, offset: int, n: int, *, raw: bool = False) -> bytes:
        """``n`` bytes from file offset ``offset``; holes read as zeros.

        Not-uptodate pages also read as zeros (as shmem reads a fallocated page) unless ``raw``,
        which shows the frame's actual bytes (e.g. poison, or ciphertext in a test).
        """
        out = np.zeros(n, dtype=np.uint8)
        self.read_into(offset, out, raw=raw)
        return out.tobytes()

    def read_into(self, offset: int, out: np.ndarray, *, raw: bool = False) -> None:
        """Like :meth:`read` into the ``uint8`` array ``out``; bytes of holes are left untouched."""
        n = len(out)
        if n == 0:
            return
        first, last = offset >> PAGE_SHIFT, (offset + n + PAGE_SIZE - 1) >> PAGE_SHIFT
        with self._lock:
            for s, e, (d, up) in zip_segments((self._delta, self._uptodate), first, last):
                if d is None or not (up or raw):
                    continue
                bs, be = max(s << PAGE_SHIFT, offset), min(e << PAGE_SHIFT, offset + n)
                self.pool.read_into(s + d, bs - (s << PAGE_SHIFT), out[bs - offset : be - offset])

    def write(
        self, offset: int, data: _Buffer, *, allocate: bool = True, order: int = 0, limit: int | None = None
    ) -> None:
        """Store ``data`` at file offset ``offset``, allocating missing pages if ``allocate``.

        New pages are allocated as :meth:`populate` does (``order``, ``limit``).
        Without ``allocate``, a missing page is ``EFAULT`` and nothing is written.  The written
        pages become uptodate; the unwritten part of a not-uptodate edge page is zeroed first.
        """
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            src = np.frombuffer(data, dtype=np.uint8)

        def put(pfn: int, page_off: int, pos: int, length: int) -> None:
            self.pool.write(pfn, page_off, src[pos : pos + length])

        self._store(offset, len(src), put, allocate, order, limit)

    def fill(
        self,
        offset: int,
        n: int,
        byte: int,
        *,
        allocate: bool = True,
        order: int = 0,
        limit: int | None = None,
    ) -> None:
        """Set ``n`` bytes from file offset ``offset`` to ``byte`` (allocation as in :meth:`write`)."""

        def put(pfn: int, page_off: int, pos: int, length: int) -> None:
            self.pool.fill_bytes(pfn, page_off, length, byte)

        self._store(offset, n, put, allocate, order, limit)

    def _store(
        self, offset: int, n: int, put: Any, allocate: bool, order: int, limit: int | None
    ) -> None:
        if offset < 0:
            raise ValueError("negative offset")
        if n == 0:
            return
        end = offset + n
        first, last = offset >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT
        with self._lock:
            if allocate:
                self.populate(first, last, order, limit=limit)
            elif self._delta.any_match(first, last, _is_none):
                raise KvmError(errno.EFAULT, "pagecache_write", "page not present")
            # Edge pages only partly written: zero the rest if they were never initialised.
            zeroed = set()
            if offset & (PAGE_SIZE - 1) and not self._uptodate.get(first):
                self._zero_bytes_locked(first << PAGE_SHIFT, offset - (first << PAGE_SHIFT))
                zeroed.add(first)
            if end & (PAGE_SIZE - 1) and not self._uptodate.get(last - 1):
                self._zero_bytes_locked(end, (last << PAGE_SHIFT) - end)
                zeroed.add(last - 1)
            self._stats.zeroed += len(zeroed)
            self._uptodate.set(first, last, True)
            for s, e, d in self._delta.segments(first, last):
                assert d is not None  # populated or checked above
                bs, be = max(s << PAGE_SHIFT, offset), min(e << PAGE_SHIFT, end)
                put(s + d, bs - (s << PAGE_SHIFT), bs - offset, be - bs)

    def zero_bytes(self, offset: int, n: int) -> None:
        """Zero ``n`` bytes from file offset ``offset`` in present pages (holes stay holes).

        Whole pages are zeroed by punching their frames; uptodate state is unchanged.
        """
        with self._lock:
            self._zero_bytes_locked(offset, n)

    def _zero_bytes_locked(self, offset: int, n: int) -> None:
        if n <= 0:
            return
        end = offset + n
        first, last = offset >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT
        for s, e, d in self._delta.segments(first, last):
            if d is None:
                continue
            base = s << PAGE_SHIFT  # byte offset of the piece; its first frame is s + d
            bs, be = max(base, offset), min(e << PAGE_SHIFT, end)
            # Whole pages inside [bs, be) are punched; the ragged ends are filled.
            ps, pe = (bs + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), be & ~(PAGE_SIZE - 1)
            if ps < pe:
                self.pool.zero(s + d + ((ps - base) >> PAGE_SHIFT), (pe - ps) >> PAGE_SHIFT)
                pieces = [(bs, ps), (pe, be)]
            else:
                pieces = [(bs, be)]
            for a, b in pieces:
                if a < b:
                    self.pool.fill_bytes(s + d, a - base, b - a, 0)

    # --- invariants -----------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the representation invariants (for tests and ``check_invariants``)."""
        with self._lock:
            for m in (self._delta, self._order, self._uptodate, self._refs):
                m.check()
            assert self._delta.count(0, MAX_INDEX, _not_none) == self._nr
            for s, e, o in self._order.items():
                mask = (1 << o) - 1
                assert s & mask == 0 and e & mask == 0, ("unaligned folio range", s, e, o)
                for ds, de, d in self._delta.segments(s, e):
                    assert d is not None, ("order on a hole", ds, de)
                    assert d & mask == 0, ("folio pfn misaligned", ds, d, o)
            for m in (self._uptodate, self._refs):
                for s, e, _ in m.items():
                    assert not self._delta.any_match(s, e, _is_none), ("state on a hole", s, e)
            runs = sorted((s + d, e - s) for s, e, d in self._delta.items() if d is not None)
            for (p1, n1), (p2, _) in itertools.pairwise(runs):
                assert p1 + n1 <= p2, ("two indices share a frame", p1, p2)
            for p, n in runs:
                assert self.pool.is_allocated(p, n), ("page on a free frame", p, n)

    def __repr__(self) -> str:
        return f"PageCache(nr_pages={self._nr}, ranges={len(self._delta)})"


def _is_none(v: object) -> bool:
    return v is None


def _not_none(v: object) -> bool:
    return v is not None


def _positive(v: int) -> bool:
    return v > 0
