"""Host-userspace memory for the kernel backend: mappings that survive SIGBUS, pins, plain memfds.

A real ``mmap`` of a guest_memfd can fault with SIGBUS (past the file size, or on pages the host
may not touch), and a SIGBUS inside a Python process kills it.  So :class:`KernelMapping` never
touches such memory with loads and stores: every access goes through ``process_vm_readv`` /
``process_vm_writev`` on this very process.  Those calls fault pages in exactly as a load or store
would (same ``vm_ops->fault`` handler), but a fault the CPU would turn into SIGBUS comes back as a
short count (or ``EFAULT``), which becomes :class:`~guestmem.errors.GuestAccessFault` at the first
byte that could not be transferred.  Nothing here predicts what the kernel will do; it asks.
Measured on the development host: about 4 GB/s, so a 64 MiB read takes ~16 ms.

:class:`KernelPin` holds real page references: it ``vmsplice``\\ s the range into pipes and keeps the
pipes open while the context is held, as upstream's ``guest_memfd_conversions_test`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import weakref
from typing import Any

from guestmem.args import as_bytes, mapping_range, pin_range, u8, u64
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.linux import _sys
from guestmem.linux.fileops import KernelFileOps
from guestmem.uapi import PAGE_SIZE

_CHUNK = 1 << 20  # fill source buffer size


def _munmap_quiet(addr: int, length: int) -> None:
    with contextlib.suppress(KvmError):
        _sys.munmap(addr, length)


class KernelMapping:
    """A host mapping (``mmap``) whose accesses are routed through the kernel so SIGBUS is survivable.

    ``addr`` is the real host virtual address (usable as a memslot's ``userspace_addr``).
    """

    def __init__(self, addr: int, length: int, *, fd: int | None = None, offset: int = 0,
                 shared: bool = True, owner: Any = None) -> None:
        self.addr = addr
        self.length = length
        self.fd = fd
        self.offset = offset
        self.shared = shared
        self.owner = owner  # keeps a Python-side owner (e.g. the GuestMemfd object) reachable
        self._finalizer = weakref.finalize(self, _munmap_quiet, addr, length)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def anonymous(cls, length: int, *, shared: bool = True) -> KernelMapping:
        """Anonymous memory, ``MAP_SHARED`` (shmem-backed, so :meth:`discard` can free it) by default,
        else ``MAP_PRIVATE``; always ``MAP_NORESERVE``."""
        flags = (_sys.MAP_SHARED if shared else _sys.MAP_PRIVATE) | _sys.MAP_ANONYMOUS | _sys.MAP_NORESERVE
        addr = _sys.mmap(length, _sys.PROT_READ | _sys.PROT_WRITE, flags, -1, 0)
        return cls(addr, length, shared=shared)

    @classmethod
    def of_file(cls, fd: int, length: int, offset: int = 0, *, shared: bool = True,
                owner: Any = None) -> KernelMapping:
        """``mmap(fd)`` read/write, ``MAP_SHARED`` or ``MAP_PRIVATE``; the kernel's errno passes through."""
        flags = _sys.MAP_SHARED if shared else _sys.MAP_PRIVATE
        addr = _sys.mmap(length, _sys.PROT_READ | _sys.PROT_WRITE, flags, fd, offset)
        return cls(addr, length, fd=fd, offset=offset, shared=shared, owner=owner)

    # -- state --------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check(self, op: str, offset: object, length: object) -> tuple[int, int]:
        """Validate an access before anything is touched (the model's ``check_access`` rule):
        ints as ``size_t``, EBADF once unmapped, SIGSEGV outside the mapping."""
        return mapping_range(op, offset, length, self.length, self.closed)

    # -- access -------------------------------------------------------------------------------------
    def readinto(self, offset: int, buf: Any) -> None:
        """Fill the writable buffer ``buf`` (bytearray, numpy array, ...) from ``[offset, +len(buf))``."""
        view = memoryview(buf).cast("B")
        length = view.nbytes
        offset, _ = self._check("read", offset, length)
        if length == 0:
            return
        dst = ctypes.addressof(ctypes.c_char.from_buffer(view))
        done = 0
        while done < length:
            try:
                n = _sys.process_vm_readv(dst + done, self.addr + offset + done, length - done)
            except KvmError as err:
                raise GuestAccessFault("read", offset + done, f"SIGBUS ({err.message})") from None
            if n == 0:
                raise GuestAccessFault("read", offset + done)
            done += n

    def read(self, offset: int, length: int) -> bytes:
        offset, length = self._check("read", offset, length)
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def _write_from(self, op: str, offset: int, src: int, chunk: int, count: int) -> None:
        """Write ``count`` back-to-back copies of the ``chunk`` bytes at ``src`` from ``offset`` on."""
        pos, total = 0, chunk * count
        while pos < total:
            skip = pos % chunk  # a previous call stopped mid-chunk: finish that chunk first
            try:
                if skip:
                    n = _sys.process_vm_writev_repeat(self.addr + offset + pos, src + skip, chunk - skip, 1)
                else:
                    reps = min((total - pos) // chunk, _sys.IOV_MAX)
                    n = _sys.process_vm_writev_repeat(self.addr + offset + pos, src, chunk, reps)
            except KvmError as err:
                raise GuestAccessFault(op, offset + pos, f"SIGBUS ({err.message})") from None
            if n == 0:
                raise GuestAccessFault(op, offset + pos)
            pos += n

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(as_bytes(data, "data")).cast("B")
        offset, _ = self._check("write", offset, view.nbytes)
        if view.nbytes == 0:
            return
        src = (ctypes.c_char * view.nbytes).from_buffer_copy(view)
        self._write_from("write", offset, ctypes.addressof(src), view.nbytes, 1)

    def fill(self, offset: int, length: int, byte: int) -> None:
        """Set ``[offset, offset+length)`` to ``byte``."""
        byte = u8(byte, "byte")
        offset, length = self._check("fill", offset, length)
        if length == 0:
            return
        chunk = min(_CHUNK, length)
        src = ctypes.create_string_buffer(bytes([byte]) * chunk, chunk)
        full, tail = divmod(length, chunk)
        self._write_from("fill", offset, ctypes.addressof(src), chunk, full)
        if tail:
            self._write_from("fill", offset + full * chunk, ctypes.addressof(src), tail, 1)

    def discard(self, offset: int, length: int) -> None:
        """``madvise(MADV_REMOVE)`` on ``[offset, offset+length)``: free the pages (they read as zero
        afterwards).  On a guest_memfd mapping the kernel punches a hole in the file; the kernel's
        errno (e.g. ``EINVAL`` for private anonymous memory or unaligned ranges) passes through."""
        offset, length = u64(offset, "offset"), u64(length, "length")
        if self.closed:
            raise KvmError(errno.EBADF, "madvise", "mapping is closed")
        if offset % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "madvise", "offset must be page aligned")
        if length and offset + length > -(-self.length // PAGE_SIZE) * PAGE_SIZE:
            raise KvmError(errno.ENOMEM, "madvise", "range reaches past the mapping")
        _sys.madvise(self.addr + offset, length, _sys.MADV_REMOVE)

    def pin(self, offset: int, length: int) -> KernelPin:
        """Take real page references on ``[offset, offset+length)`` for as long as the context is held."""
        offset, length = pin_range(offset, length, self.length, self.closed)
        return KernelPin(self, offset, length)

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> KernelMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"addr={self.addr:#x}"
        return f"KernelMapping({state}, length={self.length:#x}, fd={self.fd})"


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _pipe_capacity() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return max(int(f.read()), 1 << 16)
    except (OSError, ValueError):
        return 1 << 16


class KernelPin:
    """Page references held by pipes: ``vmsplice`` of a mapping's range, kept until ``release``.

    Entering the context takes the references (faulting the pages in; a SIGBUS-range gives
    :class:`GuestAccessFault`); leaving it closes the pipes.  :meth:`drain` reads the pinned pages
    back through the pipes (which also releases them) — proof that the pipe held those very pages.
    """

    def __init__(self, mapping: KernelMapping, offset: int, length: int) -> None:
        self.mapping = mapping
        self.offset = offset
        self.length = length
        self._pipes: list[tuple[int, int]] = []
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        self.pinned = 0

    def acquire(self) -> None:
        if self._pipes:
            raise RuntimeError("pin already held")
        cap = _pipe_capacity()
        addr = self.mapping.addr + self.offset
        try:
            while self.pinned < self.length:
                r, w = os.pipe2(os.O_CLOEXEC)
                self._fds += [r, w]
                self._pipes.append((r, w))
                with contextlib.suppress(OSError):
                    fcntl.fcntl(w, _sys.F_SETPIPE_SZ, cap)
                while self.pinned < self.length:
                    try:
                        n = _sys.vmsplice(w, addr + self.pinned, self.length - self.pinned,
                                          _sys.SPLICE_F_NONBLOCK)
                    except KvmError as err:
                        if err.errno == 11:  # EAGAIN: this pipe is full, open another
                            break
                        if err.errno == 14:  # EFAULT: the pages cannot be faulted in
                            raise GuestAccessFault("pin", self.offset + self.pinned,
                                                   f"SIGBUS ({err.message})") from None
                        raise
                    if n == 0:
                        break
                    self.pinned += n
        except BaseException:
            self.release()
            raise

    def drain(self) -> bytes:
        """Read the pinned bytes out of the pipes (this consumes and releases the pin)."""
        out = bytearray()
        for r, _w in self._pipes:
            while True:
                try:
                    os.set_blocking(r, False)
                    chunk = os.read(r, 1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                out += chunk
        self.release()
        return bytes(out)

    def release(self) -> None:
        _close_fds(self._fds)
        self._pipes.clear()
        self.pinned = 0

    @property
    def held(self) -> bool:
        return bool(self._pipes)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class KernelHostFile(KernelFileOps):
    """A regular memfd (``memfd_create``) of ``size`` bytes: a file that is *not* a guest_memfd."""

    def __init__(self, size: int, name: str = "guestmem-host", flags: int = os.MFD_CLOEXEC) -> None:
        try:
            self.fd = os.memfd_create(name, flags)
        except OSError as err:
            raise KvmError(err.errno or 0, "memfd_create") from None
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        try:
            os.ftruncate(self.fd, size)
        except OSError as err:
            self.close()
            raise KvmError(err.errno or 0, "ftruncate") from None
        self.size = size

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> KernelHostFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
