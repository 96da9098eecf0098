"""Ordinary host memory of the model: anonymous mappings and regular memfds.

Both are shmem-like files over the frame pool: pages appear zero-filled on first touch, any page
may be read and written by the host, and each can back a memslot's shared memory through its
mapping's address.  A regular memfd is also what a "not a guest_memfd" fd looks like to
``KVM_SET_USER_MEMORY_REGION2``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from guestmem import uapi as u
from guestmem.args import s64, u64
from guestmem.errors import KvmError
from guestmem.model.fileops import ModelFileOps
from guestmem.model.mm.frames import FramePool
from guestmem.model.mm.pagecache import PageCache
from guestmem.model.process import HostFault, ModelMapping, OpenFile, Process

PS = u.PAGE_SIZE


class ShmemBacking(ModelFileOps, OpenFile):
    """A sized shmem-like file: anonymous memory (``kind="anon"``) or a memfd (``kind="memfd"``)."""

    def __init__(self, pool: FramePool, process: Process, size: int, kind: str, folio_order: int = 0) -> None:
        self.pool = pool
        self.process = process
        self.size = size
        self.kind = kind
        self.folio_order = folio_order
        self.cache = PageCache(pool)

    @property
    def npages(self) -> int:
        return (self.size + PS - 1) // PS

    # --- MappableFile -----------------------------------------------------------------------------
    def host_fault(self, start: int, end: int, write: bool) -> list[tuple[int, int, int]]:
        stop = min(end, self.npages)
        if stop <= start:
            raise HostFault(start, "SIGBUS: beyond the end of the file")
        self.cache.populate(start, stop, self.folio_order, limit=self.npages)
        self.cache.prepare(start, stop)
        return [(s, e, pfn) for s, e, pfn, _ in self.cache.lookup_range(start, stop) if pfn is not None]

    def folio_runs(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """Like :meth:`host_fault` but with each run's folio order (for mapping-level decisions)."""
        self.host_fault(start, end, True)
        stop = min(end, self.npages)
        return [(s, e, pfn, o) for s, e, pfn, o in self.cache.lookup_range(start, stop) if pfn is not None]

    def discard_pages(self, start: int, end: int) -> None:
        self.cache.remove(start, end)

    def pin_pages(self, start: int, end: int) -> Callable[[], None]:
        return self.cache.pin(start, end)

    def access_lock(self) -> AbstractContextManager[object]:
        """Anonymous memory never turns private: nothing to fence."""
        return nullcontext()

    def frame_view(self, pfn: int, npages: int) -> np.ndarray:
        return self.pool.view(pfn, npages)

    @property
    def owner_process(self) -> Process:
        return self.process

    def _release(self) -> None:
        self.cache.clear()
        self.on_release()

    def on_release(self) -> None:
        """Hook for the owner (the system unregisters the file here)."""

    # --- HostFile ---------------------------------------------------------------------------------
    def mmap(self, length: int | None = None, offset: int = 0) -> ModelMapping:
        length = self.size if length is None else u64(length, "length")
        offset = s64(offset, "offset")
        self.process.run_deferred()
        if self.fd < 0:
            raise KvmError(errno.EBADF, "mmap", "file is closed")
        if offset % PS or offset < 0:
            raise KvmError(errno.EINVAL, "mmap", "offset must be page aligned")
        return self.process.mmap(self, length, offset // PS)
