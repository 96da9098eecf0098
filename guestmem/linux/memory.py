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

from guestmem import mman
from guestmem.args import as_bytes, mapping_range, pin_range, u8, u64
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.linux import _sys
from guestmem.linux.fileops import KernelFileOps
from guestmem.ranges import RangeMap
from guestmem.uapi import PAGE_SIZE

_CHUNK = 1 << 20  # fill source buffer size
_CLOSED_FD = 0x7FFF_FFFF  # beyond any RLIMIT_NOFILE: never an open fd


def _munmap_quiet(addr: int, length: int) -> None:
    with contextlib.suppress(KvmError):
        _sys.munmap(addr, length)


def _placeholder_quiet(addr: int, length: int, parent: weakref.finalize) -> None:
    """A MAP_FIXED piece goes: its range becomes a PROT_NONE placeholder while the parent lives
    (never after: the parent's munmap freed the range, which may be someone else's by now)."""
    if not parent.alive:
        return
    with contextlib.suppress(KvmError):
        _sys.mmap_fixed(addr, length, 0, _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS | _sys.MAP_NORESERVE)


# Every live mapping, so a forked child can find its copy of a mapping by address.
_LIVE: weakref.WeakSet[KernelMapping] = weakref.WeakSet()
# True in a process guestmem.linux.fork made (it serves a ForkedChild): there, a page MADV_DONTFORK
# marked is not mapped at all.
IN_FORKED_CHILD = False


class KernelMapping:
    """A host mapping (``mmap``) whose accesses are routed through the kernel so SIGBUS is survivable.

    ``addr`` is the real host virtual address (usable as a memslot's ``userspace_addr``).
    """

    def __init__(self, addr: int, length: int, *, fd: int | None = None, offset: int = 0,
                 shared: bool = True, owner: Any = None, prot: int = 3,
                 parent: KernelMapping | None = None) -> None:
        self.addr = addr
        self.length = length
        self.fd = fd
        self.offset = offset
        self.shared = shared
        self.owner = owner  # keeps a Python-side owner (e.g. the GuestMemfd object) reachable
        # Our own record of each page's protection (what we asked mmap/mprotect for): it tells a
        # refused access's SIGSEGV (protection) from its SIGBUS (the file refused the fault).
        self.prot_map: RangeMap[int] = RangeMap(prot)
        # Pages MADV_DONTFORK marked: a forked child has nothing mapped there (SIGSEGV there).
        self.dontfork: RangeMap[bool] = RangeMap(False)
        # MAP_FIXED mappings over parts of this one; a child's unmap leaves a PROT_NONE
        # placeholder so that the parent's range stays reserved until the parent goes.
        self.children: list[KernelMapping] = []
        self.parent = parent
        if parent is None:
            self._finalizer = weakref.finalize(self, _munmap_quiet, addr, length)
        else:
            self._finalizer = weakref.finalize(self, _placeholder_quiet, addr, length,
                                               parent._finalizer)
        _LIVE.add(self)

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
                raise self._fault("read", offset + done, err.message) from None
            if n == 0:
                raise self._fault("read", offset + done, "")
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
                raise self._fault(op, offset + pos, err.message) from None
            if n == 0:
                raise self._fault(op, offset + pos, "")
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

    def _fault(self, op: str, offset: int, detail: str, need: int | None = None) -> GuestAccessFault:
        """The fault a CPU access at ``offset`` would take: SIGSEGV where our records say the page
        is unmapped or lacks the permission (``need``: read for "read", else write), else SIGBUS
        (the file's fault handler refused)."""
        if need is None:
            need = _sys.PROT_READ if op == "read" else _sys.PROT_WRITE
        target, sub = self, offset
        for c in self.children:
            lo = c.addr - self.addr
            if lo <= offset < lo + -(-c.length // PAGE_SIZE) * PAGE_SIZE:
                if c.closed:
                    return GuestAccessFault(op, offset, "SIGSEGV: address not mapped")
                target, sub = c, offset - lo
        if IN_FORKED_CHILD and target.dontfork.get(sub // PAGE_SIZE):
            return GuestAccessFault(op, offset, "SIGSEGV: not mapped in the child (MADV_DONTFORK)")
        if not target.prot_map.get(sub // PAGE_SIZE) & need:
            return GuestAccessFault(op, offset, "SIGSEGV: page protection forbids the access")
        return GuestAccessFault(op, offset, f"SIGBUS ({detail})" if detail else "SIGBUS")

    def _range(self, op: str, offset: object, length: object, past_errno: int) -> tuple[int, int]:
        off, n = mman.mbind_range(op, offset, length, self.length, self.closed)
        if n and mman.past_mapping(off, n, self.length):
            raise KvmError(past_errno, op, "range reaches past the mapping (unmapped memory)")
        return off, n

    def mprotect(self, offset: int, length: int, prot: int) -> None:
        off, n, value = mman.mprotect_range(offset, length, prot, self.length, self.closed)
        if not n:
            return
        _sys.mprotect(self.addr + off, n, value)
        first, last = off // PAGE_SIZE, (off + n) // PAGE_SIZE
        for c in self.children:
            lo = (c.addr - self.addr) // PAGE_SIZE
            a, b = max(first, lo), min(last, lo + -(-c.length // PAGE_SIZE))
            if a < b and not c.closed:
                c.prot_map.set(a - lo, b - lo, value)
        self.prot_map.set(first, last, value)

    def madvise(self, offset: int, length: int, advice: int) -> None:
        off, n = u64(offset, "offset"), u64(length, "length")
        value = mman.check_advice(advice)
        off, n = self._range("madvise", off, n, errno.ENOMEM)
        if n:
            _sys.madvise(self.addr + off, n, value)
        if n and value in (mman.MADV_DONTFORK, mman.MADV_DOFORK):  # our record, for _fault
            first, last = off // PAGE_SIZE, (off + n) // PAGE_SIZE
            for c in self.children:
                lo = (c.addr - self.addr) // PAGE_SIZE
                a, b = max(first, lo), min(last, lo + -(-c.length // PAGE_SIZE))
                if a < b and not c.closed:
                    c.dontfork.set(a - lo, b - lo, value == mman.MADV_DONTFORK)
            self.dontfork.set(first, last, value == mman.MADV_DONTFORK)

    def mbind(self, offset: int, length: int, mode: int, nodemask: int | None = None, maxnode: int = 64,
              flags: int = 0) -> None:
        off, n, mode, mask, maxn, fl = mman.convert_mbind_args(offset, length, mode, nodemask, maxnode,
                                                               flags)
        base, mode_flags = mman.sanitize_mode("mbind", mode)
        mman.get_nodes("mbind", mask, maxn)
        if fl & ~mman.MPOL_MF_VALID:
            raise KvmError(errno.EINVAL, "mbind", f"invalid flags {fl:#x}")
        if self.closed:
            raise KvmError(errno.EBADF, "mbind", "mapping is closed")
        if off % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "mbind", "address must be page aligned")
        rounded = -(-n // PAGE_SIZE) * PAGE_SIZE
        # PAGE_ALIGN to 0 is do_mbind's `end == start` (nothing to do); a relative offset + length
        # past 2**64 is unmapped memory past the mapping (EFAULT below), not a wrap.
        if not rounded or rounded >= 1 << 64:
            return
        nodes = mman.get_nodes("mbind", mask, maxn)
        mman.mpol_new("mbind", base, mode_flags, nodes, online_node_mask())
        if mman.past_mapping(off, rounded, self.length):
            raise KvmError(errno.EFAULT, "mbind", "range reaches past the mapping (unmapped memory)")
        _sys.mbind(self.addr + off, n, base | mode_flags, mask, maxn, fl)

    def get_mempolicy(self, offset: int, flags: int = mman.MPOL_F_ADDR) -> tuple[int, int]:
        off, fl = u64(offset, "offset"), u64(flags, "flags")
        if fl & ~(mman.MPOL_F_NODE | mman.MPOL_F_ADDR | mman.MPOL_F_MEMS_ALLOWED):
            raise KvmError(errno.EINVAL, "get_mempolicy", f"invalid flags {fl:#x}")
        if fl & mman.MPOL_F_MEMS_ALLOWED or not fl & mman.MPOL_F_ADDR:
            raise KvmError(errno.EINVAL, "get_mempolicy", "a mapping's policy is asked with MPOL_F_ADDR")
        if self.closed:
            raise KvmError(errno.EBADF, "get_mempolicy", "mapping is closed")
        if off >= -(-self.length // PAGE_SIZE) * PAGE_SIZE:
            raise KvmError(errno.EFAULT, "get_mempolicy", "address not mapped")
        return _sys.get_mempolicy(self.addr + off, fl)

    def page_nodes(self, offset: int, npages: int) -> list[int]:
        off, count = u64(offset, "offset"), u64(npages, "npages")
        if self.closed:
            raise KvmError(errno.EBADF, "move_pages", "mapping is closed")
        limit = -(-self.length // PAGE_SIZE) * PAGE_SIZE
        addrs = [self.addr + off + k * PAGE_SIZE for k in range(count)]
        inside = [a for a in addrs if a - self.addr < limit]
        status = _sys.move_pages_status(inside) if inside else []
        return status + [-errno.EFAULT] * (count - len(inside))

    def mmap_fixed(self, offset: int, length: int, prot: int, flags: int, fd: object = None,
                   file_offset: int = 0) -> KernelMapping:
        """``mmap(self.addr + offset, ..., flags | MAP_FIXED, fd, file_offset)``."""
        off, n = mman.mmap_fixed_range(self, offset, length)
        child = map_request(n, prot, flags, fd, file_offset, fixed=self.addr + off, parent=self)
        self.children.append(child)
        return child

    def discard(self, offset: int, length: int) -> None:
        """``madvise(MADV_REMOVE)`` on ``[offset, offset+length)``: free the pages (they read as zero
        afterwards).  On a guest_memfd mapping the kernel punches a hole in the file; the kernel's
        errno (e.g. ``EINVAL`` for private anonymous memory or unaligned ranges) passes through."""
        offset, length = u64(offset, "offset"), u64(length, "length")
        if self.closed:
            raise KvmError(errno.EBADF, "madvise", "mapping is closed")
        if offset % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "madvise", "offset must be page aligned")
        if -(-length // PAGE_SIZE) * PAGE_SIZE >= 1 << 64:  # madvise: `len_in && !len`
            raise KvmError(errno.EINVAL, "madvise", "length wraps when page-aligned")
        if length and offset + length > -(-self.length // PAGE_SIZE) * PAGE_SIZE:
            raise KvmError(errno.ENOMEM, "madvise", "range reaches past the mapping")
        _sys.madvise(self.addr + offset, length, _sys.MADV_REMOVE)

    def pin(self, offset: int, length: int) -> KernelPin:
        """Take real page references on ``[offset, offset+length)`` for as long as the context is held."""
        offset, length = pin_range(offset, length, self.length, self.closed)
        return KernelPin(self, offset, length)

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        for c in self.children:  # the parent's munmap takes MAP_FIXED pieces with it
            c._finalizer.detach()
        self._finalizer()

    def __enter__(self) -> KernelMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"addr={self.addr:#x}"
        return f"KernelMapping({state}, length={self.length:#x}, fd={self.fd})"


def online_node_mask() -> int:
    """The host's nodes with memory, as a mask (``/sys/devices/system/node/has_memory``)."""
    return sum(1 << n for n in host_numa_nodes())


def host_numa_nodes() -> list[int]:
    for name in ("has_memory", "online"):
        try:
            with open(f"/sys/devices/system/node/{name}") as f:
                return mman.parse_node_list(f.read())
        except OSError:
            continue
    return [0]


def map_request(length: object, prot: object, flags: object, fd: object, offset: object,
                fixed: int | None = None, parent: KernelMapping | None = None) -> KernelMapping:
    """``mmap(2)`` for :meth:`guestmem.api.Kvm.mmap` and :meth:`KernelMapping.mmap_fixed`:
    the kernel answers; MAP_FIXED only through ``fixed`` (an address this process owns)."""
    length_, prot_, flags_, off = mman.convert_mmap_args(length, prot, flags, fd, offset)
    prot_ &= mman.PROT_READ | mman.PROT_WRITE | mman.PROT_EXEC
    if fd is not None and not isinstance(fd, int):
        obj = fd
        fd = getattr(obj, "fd", None)
        if not isinstance(fd, int):
            raise TypeError("fd must be a GuestMemfd, a HostFile, an int or None")
        if getattr(obj, "closed", False):
            fd = _CLOSED_FD  # a closed object's number may be reused: let the kernel say EBADF
    if flags_ & (mman.MAP_FIXED | mman.MAP_FIXED_NOREPLACE) and fixed is None:
        raise ValueError("MAP_FIXED is Mapping.mmap_fixed (over part of a mapping this "
                         "interface owns), never an arbitrary address")
    anon = fd is None or bool(flags_ & mman.MAP_ANONYMOUS)
    if anon:
        flags_ |= mman.MAP_ANONYMOUS
        fd = -1
    if fixed is None:
        addr = _sys.mmap(length_, prot_, flags_, fd, off)  # type: ignore[arg-type]
    else:
        addr = _sys.mmap_fixed(fixed, length_, prot_, flags_, fd, off)  # type: ignore[arg-type]
    shared = flags_ & mman.MAP_TYPE in (mman.MAP_SHARED, mman.MAP_SHARED_VALIDATE)
    return KernelMapping(addr, length_, fd=None if anon else fd, offset=off, shared=shared,  # type: ignore[arg-type]
                         prot=prot_, parent=parent)


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
                            raise self.mapping._fault("pin", self.offset + self.pinned, err.message,
                                                      _sys.PROT_READ) from None
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

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> KernelHostFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
