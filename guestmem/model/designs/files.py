"""What the three historical private-memory files share: a shmem file underneath, an fd, a lifetime.

In all three postings (seeds 001, 002, 000) the private memory is a tmpfs file that *userspace*
creates and owns: KVM only borrows it, taking a file reference per memslot, so closing the fd does
not take memory away from a running guest (unlike guest_memfd, which KVM creates, binds to one VM
and tears down on close).  :class:`BackedFile` is that common part, built on the model's
:class:`~guestmem.model.mm.shmem.ShmemFile`: the fd in the model's process, the reference count
(the fd, every memslot and every mapping hold one), the page cache registered with the system so
that frame conservation is checked, and the page lookup KVM uses (``get_page``/``put_page`` per
page as the series had it, ``pages`` for a run, as the model's fault path asks for one).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.mm.pagecache import MAX_INDEX, PageCache
from guestmem.model.mm.shmem import ShmemFile
from guestmem.model.process import OpenFile, Process

if TYPE_CHECKING:
    from guestmem.model.kvm.system import ModelKvm

PS = u.PAGE_SIZE


def pages_up(nbytes: int) -> int:
    return (nbytes + PS - 1) // PS


class BackedFile(OpenFile):
    """A userspace-owned file over a shmem inode, as KVM sees it through a memslot."""

    kind = "file"

    def __init__(self, system: ModelKvm, shmem: ShmemFile) -> None:
        self.system = system
        self.shmem = shmem
        self.released = False
        system.register_file(shmem)

    # --- the page cache -----------------------------------------------------------------------
    @property
    def cache(self) -> PageCache:
        return self.shmem.cache

    @property
    def size(self) -> int:
        return self.shmem.size

    @property
    def folio_order(self) -> int:
        return self.shmem.folio_order

    def pages(self, start: int, end: int, *, zero: bool = True) -> list[tuple[int, int, int, int]]:
        """The backing store's ``get_pfn`` applied to indices [start, end): runs ``(s, e, pfn, order)``.

        Pages are allocated as ``shmem_getpage(SGP_WRITE)`` does, which (unlike guest_memfd) does
        not stop at i_size: an index past the end gets an order-0 page.  The model zeroes a page on
        first use (the series did not, relying on the CoCo module to clear it).
        """
        with self.shmem.lock:
            if self.shmem.closed:
                raise KvmError(errno.EBADF, "get_pfn", "file released")
            try:
                self.cache.populate(start, end, self.folio_order, limit=pages_up(self.size))
            except KvmError as e:
                raise KvmError(e.errno or errno.ENOMEM, "get_pfn", e.message) from e
            if zero:
                self.cache.prepare(start, end)
            return [(s, e, pfn, o) for s, e, pfn, o in self.cache.lookup_range(start, end) if pfn is not None]

    def get_page(self, index: int) -> tuple[int, int]:
        """One page for KVM: ``(pfn, folio order)``, with a reference held until :meth:`put_page`."""
        if index < 0 or index >= MAX_INDEX:
            raise KvmError(errno.EINVAL, "get_pfn", f"index {index:#x} out of range")
        run = self.pages(index, index + 1)[0]
        self.cache.add_ref(index, index + 1, 1)
        return run[2], run[3]

    def put_page(self, pfn: int) -> None:
        """Drop the reference :meth:`get_page` took on the page at ``pfn``."""
        for s, e, base, _ in self.cache.lookup_range(0, max(self.cache.end_index(), 1)):
            if base is not None and base <= pfn < base + (e - s):
                index = s + (pfn - base)
                self.cache.add_ref(index, index + 1, -1)
                return
        raise ValueError(f"put_page: pfn {pfn:#x} is not a page of this file")

    # --- lifetime -------------------------------------------------------------------------------
    @property
    def owner_process(self) -> Process:
        return self.system.process

    def _release(self) -> None:
        self.released = True
        self.shmem.close()
        self.system.unregister_file(self.shmem)

    def stat(self) -> tuple[int, int, int]:
        """``(st_size, st_blksize, st_blocks)`` of the inner file (the shims forward getattr)."""
        return self.shmem.size, PS, self.shmem.blocks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fd={self.fd}, size={self.size:#x}, pages={self.cache.nr_pages})"


def resolve_fd(system: ModelKvm, fd: object) -> object | None:
    """``fget``: the object behind an fd number (or the object itself), None if not open."""
    if isinstance(fd, int):
        return system.process.fget(fd) if fd >= 0 else None
    owner_fd = getattr(fd, "fd", -1)
    return fd if isinstance(owner_fd, int) and owner_fd >= 0 and system.process.fget(owner_fd) is fd else None
