"""v7 (seed 001): memfile_notifier, ``MFD_INACCESSIBLE`` and ``F_SEAL_AUTO_ALLOCATE`` in shmem itself.

In v7 the private memory is an ordinary memfd whose *shmem inode* was taught three things:

* a ``memfile_node`` (notifier list + ``MEMFILE_F_*`` flags) in every shmem inode.  Shmem
  registers itself as a memfile *backing store* (lookup of a file's node, ``get_pfn``,
  ``put_pfn``); KVM registers a notifier on a file with
  ``memfile_register_notifier(file, flags, notifier)`` (EOPNOTSUPP if no backing store knows the
  file, EINVAL if other users registered other flags) and gets pages through the backing store's
  ``get_pfn``/``put_pfn``.  Truncation (``shmem_undo_range``) calls ``notify_invalidate`` **once per
  folio, before the folio goes**, with the folio's index range clipped to the hole — a range, not
  an order.
* ``MFD_INACCESSIBLE``: the node gets ``MEMFILE_F_USER_INACCESSIBLE`` and read, write and mmap
  fail with EPERM; the size can be set once and page aligned (EPERM, EINVAL); a hole punch must be
  page aligned (EINVAL); it cannot be combined with ``MFD_ALLOW_SEALING`` (EINVAL), so it can never
  be sealed.  KVM's registration adds UNMOVABLE and UNRECLAIMABLE.
* ``F_SEAL_AUTO_ALLOCATE`` (0x20): on the *shared* memfd the VMM maps, a fault or ``write()`` may
  use a page that exists but never allocates one (``SGP_NOALLOC``: SIGBUS / ENOENT); only an
  explicit ``fallocate`` allocates.  So a stray access to a gfn that the private side currently
  backs cannot silently allocate a second copy.

The model reuses :class:`~guestmem.model.mm.shmem.ShmemFile` with folio-granular invalidation and
relays each folio as the range v7 passed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.files import BackedFile, pages_up
from guestmem.model.mm.shmem import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_WRITE,
    MAX_LFS_FILESIZE,
    ShmemFile,
)
from guestmem.model.process import HostFault, ModelMapping
from guestmem.model.vfs import vfs_fallocate_checks

if TYPE_CHECKING:
    from guestmem.model.kvm.system import ModelKvm

PS = u.PAGE_SIZE
MFD_NAME_MAX_LEN = 255 - len("memfd:")


class MemfileNotifier(Protocol):
    """``struct memfile_notifier_ops`` (v7): one op."""

    def invalidate(self, start: int, end: int) -> None: ...


class MemfileNode:
    """``struct memfile_node`` in the shmem inode: registered notifiers and ``MEMFILE_F_*`` flags.

    It receives the shmem file's per-folio invalidations and passes each on as v7's
    ``notify_invalidate`` did: the folio's index range, without its order.
    """

    def __init__(self) -> None:
        self.flags = 0
        self.notifiers: list[MemfileNotifier] = []
        self.calls = 0  # invalidate calls delivered (one per notifier per folio)

    def invalidate_folio(self, index: int, order: int) -> None:
        for n in list(self.notifiers):
            n.invalidate(index, index + (1 << order))
            self.calls += 1


class Memfd(BackedFile):
    """A v7 memfd: shmem with seals (``F_SEAL_AUTO_ALLOCATE`` among them) and a memfile node."""

    kind = "memfd"

    def __init__(self, system: ModelKvm, name: str, flags: int, folio_order: int = 0) -> None:
        shmem = ShmemFile(system.pool, 0, name=f"memfd:{name}", folio_order=folio_order,
                          allow_sealing=bool(flags & hu.MFD_ALLOW_SEALING), invalidate_granularity="folio")
        super().__init__(system, shmem)
        self.flags = flags
        self.node = MemfileNode()
        shmem.add_notifier(self.node)

    @property
    def inaccessible(self) -> bool:
        return bool(self.node.flags & hu.MEMFILE_F_USER_INACCESSIBLE)

    @property
    def seals(self) -> int:
        return self.shmem.seals

    @property
    def auto_allocate_sealed(self) -> bool:
        return bool(self.shmem.seals & hu.F_SEAL_AUTO_ALLOCATE)

    # --- fcntl / ftruncate / fallocate -------------------------------------------------------------
    def add_seals(self, seals: int) -> None:
        """``fcntl(F_ADD_SEALS)`` (v7 adds ``F_SEAL_AUTO_ALLOCATE`` to the accepted seals)."""
        self.shmem.add_seals(seals)

    def truncate(self, size: int) -> None:
        """``ftruncate``; with MFD_INACCESSIBLE the size is set once (EPERM) and page aligned (EINVAL)."""
        if size < 0:
            raise KvmError(errno.EINVAL, "ftruncate")
        if size > MAX_LFS_FILESIZE:
            raise KvmError(errno.EFBIG, "ftruncate")
        if self.inaccessible:
            if self.shmem.size:
                raise KvmError(errno.EPERM, "ftruncate", "an inaccessible memfd's size is set once")
            if size % PS:
                raise KvmError(errno.EINVAL, "ftruncate", "an inaccessible memfd's size is page aligned")
        self.shmem.truncate(size)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        vfs_fallocate_checks(mode, offset, length)
        if mode & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, "fallocate", "not supported by shmem")
        punch = bool(mode & u.FALLOC_FL_PUNCH_HOLE)
        if punch and self.shmem.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            raise KvmError(errno.EPERM, "fallocate", "sealed against writes")
        if punch and self.inaccessible and (offset % PS or length % PS):
            raise KvmError(errno.EINVAL, "fallocate", "an inaccessible memfd punches whole pages")
        if not punch:
            self.shmem.fallocate(mode, offset, length)
            return
        # A hole punch also unmaps the pages from every host mapping (unmap_mapping_range), which
        # secondary MMUs hear about through their MMU notifiers.
        first, last = pages_up(offset), (offset + length) // PS
        self.system.process.invalidate_file_range(
            self, first, max(first, last), lambda: self.shmem.fallocate(mode, offset, length))

    def punch_hole(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, offset, length)

    def allocate(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_KEEP_SIZE, offset, length)

    # --- read / write / mmap -------------------------------------------------------------------------
    def read(self, length: int, offset: int = 0) -> bytes:
        """``pread``: EPERM on an inaccessible memfd (once inside i_size, as shmem_file_read_iter)."""
        if offset < 0 or length < 0:
            raise KvmError(errno.EINVAL, "read")
        if offset >= self.size or length == 0:
            return b""
        if self.inaccessible:
            raise KvmError(errno.EPERM, "read", "memfd is inaccessible to userspace")
        return self.shmem.read(offset, length)

    def write(self, data: bytes, offset: int = 0) -> int:
        """``pwrite``: EPERM if write-sealed or inaccessible; with ``F_SEAL_AUTO_ALLOCATE`` a hole is
        ENOENT (``SGP_NOALLOC``), and a write reaching a hole after written pages stops short there."""
        if offset < 0:
            raise KvmError(errno.EINVAL, "write")
        if not data:
            return 0
        seals = self.shmem.seals
        if seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            raise KvmError(errno.EPERM, "write", "sealed against writes")
        if seals & F_SEAL_GROW and offset + len(data) > self.size:
            raise KvmError(errno.EPERM, "write", "sealed against growing")
        if self.inaccessible:
            raise KvmError(errno.EPERM, "write", "memfd is inaccessible to userspace")
        n = len(data)
        if self.auto_allocate_sealed:
            first, last = offset // PS, pages_up(offset + n)
            holes = self.cache.holes(first, last)
            if holes:
                if holes[0][0] == first:
                    raise KvmError(errno.ENOENT, "write", "F_SEAL_AUTO_ALLOCATE: no page to write into")
                n = holes[0][0] * PS - offset
        return self.shmem.write(offset, memoryview(bytes(data))[:n])

    def mmap(self, length: int | None = None, offset: int = 0, *, align: int = PS) -> ModelMapping:
        """``mmap(MAP_SHARED)``: EPERM on an inaccessible memfd."""
        length = self.size if length is None else length
        if length <= 0 or offset % PS or offset < 0:
            raise KvmError(errno.EINVAL, "mmap")
        if self.inaccessible:
            raise KvmError(errno.EPERM, "mmap", "memfd is inaccessible to userspace")
        return self.system.process.mmap(self, length, offset // PS, align=align)

    # --- MappableFile: host faults through a mapping ------------------------------------------------
    def _fault_stop(self, start: int, end: int) -> int:
        npages = pages_up(self.size)
        stop = min(end, npages)
        if stop <= start:
            raise HostFault(start, "SIGBUS: beyond the end of the file")
        if self.auto_allocate_sealed:
            holes = self.cache.holes(start, stop)
            if holes and holes[0][0] == start:
                raise HostFault(start, "SIGBUS: F_SEAL_AUTO_ALLOCATE forbids allocating on fault")
            if holes:
                stop = holes[0][0]
        else:
            self.cache.populate(start, stop, self.folio_order, limit=npages)
        self.cache.prepare(start, stop)
        return stop

    def host_fault(self, start: int, end: int, write: bool) -> list[tuple[int, int, int]]:
        with self.shmem.lock:
            stop = self._fault_stop(start, end)
            return [(s, e, pfn) for s, e, pfn, _ in self.cache.lookup_range(start, stop) if pfn is not None]

    def folio_runs(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        with self.shmem.lock:
            stop = self._fault_stop(start, end)
            return [(s, e, pfn, o) for s, e, pfn, o in self.cache.lookup_range(start, stop)
                    if pfn is not None]

    def pin_pages(self, start: int, end: int) -> Callable[[], None]:
        return self.cache.pin(start, end)

    def access_lock(self) -> AbstractContextManager[object]:
        return nullcontext()

    def frame_view(self, pfn: int, npages: int) -> np.ndarray:
        return self.system.pool.view(pfn, npages)

    def discard_pages(self, start: int, end: int) -> None:
        """MADV_REMOVE through a mapping: punch the pages out of the file."""
        self.shmem.fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, start * PS, (end - start) * PS)


def memfd_create(system: ModelKvm, name: str, flags: int, *, folio_order: int = 0) -> Memfd:
    """``memfd_create(2)`` of a v7 kernel (``MFD_INACCESSIBLE`` rules; the model has no hugetlbfs)."""
    op = "memfd_create"
    if flags & ~hu.MFD_ALL_FLAGS:
        raise KvmError(errno.EINVAL, op, f"unknown flags {flags:#x}")
    if flags & hu.MFD_INACCESSIBLE and flags & hu.MFD_ALLOW_SEALING:
        raise KvmError(errno.EINVAL, op, "MFD_INACCESSIBLE cannot be combined with MFD_ALLOW_SEALING")
    if len(name.encode()) > MFD_NAME_MAX_LEN:
        raise KvmError(errno.EINVAL, op, "name too long")
    if flags & hu.MFD_HUGETLB:
        # An inaccessible hugetlbfs file has no memfile backing store (memfile_node_set_flags answers
        # EOPNOTSUPP); a plain hugetlbfs memfd is outside the model.
        raise KvmError(errno.EOPNOTSUPP, op, "no memfile backing store for hugetlbfs (the model has none)")
    f = Memfd(system, name, flags, folio_order)
    if flags & hu.MFD_INACCESSIBLE:
        memfile_node_set_flags(f, hu.MEMFILE_F_USER_INACCESSIBLE)
    f.install()
    return f


# --- backing stores (mm/memfile_notifier.c) --------------------------------------------------------------

@dataclass(frozen=True)
class MemfileBackingStore:
    """``struct memfile_backing_store``: how a filesystem offers its files to memfile_notifier users."""

    name: str
    lookup_memfile_node: Callable[[object], MemfileNode | None]
    get_pfn: Callable[[Any, int], tuple[int, int]]
    put_pfn: Callable[[Any, int], None]


_backing_stores: list[MemfileBackingStore] = []


def memfile_register_backing_store(bs: MemfileBackingStore) -> None:
    """A filesystem registers itself at boot (shmem does from ``shmem_init``)."""
    _backing_stores.append(bs)


def _lookup(file: object) -> tuple[MemfileBackingStore, MemfileNode] | None:
    for bs in _backing_stores:
        node = bs.lookup_memfile_node(file)
        if node is not None:
            return bs, node
    return None


SHMEM_BACKING_STORE = MemfileBackingStore(
    "shmem",
    lookup_memfile_node=lambda f: f.node if isinstance(f, Memfd) else None,
    get_pfn=lambda f, index: f.get_page(index),  # shmem_getpage(SGP_WRITE): allocates, order of the folio
    put_pfn=lambda f, pfn: f.put_page(pfn),
)
memfile_register_backing_store(SHMEM_BACKING_STORE)


# --- the memfile_notifier API for consumers (KVM) -----------------------------------------------------

def memfile_node_set_flags(file: object, flags: int) -> None:
    """Set a file's ``MEMFILE_F_*`` flags (memfd_create does, for MFD_INACCESSIBLE)."""
    if flags & ~hu.MEMFILE_F_ALLOWED_MASK:
        raise KvmError(errno.EINVAL, "memfile_node_set_flags", f"unknown memfile flags {flags:#x}")
    found = _lookup(file)
    if found is None:
        raise KvmError(errno.EOPNOTSUPP, "memfile_node_set_flags", "no memfile backing store knows this file")
    found[1].flags = flags
    _update_mapping_flags(file, flags)


def _update_mapping_flags(file: Any, flags: int) -> None:
    # memfile_node_update_flags: the mapping's gfp and evictability follow the flags.
    file.shmem.unmovable = bool(flags & hu.MEMFILE_F_UNMOVABLE)
    file.shmem.unevictable = bool(flags & hu.MEMFILE_F_UNRECLAIMABLE)


def memfile_register_notifier(file: object, flags: int, notifier: MemfileNotifier) -> MemfileBackingStore:
    """Register ``notifier`` on ``file``'s memfile node with feature ``flags``; return the backing
    store that knows the file (``notifier->bs``), through which the pages are then reached."""
    op = "memfile_register_notifier"
    if file is None or notifier is None:
        raise KvmError(errno.EINVAL, op)
    if flags & ~hu.MEMFILE_F_ALLOWED_MASK:
        raise KvmError(errno.EINVAL, op, f"unknown memfile flags {flags:#x}")
    found = _lookup(file)
    if found is None:
        raise KvmError(errno.EOPNOTSUPP, op, "no memfile backing store knows this file")
    bs, node = found
    if node.notifiers and node.flags != flags:
        raise KvmError(errno.EINVAL, op, "the file is registered with other flags")
    node.flags = flags
    node.notifiers.append(notifier)
    _update_mapping_flags(file, flags)
    return bs


def memfile_unregister_notifier(file: Memfd, notifier: MemfileNotifier) -> None:
    file.node.notifiers.remove(notifier)


def memfile_get_pfn(file: Memfd, index: int) -> tuple[int, int]:
    """The backing store's ``get_pfn``: ``(pfn, order)``, the page referenced until ``put_pfn``."""
    found = _lookup(file)
    if found is None:
        raise KvmError(errno.EOPNOTSUPP, "get_pfn", "no memfile backing store knows this file")
    return found[0].get_pfn(file, index)


def memfile_put_pfn(file: Memfd, pfn: int) -> None:
    found = _lookup(file)
    if found is None:
        raise KvmError(errno.EOPNOTSUPP, "put_pfn", "no memfile backing store knows this file")
    found[0].put_pfn(file, pfn)
