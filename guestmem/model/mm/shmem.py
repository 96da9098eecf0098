"""``ShmemFile``: a tmpfs/shmem-like file — the store behind anonymous memory, memfds and guest_memfd.

The model needs one backing-file type that behaves like the kernel's shmem inode, because every
guest memory kind is one: host anonymous/shared memory is shmem, a regular ``memfd`` is shmem, and
guest_memfd (like restrictedmem and the inaccessible memfd before it, seeds 000-002) is a thin shim
over such a file.  This module keeps **shmem's own** rules and errnos (checked against the running
kernel by the tests); guest_memfd imposes its stricter ones on top in ``guestmem.model.kvm``.

What it holds: ``size`` (``i_size``), a :class:`~guestmem.model.mm.pagecache.PageCache`, memfd
seals, the ``unevictable`` / ``unmovable`` mapping flags, and registered notifiers.

``fallocate`` follows ``vfs_fallocate`` then ``shmem_fallocate``, first failing check wins:

1. ``offset < 0`` or ``length <= 0`` -> EINVAL.
2. Mode bits outside ``KEEP_SIZE`` and the mode mask (e.g. ``NO_HIDE_STALE``), an unknown
   combination, ``PUNCH_HOLE`` without ``KEEP_SIZE``, or ``COLLAPSE``/``INSERT``/``WRITE_ZEROES``
   with ``KEEP_SIZE`` -> EOPNOTSUPP.
3. ``offset + length`` beyond ``MAX_LFS_FILESIZE`` -> EFBIG.
4. Anything but allocate (0 / ``KEEP_SIZE``) and punch (``PUNCH_HOLE|KEEP_SIZE``) -> EOPNOTSUPP
   (shmem has no ``ZERO_RANGE``, ``COLLAPSE_RANGE``, ``INSERT_RANGE``, ``UNSHARE_RANGE``, ...).
5. Punch with ``F_SEAL_WRITE``/``F_SEAL_FUTURE_WRITE`` -> EPERM.  Otherwise the whole pages inside
   the range are removed (notifiers around it) and the partial pages at unaligned edges are zeroed
   in place, if present.  No size check: punching beyond ``i_size`` is fine.
6. Allocate past ``i_size`` with ``F_SEAL_GROW`` (even with ``KEEP_SIZE``) -> EPERM.  Pages are
   allocated (not zeroed: they read as zeros until first written); without ``KEEP_SIZE`` the size
   grows to ``offset + length``.  Out of frames -> ENOMEM, and the pages added by this call are
   removed again.

``truncate`` is ``ftruncate``: negative -> EINVAL, too big -> EFBIG, seals -> EPERM; when the size
does not grow, every page past it goes (even ``KEEP_SIZE`` preallocations, even when the size is
unchanged) and the tail of the new last page is zeroed.  ``read``/``write`` are ``pread``/``pwrite``.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.mm.frames import FramePool
from guestmem.model.mm.pagecache import MAX_INDEX, PageCache
from guestmem.model.mm.stats import FileStats
from guestmem.uapi import PAGE_SHIFT, PAGE_SIZE

MAX_LFS_FILESIZE = (1 << 63) - 1

# memfd seals (include/uapi/linux/fcntl.h)
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020
F_ALL_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC

_FALLOC_MODE_MASK = (
    u.FALLOC_FL_PUNCH_HOLE
    | u.FALLOC_FL_COLLAPSE_RANGE
    | u.FALLOC_FL_ZERO_RANGE
    | u.FALLOC_FL_INSERT_RANGE
    | u.FALLOC_FL_UNSHARE_RANGE
    | u.FALLOC_FL_WRITE_ZEROES
)

Granularity = Literal["range", "folio"]


def _pages_up(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


class ShmemFile:
    """A shmem inode: size, page cache, seals, flags and notifiers.

    ``folio_order``: the order new pages are allocated in (0 = 4 KiB; 9 = 2 MiB as tmpfs
    ``huge=always``).  A large folio is used only where its aligned block lies inside the file
    (within ``i_size``, or the range being allocated); elsewhere pages are order 0.

    ``allow_sealing=False`` is a memfd created without ``MFD_ALLOW_SEALING`` (``F_SEAL_SEAL`` set).

    All public methods take :attr:`lock` (re-entrant), which plays ``i_rwsem`` and the
    invalidate lock: notifier calls are made with it held.
    """

    def __init__(
        self,
        pool: FramePool,
        size: int = 0,
        *,
        name: str = "shmem",
        folio_order: int = 0,
        allow_sealing: bool = True,
        invalidate_granularity: Granularity = "range",
        unevictable: bool = False,
        unmovable: bool = False,
    ) -> None:
        if not 0 <= size <= MAX_LFS_FILESIZE:
            raise ValueError(f"size {size} out of range")
        if invalidate_granularity not in ("range", "folio"):
            raise ValueError(f"invalidate_granularity must be 'range' or 'folio': {invalidate_granularity!r}")
        pool.check_order(folio_order)
        self.name = name
        self.pool = pool
        self.cache = PageCache(pool)
        self.folio_order = folio_order
        self.invalidate_granularity: Granularity = invalidate_granularity
        self.unevictable = unevictable
        self.unmovable = unmovable
        self.lock = threading.RLock()
        self._size = size
        self._seals = 0 if allow_sealing else F_SEAL_SEAL
        self._notifiers: list[Any] = []
        self._writable_mappings = 0
        self._closed = False
        self._stats = FileStats()

    # --- state ----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """``i_size`` in bytes."""
        return self._size

    @property
    def seals(self) -> int:
        return self._seals

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> FileStats:
        with self.lock:
            return self._stats.snapshot()

    @property
    def blocks(self) -> int:
        """``st_blocks``: 512-byte units of allocated pages (KEEP_SIZE preallocations included)."""
        return self.cache.nr_pages << (PAGE_SHIFT - 9)

    def flags(self) -> dict[str, bool]:
        """The mapping flags, as reported (``AS_UNEVICTABLE``, ``AS_UNMOVABLE``)."""
        return {"unevictable": self.unevictable, "unmovable": self.unmovable}

    # --- notifiers ------------------------------------------------------------------------------
    def add_notifier(self, notifier: object) -> None:
        """Register a receiver of invalidations (see :mod:`guestmem.model.mm.notifier`)."""
        with self.lock:
            self._notifiers.append(notifier)

    def remove_notifier(self, notifier: object) -> None:
        with self.lock:
            self._notifiers.remove(notifier)

    @property
    def notifiers(self) -> tuple[object, ...]:
        return tuple(self._notifiers)

    def _remove_pages(self, start: int, end: int) -> int:
        """Remove the pages of index range ``[start, end)``, notifying around it; return the count."""
        if start >= end:
            return 0
        if self.invalidate_granularity == "folio":
            # Split straddling folios first, so that every folio delivered goes away whole.
            start, end = self.cache.trim_edges(start, end)
        with self._invalidating(start, end):
            removed = self.cache.remove(start, end)
        self._stats.punched_pages += removed
        return removed

    @contextmanager
    def _invalidating(self, start: int, end: int) -> Iterator[None]:
        """Bracket a removal or move of the pages of ``[start, end)`` with the notifiers."""
        if self.invalidate_granularity == "folio":
            self._notify_folios(start, end)
            yield
            return
        begun: list[Any] = []
        try:
            for n in self._notifiers:
                n.invalidate_begin(start, end)
                begun.append(n)
                self._stats.invalidate_begin += 1
            yield
        finally:
            for n in begun:  # every begin gets its end, even if something failed in between
                n.invalidate_end(start, end)
                self._stats.invalidate_end += 1

    def _notify_folios(self, start: int, end: int) -> None:
        if not self._notifiers:
            return
        for s, e, pfn, order in self.cache.lookup_range(start, end):
            if pfn is None:
                continue
            step = 1 << order
            for index in range(s, e, step):
                for n in self._notifiers:
                    n.invalidate_folio(index, order)
                    self._stats.invalidate_folio += 1

    # --- fallocate / truncate -------------------------------------------------------------------
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` with tmpfs semantics (module docstring has the checks, in order)."""
        op = "fallocate"
        self._check_open(op)
        if offset < 0 or length <= 0:
            raise KvmError(errno.EINVAL, op)
        if mode & ~(_FALLOC_MODE_MASK | u.FALLOC_FL_KEEP_SIZE):
            raise KvmError(errno.EOPNOTSUPP, op)
        keep = bool(mode & u.FALLOC_FL_KEEP_SIZE)
        kind = mode & _FALLOC_MODE_MASK
        if kind == u.FALLOC_FL_PUNCH_HOLE:
            if not keep:
                raise KvmError(errno.EOPNOTSUPP, op, "PUNCH_HOLE needs KEEP_SIZE")
        elif kind in (u.FALLOC_FL_COLLAPSE_RANGE, u.FALLOC_FL_INSERT_RANGE, u.FALLOC_FL_WRITE_ZEROES):
            if keep:
                raise KvmError(errno.EOPNOTSUPP, op)
        elif kind not in (0, u.FALLOC_FL_ZERO_RANGE, u.FALLOC_FL_UNSHARE_RANGE):
            raise KvmError(errno.EOPNOTSUPP, op)
        if offset + length > MAX_LFS_FILESIZE:
            raise KvmError(errno.EFBIG, op)
        if mode & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, op, "not supported by shmem")
        with self.lock:
            if mode & u.FALLOC_FL_PUNCH_HOLE:
                if self._seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                    raise KvmError(errno.EPERM, op, "sealed against writes")
                self._punch(offset, length)
            else:
                end = offset + length
                if self._seals & F_SEAL_GROW and end > self._size:
                    raise KvmError(errno.EPERM, op, "sealed against growing")
                self._allocate(offset >> PAGE_SHIFT, _pages_up(end), limit=max(self._size, end))
                if not keep and end > self._size:
                    self._size = end
            self._stats.fallocate_calls += 1

    def _allocate(self, start: int, end: int, *, limit: int) -> None:
        try:
            self.cache.populate(start, end, self.folio_order, limit=_pages_up(limit))
        except KvmError as e:
            raise KvmError(e.errno or errno.ENOMEM, "fallocate", e.message) from e

    def _punch(self, offset: int, length: int) -> None:
        end = offset + length
        first, last = _pages_up(offset), end >> PAGE_SHIFT  # whole pages: [first, last)
        if first > last:  # inside one page
            self.cache.zero_bytes(offset, length)
            return
        if offset & (PAGE_SIZE - 1):
            self.cache.zero_bytes(offset, (first << PAGE_SHIFT) - offset)
        if end & (PAGE_SIZE - 1):
            self.cache.zero_bytes(last << PAGE_SHIFT, end - (last << PAGE_SHIFT))
        self._remove_pages(first, last)

    def truncate(self, size: int) -> None:
        """``ftruncate(2)``."""
        op = "ftruncate"
        self._check_open(op)
        if size < 0:
            raise KvmError(errno.EINVAL, op)
        if size > MAX_LFS_FILESIZE:
            raise KvmError(errno.EFBIG, op)
        with self.lock:
            old = self._size
            if (size < old and self._seals & F_SEAL_SHRINK) or (size > old and self._seals & F_SEAL_GROW):
                raise KvmError(errno.EPERM, op, "sealed")
            self._size = size
            if size <= old:
                hole = _pages_up(size)
                if size & (PAGE_SIZE - 1):
                    self.cache.zero_bytes(size, (hole << PAGE_SHIFT) - size)
                self._remove_pages(hole, max(self.cache.end_index(), _pages_up(old)))

    # --- pread / pwrite -------------------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        """``pread``: up to ``n`` bytes at ``offset``; short at end of file, ``b""`` past it."""
        self._check_open("read")
        if offset < 0 or n < 0 or offset + n > MAX_LFS_FILESIZE:
            raise KvmError(errno.EINVAL, "read")
        with self.lock:
            n = min(n, self._size - offset)
            if n <= 0:
                return b""
            return self.cache.read(offset, n)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """``pwrite``: store ``data`` at ``offset``, growing the file; returns the bytes written.

        With ``F_SEAL_GROW`` the write stops at the last page boundary within ``i_size`` (short
        count), or fails with EPERM if that leaves nothing, as shmem's per-page ``write_begin`` does.
        """
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._check_open("write")
        if offset < 0 or offset + n > MAX_LFS_FILESIZE:
            raise KvmError(errno.EINVAL, "write")
        with self.lock:
            if n == 0:
                return 0
            if self._seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                raise KvmError(errno.EPERM, "write", "sealed against writes")
            end = offset + n
            if self._seals & F_SEAL_GROW and end > self._size:
                boundary = self._size & ~(PAGE_SIZE - 1)
                if boundary <= offset:
                    raise KvmError(errno.EPERM, "write", "sealed against growing")
                n, end = boundary - offset, boundary
            limit = _pages_up(max(end, self._size))
            try:
                self.cache.write(offset, mv[:n], order=self.folio_order, limit=limit)
            except KvmError as e:
                raise KvmError(e.errno or errno.ENOMEM, "write", e.message) from e
            if end > self._size:
                self._size = end
            return n

    # --- faults ---------------------------------------------------------------------------------
    def get_folio(self, index: int, *, create: bool = True) -> tuple[int, int, int] | None:
        """``(head_index, head_pfn, order)`` of the folio at ``index``, allocating it if ``create``.

        No size check here (callers apply theirs: SIGBUS past EOF for a fault, EINVAL for gmem).
        A new folio has ``folio_order`` if its aligned block fits in the file, else order 0.
        Not zeroed: callers use ``cache.prepare`` before first use.
        """
        with self.lock:
            self._check_open("get_folio")
            f = self.cache.folio(index)
            if f is None and create:
                self.cache.populate(index, index + 1, self.folio_order, limit=_pages_up(self._size))
                f = self.cache.folio(index)
            return f

    # --- seals and writable mappings ------------------------------------------------------------
    def add_seals(self, seals: int) -> None:
        """``fcntl(F_ADD_SEALS)``: EINVAL unknown bits, EPERM if sealed, EBUSY if writably mapped/pinned."""
        op = "F_ADD_SEALS"
        if seals & ~F_ALL_SEALS:
            raise KvmError(errno.EINVAL, op)
        with self.lock:
            if self._seals & F_SEAL_SEAL:
                raise KvmError(errno.EPERM, op, "F_SEAL_SEAL is set")
            if seals & F_SEAL_WRITE and not self._seals & F_SEAL_WRITE:
                if self._writable_mappings:
                    raise KvmError(errno.EBUSY, op, "writable shared mappings exist")
                if self.cache.first_elevated(0, MAX_INDEX) is not None:
                    raise KvmError(errno.EBUSY, op, "pages are pinned")
            self._seals |= seals

    def map_writable(self) -> None:
        """A writable shared mapping is being created: EPERM under a write seal."""
        with self.lock:
            if self._seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                raise KvmError(errno.EPERM, "mmap", "sealed against writes")
            self._writable_mappings += 1

    def unmap_writable(self) -> None:
        with self.lock:
            if self._writable_mappings <= 0:
                raise ValueError("unbalanced unmap_writable")
            self._writable_mappings -= 1

    # --- migration ------------------------------------------------------------------------------
    def migrate(self, index: int) -> int:
        """Move the folio at ``index`` to new frames (as compaction would); return the page's new pfn.

        EINVAL if the mapping is unmovable (guest_memfd), ENOENT for a hole, EAGAIN if pinned.
        Users are invalidated around the move, since the pfn changes.
        """
        with self.lock:
            self._check_open("migrate")
            if self.unmovable:
                raise KvmError(errno.EINVAL, "migrate", "mapping is unmovable")
            f = self.cache.folio(index)
            if f is None:
                raise KvmError(errno.ENOENT, "migrate", f"no page at index {index:#x}")
            if self.cache.pinned(f[0], f[0] + (1 << f[2])):
                raise KvmError(errno.EAGAIN, "migrate", "folio has extra references")
            with self._invalidating(f[0], f[0] + (1 << f[2])):
                return self.cache.migrate(index)

    def merge(self, index: int, order: int = 9) -> bool:
        """Reassemble the aligned ``2**order`` block holding ``index`` into one folio; True on success.

        In place when the pages are physically contiguous (no invalidation: pfns do not move).
        Otherwise by migration, which only a movable mapping allows (an unmovable one answers
        False) and which invalidates users around the copy.
        """
        self.pool.check_order(order)
        start = index & ~((1 << order) - 1)
        end = start + (1 << order)
        with self.lock:
            self._check_open("merge")
            if self.cache.merge(start, order):
                return True
            if self.unmovable or not self.cache.all_allocated(start, end):
                return False
            with self._invalidating(start, end):
                return self.cache.merge(start, order, migrate=True)

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop every page (users are invalidated first); the file is unusable afterwards."""
        with self.lock:
            if self._closed:
                return
            self._remove_pages(0, max(self.cache.end_index(), _pages_up(self._size)))
            self._closed = True

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise KvmError(errno.EBADF, op)

    def __enter__(self) -> ShmemFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShmemFile({self.name!r}, size={self._size:#x}, pages={self.cache.nr_pages})"
