"""A real guest_memfd file (``KVM_CREATE_GUEST_MEMFD``) and the file operations userspace has on it.

Every operation is the plain system call on the fd — ``fallocate(2)`` with whatever mode the caller
gives, ``mmap``, ``pread``/``pwrite``, ``ftruncate``, ``fstat`` and the (in-place conversion)
``KVM_SET_MEMORY_ATTRIBUTES2`` ioctl — so the kernel, not this module, decides what is allowed, and
its errno reaches the caller as ``KvmError(errno, op)``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.args import as_bytes, check_reserved, s32, s64, u64
from guestmem.errors import KvmError
from guestmem.linux import _sys
from guestmem.linux.fileops import KernelFileOps
from guestmem.linux.memory import KernelMapping

if TYPE_CHECKING:
    from guestmem.linux.vm import KernelVm


CLOSED_FD = 0x7FFF_FFFF  # beyond any RLIMIT_NOFILE: never an open fd


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class KernelGuestMemfd(KernelFileOps):
    """A guest_memfd owned by one VM (the file holds a reference on the VM; the VM fd may close first)."""

    def __init__(self, vm: KernelVm, fd: int, size: int, flags: int) -> None:
        self.fd = fd
        self.size = size
        self.flags = u.GuestMemfdFlag(flags)  # an int that shows its flag names
        self.vm_fd = vm.fd
        self._vm = weakref.ref(vm)
        self._finalizer = weakref.finalize(self, _close_quiet, fd)

    @property
    def vm(self) -> KernelVm | None:
        return self._vm()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _fd(self, op: str) -> int:
        """The fd to issue ``op`` on: once closed, a number no process can have open, so the
        kernel itself answers, with its own order of checks (a negative ``pread`` offset is
        EINVAL before the fd is even looked up; most calls are EBADF)."""
        return CLOSED_FD if self.closed else self.fd

    # -- fallocate ----------------------------------------------------------------------------------
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        mode, offset, length = s32(mode, "mode"), s64(offset, "offset"), s64(length, "length")
        _sys.fallocate(self._fd("fallocate"), mode, offset, length)

    def allocate(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE, offset, length)

    # -- mmap ---------------------------------------------------------------------------------------
    def mmap(self, length: int | None = None, offset: int = 0, *, shared: bool = True) -> KernelMapping:
        """``mmap(fd)``; ``shared=False`` asks for ``MAP_PRIVATE`` (the kernel refuses it: EINVAL)."""
        length = self.size if length is None else u64(length, "length")
        offset = s64(offset, "offset")
        if not isinstance(shared, bool):
            raise TypeError(f"shared must be a bool, not {type(shared).__name__}")
        return KernelMapping.of_file(self._fd("mmap"), length, offset, shared=shared, owner=self)

    # -- read/write/truncate/stat -------------------------------------------------------------------
    def read(self, length: int, offset: int | None = None) -> bytes:
        """``read(2)`` (offset None) or ``pread(2)``: the kernel refuses both, differently."""
        op = "read" if offset is None else "pread"
        length = u64(length, "length")
        if offset is not None:
            offset = s64(offset, "offset")
        fd = self._fd(op)
        if length > 0x7FFFF000:  # MAX_RW_COUNT: the kernel clamps, Python would allocate it all
            length = 0x7FFFF000
        try:
            if offset is None:
                return os.read(fd, length)
            return os.pread(fd, length, offset)
        except OSError as err:
            raise KvmError(err.errno or 0, op) from None

    def write(self, data: bytes, offset: int | None = None) -> int:
        """``write(2)`` (offset None) or ``pwrite(2)``."""
        op = "write" if offset is None else "pwrite"
        data = as_bytes(data, "data")
        if offset is not None:
            offset = s64(offset, "offset")
        try:
            if offset is None:
                return os.write(self._fd(op), data)
            return os.pwrite(self._fd(op), data, offset)
        except OSError as err:
            raise KvmError(err.errno or 0, op) from None

    def truncate(self, size: int) -> None:
        size = s64(size, "size")
        try:
            os.ftruncate(self._fd("ftruncate"), size)
        except OSError as err:
            raise KvmError(err.errno or 0, "ftruncate") from None

    def stat(self) -> tuple[int, int, int]:
        try:
            st = os.fstat(self._fd("fstat"))
        except OSError as err:
            raise KvmError(err.errno or 0, "fstat") from None
        return st.st_size, st.st_blksize, st.st_ino

    # -- in-place conversion ------------------------------------------------------------------------
    def set_memory_attributes2(self, offset: int, size: int, attributes: int, flags: int = 0,
                               reserved: Sequence[int] = ()) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES2`` on this fd; ``error_offset`` is read back on failure.

        ``reserved`` fills the struct's reserved words (to check that the kernel refuses non-zero ones).
        """
        offset, size = u64(offset, "offset"), u64(size, "size")
        attributes, flags = u64(attributes, "attributes"), u64(flags, "flags")
        words = check_reserved(reserved, u.kvm_memory_attributes2)
        arg = u.kvm_memory_attributes2(offset=offset, size=size, attributes=attributes, flags=flags)
        for i, word in enumerate(words):
            arg.reserved[i] = word
        try:
            _sys.ioctl(self._fd("KVM_SET_MEMORY_ATTRIBUTES2"), u.KVM_SET_MEMORY_ATTRIBUTES2, arg)
        except KvmError as err:
            raise KvmError(err.errno or 0, "KVM_SET_MEMORY_ATTRIBUTES2", err.message,
                           error_offset=int(arg.error_offset)) from None

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> KernelGuestMemfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd}"
        return f"KernelGuestMemfd({state}, size={self.size:#x}, flags={self.flags:#x})"
