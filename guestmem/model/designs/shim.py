"""The pseudo-file v8 and v9 put in front of a tmpfs file (``memfd_inaccessible.c``/``restrictedmem.c``).

After v7's changes to shmem itself were rejected, v8 and v9 left shmem alone and wrapped a private
memfd in a file of their own pseudo filesystem whose ``file_operations`` have only ``release`` and
``fallocate``.  Everything else follows from that, the same in both:

* no ``read``/``write`` handlers: ``read(2)``/``write(2)`` fail in the VFS with EINVAL and
  ``pread(2)``/``pwrite(2)`` with ESPIPE (the pseudo file is not opened ``FMODE_PREAD``); no
  ``mmap`` handler: ENODEV;
* ``fallocate`` checks the VFS rules, refuses an unaligned hole punch (EINVAL) and forwards to the
  memfd; *when* the notifiers hear about it is the one thing the two versions do differently;
* ``setattr`` forwards a size change only while the memfd's size is 0 (then EPERM) and only page
  aligned (EINVAL); ``getattr`` reports the memfd;
* the memfd's mapping is unevictable and unmovable.
"""

from __future__ import annotations

import errno
import itertools
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.designs.files import BackedFile
from guestmem.model.mm.shmem import MAX_LFS_FILESIZE, Granularity, ShmemFile
from guestmem.model.vfs import vfs_fallocate_checks

if TYPE_CHECKING:
    from guestmem.model.kvm.system import ModelKvm

PS = u.PAGE_SIZE
_inode_numbers = itertools.count(0x9000)


class ShimFile(BackedFile, ABC):
    """A file with only ``release`` and ``fallocate``, over a private, unsealable memfd."""

    kind = "shim"
    magic = 0

    def __init__(self, system: ModelKvm, name: str, folio_order: int, granularity: Granularity) -> None:
        memfd = ShmemFile(system.pool, 0, name=name, folio_order=folio_order, allow_sealing=False,
                          invalidate_granularity=granularity, unevictable=True, unmovable=True)
        super().__init__(system, memfd)
        self.ino = next(_inode_numbers)
        self.lock = threading.Lock()  # data->lock: guards the notifier list
        self.notifiers: list[Any] = []
        self.notifier_calls = 0

    # --- the notifier list ---------------------------------------------------------------------
    def register_notifier(self, notifier: Any) -> None:
        with self.lock:
            self.notifiers.append(notifier)

    def unregister_notifier(self, notifier: Any) -> None:
        with self.lock:
            self.notifiers.remove(notifier)

    # --- file operations ------------------------------------------------------------------------
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        vfs_fallocate_checks(mode, offset, length)
        if mode & u.FALLOC_FL_PUNCH_HOLE and (offset % PS or length % PS):
            raise KvmError(errno.EINVAL, "fallocate", "hole punch must be page aligned")
        self._fallocate(mode, offset, length)

    @abstractmethod
    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        """Forward to the memfd, telling the notifiers when the version did."""

    def punch_hole(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, offset, length)

    def allocate(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_KEEP_SIZE, offset, length)

    def read(self, length: int, offset: int | None = None) -> bytes:
        if offset is not None:
            raise KvmError(errno.ESPIPE, "pread", "not opened FMODE_PREAD")
        raise KvmError(errno.EINVAL, "read", "no read handler")

    def write(self, data: bytes, offset: int | None = None) -> int:
        if offset is not None:
            raise KvmError(errno.ESPIPE, "pwrite", "not opened FMODE_PWRITE")
        raise KvmError(errno.EINVAL, "write", "no write handler")

    def mmap(self, length: int | None = None, offset: int = 0) -> object:
        raise KvmError(errno.ENODEV, "mmap", "no mmap handler")

    def truncate(self, size: int) -> None:
        """``ftruncate`` -> ``setattr``: the size is set once, page aligned."""
        if size < 0:
            raise KvmError(errno.EINVAL, "ftruncate")
        if size > MAX_LFS_FILESIZE:
            raise KvmError(errno.EFBIG, "ftruncate")
        if self.shmem.size:
            raise KvmError(errno.EPERM, "ftruncate", "the size can be set only once")
        if size % PS:
            raise KvmError(errno.EINVAL, "ftruncate", "size must be page aligned")
        self.shmem.truncate(size)

    def file_magic(self) -> int:
        """``file->f_inode->i_sb->s_magic``: how KVM recognises the file type."""
        return self.magic
