"""Thin ``ctypes`` bindings to the libc calls the kernel backend needs, each raising ``KvmError``.

Python's ``fcntl``/``mmap``/``os`` modules cover part of this, but they either hide the kernel's
answer (``mmap.mmap`` refuses a length past a regular file's size before asking the kernel) or do
not exist (``fallocate`` with arbitrary modes, ``process_vm_readv``, ``vmsplice``).  Every wrapper
here issues exactly one system call and turns a failure into ``KvmError(errno, name)`` so that the
kernel's own errno reaches the caller unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap as _mmap
import os
from collections.abc import Callable
from typing import Any, TypeVar

from guestmem import native
from guestmem.errors import KvmError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

# The non-blocking ioctls (KVM_CHECK_EXTENSION and the like answer in ~0.3 us) are issued without
# releasing the GIL: the compiled ``_fastioctl`` where it was built, else ctypes through a PyDLL
# handle (which keeps the GIL too).  Which one this process uses is ``FAST_PATH``.
_ioctl_gil = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).ioctl
_ioctl_gil.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl_gil.restype = ctypes.c_int
# Not built (no compiler at install time) or GUESTMEM_PURE set: the ctypes path does the same.
_fastioctl = native.load("linux._fastioctl")
FAST_PATH = "c-extension" if _fastioctl is not None else "ctypes"
if _fastioctl is not None:
    _fastioctl.set_error_type(KvmError)

_mmap_fn = _libc.mmap
_mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                     ctypes.c_long]
_mmap_fn.restype = ctypes.c_void_p

_mprotect = _libc.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mprotect.restype = ctypes.c_int

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86-64 system call numbers of the NUMA calls (libc has no wrappers; libnuma is not assumed).
SYS_mbind, SYS_set_mempolicy, SYS_get_mempolicy, SYS_move_pages = 237, 238, 239, 279

_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int

_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.POINTER(iovec),
                    ctypes.c_ulong, ctypes.c_ulong]
    _fn.restype = ctypes.c_ssize_t

_vmsplice = _libc.vmsplice
_vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_size_t, ctypes.c_uint]
_vmsplice.restype = ctypes.c_ssize_t

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_READ, PROT_WRITE = _mmap.PROT_READ, _mmap.PROT_WRITE
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = _mmap.MAP_SHARED, _mmap.MAP_PRIVATE, _mmap.MAP_ANONYMOUS
MAP_NORESERVE = getattr(_mmap, "MAP_NORESERVE", 0x4000)
SPLICE_F_NONBLOCK = 0x02
MADV_REMOVE = 9
F_SETPIPE_SZ = 1031
IOV_MAX = 1024


def _fail(name: str) -> KvmError:
    err = ctypes.get_errno()
    return KvmError(err, name, os.strerror(err))


def ioctl(fd: int, request: int, arg: Any = None, name: str = "ioctl") -> int:
    """Issue ``ioctl(fd, request, arg)``; ``arg`` is an int, a ctypes object (passed by reference) or None."""
    if arg is None:
        ptr: int | None = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        raise _fail(name)
    return ret


def _ioctl_int_ctypes(fd: int, request: int, arg: int) -> int:
    ret = _ioctl_gil(fd, request, arg)
    return -ctypes.get_errno() if ret < 0 else int(ret)


# ``ioctl_int(fd, request, arg)``: the raw call for non-blocking ioctls with an integer argument:
# the kernel's return value, or -errno (callers on hot paths inline their error check).
ioctl_int = _fastioctl.ioctl if _fastioctl is not None else _ioctl_int_ctypes


def ioctl_fast(fd: int, request: int, arg: int, name: str = "ioctl") -> int:
    """:func:`ioctl` with an integer argument, for ioctls that never block (the GIL is kept)."""
    ret: int = ioctl_int(fd, request, arg)
    if ret < 0:
        raise KvmError(-ret, name, os.strerror(-ret))
    return ret


_Method = TypeVar("_Method", bound=Callable[..., int])


def int_ioctl_method(request: int, name: str, takes_arg: bool = True) -> Callable[[_Method], _Method]:
    """Decorate a backend method that issues one non-blocking integer ioctl on ``self.fd``.

    With the compiled fast path the method becomes a ``_fastioctl.IntIoctlMethod``: the common call
    (one exact int argument in ``[0, 2**64)``, or none when ``takes_arg`` is false, on an object
    whose ``_open`` is True) issues ``ioctl(self.fd, request, arg)`` from C and raises
    ``KvmError(errno, name)`` on failure; any other call runs the decorated Python method, so it
    decides every argument rule and error.  Without the extension the Python method is returned
    unchanged.  Only for methods whose whole effect is that one ioctl.
    """

    def wrap(method: _Method) -> _Method:
        if _fastioctl is None:
            return method
        fast: _Method = _fastioctl.IntIoctlMethod(method, request, name, takes_arg)
        return fast

    return wrap


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0, name: str = "mmap") -> int:
    """``mmap(NULL, length, prot, flags, fd, offset)``; returns the address."""
    addr = _mmap_fn(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        raise _fail(name)
    return int(addr)


def mmap_fixed(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """``mmap(addr, length, prot, flags | MAP_FIXED, fd, offset)``: replaces what is at ``addr``."""
    ret = _mmap_fn(addr, length, prot, flags | 0x10, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise _fail("mmap")
    return int(ret)


def mprotect(addr: int, length: int, prot: int) -> None:
    if _mprotect(addr, length, prot) < 0:
        raise _fail("mprotect")


def _nodemask_words(mask: int | None, maxnode: int) -> ctypes.Array | None:
    if mask is None:
        return None
    words = max(1, min((maxnode + 63) // 64, 1024))
    return (ctypes.c_ulong * words)(*[(mask >> (64 * i)) & (2**64 - 1) for i in range(words)])


def mbind(addr: int, length: int, mode: int, nodemask: int | None, maxnode: int, flags: int) -> None:
    buf = _nodemask_words(nodemask, maxnode)
    ret = _syscall(ctypes.c_long(SYS_mbind), ctypes.c_ulong(addr), ctypes.c_ulong(length),
                   ctypes.c_ulong(mode & (2**64 - 1)), buf, ctypes.c_ulong(maxnode),
                   ctypes.c_uint(flags & 0xFFFFFFFF))
    if ret < 0:
        raise _fail("mbind")


def set_mempolicy(mode: int, nodemask: int | None, maxnode: int) -> None:
    buf = _nodemask_words(nodemask, maxnode)
    ret = _syscall(ctypes.c_long(SYS_set_mempolicy), ctypes.c_int(mode), buf, ctypes.c_ulong(maxnode))
    if ret < 0:
        raise _fail("set_mempolicy")


def get_mempolicy(addr: int, flags: int, maxnode: int = 1024) -> tuple[int, int]:
    """``get_mempolicy(&mode, nodemask, maxnode, addr, flags)``: ``(mode or node, nodemask)``."""
    mode = ctypes.c_int(0)
    buf = _nodemask_words(0, maxnode)
    ret = _syscall(ctypes.c_long(SYS_get_mempolicy), ctypes.byref(mode), buf, ctypes.c_ulong(maxnode),
                   ctypes.c_ulong(addr), ctypes.c_ulong(flags))
    if ret < 0:
        raise _fail("get_mempolicy")
    return mode.value, sum(int(w) << (64 * i) for i, w in enumerate(buf))


def move_pages_status(addrs: list[int]) -> list[int]:
    """``move_pages(0, n, pages, NULL, status, 0)``: each page's node or ``-errno``."""
    n = len(addrs)
    pages = (ctypes.c_void_p * max(n, 1))(*addrs)
    status = (ctypes.c_int * max(n, 1))()
    ret = _syscall(ctypes.c_long(SYS_move_pages), ctypes.c_int(0), ctypes.c_ulong(n), pages, None,
                   status, ctypes.c_int(0))
    if ret < 0:
        raise _fail("move_pages")
    return [int(status[i]) for i in range(n)]


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) < 0:
        raise _fail("munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    if _madvise(addr, length, advice) < 0:
        raise _fail("madvise(MADV_REMOVE)" if advice == MADV_REMOVE else "madvise")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with any mode; the kernel decides what it accepts."""
    if _fallocate(fd, mode, offset, length) < 0:
        raise _fail("fallocate")


def _iov(addr: int, length: int) -> iovec:
    return iovec(addr, length)


def process_vm_readv(dst: int, src: int, length: int) -> int:
    """Copy ``length`` bytes from this process's address ``src`` into ``dst`` through the kernel.

    A fault (what a load would turn into SIGBUS) ends the copy: the return value is the number of
    bytes copied before it; ``KvmError(EFAULT)`` if not even the first byte could be copied.
    """
    local, remote = _iov(dst, length), _iov(src, length)
    ret = _process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if ret < 0:
        raise _fail("process_vm_readv")
    return int(ret)


def process_vm_writev_repeat(dst: int, src: int, chunk: int, count: int) -> int:
    """Write ``count`` copies of the ``chunk`` bytes at ``src`` to ``dst`` (contiguous); see readv."""
    local = (iovec * count)(*[iovec(src, chunk) for _ in range(count)])
    remote = _iov(dst, chunk * count)
    ret = _process_vm_writev(os.getpid(), local, count, ctypes.byref(remote), 1, 0)
    if ret < 0:
        raise _fail("process_vm_writev")
    return int(ret)


def vmsplice(pipe_wfd: int, addr: int, length: int, flags: int = 0) -> int:
    """Splice the user pages ``[addr, addr+length)`` into a pipe: the pipe holds page references."""
    iov = _iov(addr, length)
    ret = _vmsplice(pipe_wfd, ctypes.byref(iov), 1, flags)
    if ret < 0:
        raise _fail("vmsplice")
    return int(ret)
