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
try:
    from guestmem.linux import _fastioctl  # type: ignore[attr-defined]

    FAST_PATH = "c-extension"
    _fastioctl.set_error_type(KvmError)
except ImportError:  # not built (no compiler at install time): the ctypes path does the same
    _fastioctl = None
    FAST_PATH = "ctypes"

_mmap_fn = _libc.mmap
_mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                     ctypes.c_long]
_mmap_fn.restype = ctypes.c_void_p

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
