"""The ordinary file system calls on a real guest_memfd or memfd, and the raw ioctl escape hatch.

Each method is the one system call, issued through ``syscall(2)`` so that no libc or Python layer
rewrites the arguments (``os.lseek`` takes a C ``int`` whence, ``fcntl.fcntl`` a C ``int`` argument,
glibc maps some fcntl commands): the kernel decides, and its errno comes back as ``KvmError``.
A closed object passes an fd number no process has open, so the kernel's own order of checks
decides where EBADF comes (see ``guestmem.linux.gmem.CLOSED_FD``).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import os
import struct
import weakref
from typing import Any

from guestmem import fileabi as fa
from guestmem import uapi as u
from guestmem.api import FileStat, FsStat
from guestmem.args import as_bytes, s32, s64, u32, u64
from guestmem.errors import KvmError

CLOSED_FD = 0x7FFF_FFFF  # beyond any RLIMIT_NOFILE: never an open fd

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

# x86-64 system call numbers.
SYS_IOCTL, SYS_SENDFILE, SYS_DUP, SYS_LSEEK = 16, 40, 32, 8
SYS_OPENAT, AT_FDCWD = 257, -100
SYS_FCNTL, SYS_FSYNC, SYS_FDATASYNC, SYS_FCHMOD, SYS_FSTATFS = 72, 74, 75, 91, 138


def _call(name: str, nr: int, *args: int | ctypes.c_void_p | None) -> int:
    cargs = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_long(0 if a is None else a) for a in args]
    ret = _syscall(ctypes.c_long(nr), *cargs)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(err, name, os.strerror(err))
    return int(ret)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class KernelFileOps:
    """File system calls for a kernel-backend file object with ``fd`` and ``closed``."""

    fd: int
    _finalizer: Any

    def _sysfd(self) -> int:
        return CLOSED_FD if self._finalizer is None or not self._finalizer.alive else self.fd

    def fcntl(self, cmd: int, arg: int = 0) -> int:
        cmd, arg = u32(cmd, "cmd"), u64(arg, "arg")
        if cmd in fa.FCNTL_NEW_FD:
            raise ValueError("fcntl(F_DUPFD*) makes an fd with no object to hold it: use dup()")
        return _call("fcntl", SYS_FCNTL, self._sysfd(), cmd, _signed64(arg))

    def lseek(self, offset: int, whence: int) -> int:
        offset, whence = s64(offset, "offset"), u32(whence, "whence")
        return _call("lseek", SYS_LSEEK, self._sysfd(), offset, whence)

    def dup(self) -> Any:
        """``dup(2)``: a second object on the same open file (offset and flags shared)."""
        fd = _call("dup", SYS_DUP, self._sysfd())
        other = copy.copy(self)
        other.fd = fd
        other._finalizer = weakref.finalize(other, _close_quiet, fd)
        return other

    def reopen(self, flags: int) -> Any:
        """``open("/proc/self/fd/N", flags)``: a new open file description of the same inode."""
        flags = fa.check_reopen_flags(flags)
        path = ctypes.create_string_buffer(f"/proc/self/fd/{self._sysfd()}".encode())
        fd = _call("open", SYS_OPENAT, AT_FDCWD, ctypes.c_void_p(ctypes.addressof(path)), flags, 0)
        other = copy.copy(self)
        other.fd = fd
        other._finalizer = weakref.finalize(other, _close_quiet, fd)
        return other

    def fstat(self) -> FileStat:
        try:
            st = os.fstat(self._sysfd())
        except OSError as err:
            raise KvmError(err.errno or 0, "fstat") from None
        return FileStat(st_mode=st.st_mode, st_size=st.st_size, st_blocks=st.st_blocks,
                        st_blksize=st.st_blksize, st_nlink=st.st_nlink, st_ino=st.st_ino)

    def fstatfs(self) -> FsStat:
        buf = ctypes.create_string_buffer(120)
        _call("fstatfs", SYS_FSTATFS, self._sysfd(), ctypes.c_void_p(ctypes.addressof(buf)))
        f_type, f_bsize, f_blocks = struct.unpack_from("<qqq", buf.raw, 0)
        f_namelen, f_frsize, f_flags = struct.unpack_from("<qqq", buf.raw, 64)
        return FsStat(f_type=f_type, f_bsize=f_bsize, f_blocks=f_blocks, f_namelen=f_namelen,
                      f_frsize=f_frsize, f_flags=f_flags)

    def fsync(self) -> None:
        _call("fsync", SYS_FSYNC, self._sysfd())

    def fdatasync(self) -> None:
        _call("fdatasync", SYS_FDATASYNC, self._sysfd())

    def fchmod(self, mode: int) -> None:
        mode = u32(mode, "mode")
        _call("fchmod", SYS_FCHMOD, self._sysfd(), mode)

    def sendfile(self, in_file: Any, offset: int | None, count: int) -> int:
        """``sendfile(self.fd, in_file, &offset or NULL, count)``; ``in_file`` a file object or fd."""
        # The integer rule in the order of the signature: the offset, then the count.
        if offset is not None:
            offset = s64(offset, "offset")
        count = u64(count, "count")
        if isinstance(in_file, KernelFileOps):
            in_fd = in_file._sysfd()
        elif isinstance(in_file, bool) or not isinstance(in_file, int):
            raise TypeError(f"in_file must be a GuestMemfd, HostFile or fd, not {type(in_file).__name__}")
        else:
            in_fd = s32(in_file, "in_file")
        pos = None if offset is None else ctypes.c_longlong(offset)
        ptr = None if pos is None else ctypes.c_void_p(ctypes.addressof(pos))
        return _call("sendfile", SYS_SENDFILE, self._sysfd(), in_fd, ptr, _signed64(count))

    # read/write for a memfd (KernelGuestMemfd has its own, same rules)
    def read(self, length: int, offset: int | None = None) -> bytes:
        op = "read" if offset is None else "pread"
        length = min(u64(length, "length"), fa.MAX_RW_COUNT)
        if offset is not None:
            offset = s64(offset, "offset")
        try:
            if offset is None:
                return os.read(self._sysfd(), length)
            return os.pread(self._sysfd(), length, offset)
        except OSError as err:
            raise KvmError(err.errno or 0, op) from None

    def write(self, data: Any, offset: int | None = None) -> int:
        op = "write" if offset is None else "pwrite"
        data = as_bytes(data, "data")
        if offset is not None:
            offset = s64(offset, "offset")
        try:
            if offset is None:
                return os.write(self._sysfd(), data)
            return os.pwrite(self._sysfd(), data, offset)
        except OSError as err:
            raise KvmError(err.errno or 0, op) from None

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        return raw_ioctl(self._sysfd(), request, arg)[:2]  # type: ignore[return-value]


def raw_ioctl(fd: int, request: object, arg: object) -> tuple[int, bytes, int]:
    """``ioctl(fd, request, arg)`` under :func:`guestmem.fileabi.raw_argument`'s rule; returns
    ``(ret, buffer after the call, request)``."""
    req, a = fa.raw_argument(request, arg)
    if isinstance(a, bytearray):
        cbuf = ctypes.create_string_buffer(bytes(a), max(len(a), 1))
        ret = _ioctl(fd, req, ctypes.addressof(cbuf))
        out = cbuf.raw[: len(a)]
    else:
        ret = _ioctl(fd, req, a)
        out = b""
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(err, f"ioctl({req:#x})", os.strerror(err))
    return ret, out, req


def keep(owner: Any, created: Any) -> int:
    """An fd a raw call created, wrapped in its typed object, held in ``owner.raw_objects``."""
    objs = owner.__dict__.setdefault("raw_objects", {})
    objs[created.fd] = created
    return int(created.fd)


def system_ioctl(kvm: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    from guestmem.linux.vm import KernelVm

    fd = kvm.fd if kvm._open else CLOSED_FD
    ret, out, req = raw_ioctl(fd, request, arg)
    if req == u.KVM_CREATE_VM:
        ret = keep(kvm, KernelVm(kvm, ret, int(arg)))  # type: ignore[call-overload]
    return ret, out


def vm_ioctl(vm: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    from guestmem.linux.gmem import KernelGuestMemfd
    from guestmem.linux.vcpu import KernelVcpu

    fd = vm.fd if vm._open else CLOSED_FD
    ret, out, req = raw_ioctl(fd, request, arg)
    if req == u.KVM_CREATE_GUEST_MEMFD:
        g = u.kvm_create_guest_memfd.from_buffer_copy(out[: ctypes.sizeof(u.kvm_create_guest_memfd)])
        ret = keep(vm, KernelGuestMemfd(vm, ret, int(g.size), int(g.flags)))
    elif req == u.KVM_CREATE_VCPU:
        try:
            vcpu = KernelVcpu(vm, int(arg), ret, vm.kvm.vcpu_mmap_size(),  # type: ignore[call-overload]
                              vm.kvm.supported_cpuid())
        except BaseException:
            os.close(ret)
            raise
        vm._vcpus.append(weakref.ref(vcpu))
        ret = keep(vm, vcpu)
    return ret, out


def vcpu_ioctl(vcpu: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    fd = CLOSED_FD if vcpu.closed else vcpu.fd
    ret, out, _ = raw_ioctl(fd, request, arg)
    return ret, out
