"""The host process of the model: its fd table and its address space (mappings).

The kernel backend hands out real fds and real virtual addresses; the model needs the same two
namespaces so that the interface behaves identically: memslots name memory by ``userspace_addr``
(resolved here to a mapping and offset), ``KVM_SET_USER_MEMORY_REGION2`` names a guest_memfd by
fd number (resolved here; a closed or foreign fd behaves as the kernel's ``fget`` would), and host
reads/writes through a mapping go through the mapped file's fault handler, which is where SIGBUS
(``GuestAccessFault``) comes from.
"""

from __future__ import annotations

import collections
import errno
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import numpy as np

from guestmem import uapi as u
from guestmem.args import as_bytes, mapping_range, pin_range, u8, u64
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.ranges import RangeMap
from guestmem.sync import holds_locks, schedule_point

PS = u.PAGE_SIZE
_MMAP_BASE = 0x7F00_0000_0000  # model addresses grow down from here, like the kernel's mmap_base
_MMAP_MIN = 0x1_0000_0000  # below this the model's address space is "full" (ENOMEM)
U64 = 1 << 64


def check_mmap_length(length: int, pgoff: int = 0) -> int:
    """``do_mmap``'s length checks: 0 is EINVAL, a length that wraps when page-aligned or cannot fit
    in the address space is ENOMEM, a file range that wraps is EOVERFLOW.  Returns the page count."""
    if length == 0:
        raise KvmError(errno.EINVAL, "mmap", "length is 0")
    npages = (length + PS - 1) // PS
    if npages * PS >= U64 or npages * PS > _MMAP_BASE - _MMAP_MIN:
        raise KvmError(errno.ENOMEM, "mmap", "no room for the mapping in the address space")
    if pgoff + npages >= U64 >> 12:
        raise KvmError(errno.EOVERFLOW, "mmap", "file offset + length wraps")
    return npages


class HostFault(Exception):
    """Raised by a mapped file's fault handler: host access to page ``index`` would SIGBUS."""

    def __init__(self, index: int, reason: str = "SIGBUS") -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


class MmuNotifier(Protocol):
    """A secondary MMU (a VM) that must drop mappings of host virtual ranges that change."""

    def invalidate_range_start(self, start: int, end: int) -> None: ...
    def invalidate_range_end(self, start: int, end: int) -> None: ...


class MappableFile(Protocol):
    """What a file must offer to be mmap'ed in the model."""

    def host_fault(self, start: int, end: int, write: bool) -> list[tuple[int, int, int]]:
        """Fault in page indices [start, end) for host access; return runs ``(s, e, pfn_of_s)``.
        Raise :class:`HostFault` for the first index that would SIGBUS (runs before it are
        returned by a prior call; callers fault page-run by page-run)."""
        ...

    def pin_pages(self, start: int, end: int) -> Callable[[], None]:
        """Take an extra reference on the pages [start, end) (GUP pin); return the unpin.  The
        pages stay allocated until the unpin even if the file drops them meanwhile."""
        ...

    def frame_view(self, pfn: int, npages: int) -> np.ndarray: ...

    def discard_pages(self, start: int, end: int) -> None:
        """Free pages [start, end) as a hole punch would (MADV_REMOVE)."""
        ...

    def access_lock(self) -> AbstractContextManager[object]:
        """Held across a host access, from the fault to the last byte copied: what the kernel's
        PTE zap + TLB flush give a conversion (a store through a translation taken before the
        conversion cannot land after it)."""
        ...

    def get_file(self) -> None: ...
    def put_file(self) -> None: ...


class OpenFile:
    """The lifetime of a ``struct file``: the fd holds one reference, every mapping one more, and
    the file is released (``_release``) when the last goes.  Subclasses name their process and
    say what release means."""

    fd: int = -1
    _refs: int = 0

    @property
    def owner_process(self) -> Process:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def install(self) -> int:
        """Install at the lowest free fd of the process; the fd holds one reference."""
        self.fd = self.owner_process.install(self)
        self.get_file()
        return self.fd

    def get_file(self) -> None:
        self._refs += 1

    def put_file(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._release()

    def close(self) -> None:
        """close(2): the file lives on while a mapping (or a memslot) still holds it."""
        if self.fd >= 0 and self.owner_process.close_fd(self.fd) in (self, None):
            self.fd = -1
            self.put_file()

    def __del__(self) -> None:
        # Nobody holds the object any more: its fd is closed, as the kernel backend's finalizer
        # closes it (deferred, never inside a lock: see Process.defer_release).
        try:
            if self.fd >= 0:
                self.owner_process.defer_release(self)
        except Exception:  # a half-built object (its constructor raised): nothing to release
            pass

    def __enter__(self):  # -> Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelMapping:
    """A mapping of a file (anonymous memory is a private shmem file) in the model's address space.

    Accesses resolve through the file on every call (the model keeps no host page tables to go
    stale), so a conversion or hole punch is visible to every mapping, in this process or a
    forked child, at once.  Implements :class:`guestmem.api.Mapping`.
    """

    def __init__(self, process: Process, file: MappableFile, addr: int, length: int, pgoff: int) -> None:
        self.process = process
        self.file = file
        self.addr = addr
        self.length = length
        self.pgoff = pgoff
        self.closed = False

    # --- access --------------------------------------------------------------------------------
    def _runs(self, offset: int, length: int, write: bool, op: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(mapping_offset, byte_view)`` pieces covering [offset, offset+length)."""
        if length == 0:
            return
        first = offset // PS
        last = (offset + length + PS - 1) // PS
        pos = offset
        end = offset + length
        idx = first
        while idx < last:
            try:
                runs = self.file.host_fault(self.pgoff + idx, self.pgoff + last, write)
            except HostFault as f:
                bad = max((f.index - self.pgoff) * PS, pos)
                raise GuestAccessFault(op, bad, f.reason) from None
            if runs:
                # The host now holds translations for these pages; the access happens next.
                schedule_point("host: access", self.file, runs[0][0], runs[-1][1], write)
            for s, e, pfn in runs:
                view = self.file.frame_view(pfn, e - s).reshape(-1)
                lo = (s - self.pgoff) * PS
                a, b = max(pos, lo), min(end, (e - self.pgoff) * PS)
                if a < b:
                    yield a, view[a - lo : b - lo]
                    pos = b
                idx = e - self.pgoff
            if not runs:
                break

    def check_access(self, op: str, offset: object, length: object) -> tuple[int, int]:
        """Validate an access before anything is allocated or touched: ints as ``size_t``, the
        mapping still mapped (EBADF otherwise), the range inside it (SIGSEGV otherwise)."""
        self.process.run_deferred()
        return mapping_range(op, offset, length, self.length, self.closed)

    def read(self, offset: int, length: int) -> bytes:
        offset, length = self.check_access("mapping.read", offset, length)
        out = bytearray(length)
        with self.file.access_lock():
            for pos, view in self._runs(offset, length, False, "mapping.read"):
                out[pos - offset : pos - offset + len(view)] = view.tobytes()
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        buf = as_bytes(data, "data")
        offset, _ = self.check_access("mapping.write", offset, len(buf))
        src = np.frombuffer(buf, dtype=np.uint8)
        with self.file.access_lock():
            for pos, view in self._runs(offset, len(src), True, "mapping.write"):
                view[:] = src[pos - offset : pos - offset + len(view)]

    def fill(self, offset: int, length: int, byte: int) -> None:
        value = u8(byte, "byte")
        offset, length = self.check_access("mapping.fill", offset, length)
        with self.file.access_lock():
            for _, view in self._runs(offset, length, True, "mapping.fill"):
                view.fill(value)

    def pin(self, offset: int, length: int) -> AbstractContextManager[None]:
        """A long-term pin (get_user_pages / an IOMMU DMA mapping) on the pages of the range,
        held while the returned context is.  The range is checked here, at once.

        The pin holds the pages themselves: a hole punch or a close while it is held removes them
        from the file, but their frames are freed only when the pin goes, as in the kernel."""
        self.process.run_deferred()
        offset, length = pin_range(offset, length, self.length, self.closed)
        return self._pinned(offset, length)

    @contextmanager
    def _pinned(self, offset: int, length: int) -> Iterator[None]:
        # Fault the pages in, as GUP does (for write: DMA targets are written), and take the
        # references under the same lock, so a conversion sees the pin or the pin sees SIGBUS.
        start, end = self.pgoff + offset // PS, self.pgoff + (offset + length) // PS
        with self.file.access_lock():
            for _ in self._runs(offset, length, True, "mapping.pin"):
                pass
            schedule_point("host: pin", self.file, start, end)
            unpin = self.file.pin_pages(start, end)
        try:
            yield
        finally:
            unpin()

    def discard(self, offset: int, length: int) -> None:
        """``madvise(MADV_REMOVE)``: punch the range out of the mapped file."""
        offset, length = u64(offset, "offset"), u64(length, "length")
        if self.closed:
            raise KvmError(errno.EBADF, "madvise", "mapping is closed")
        if offset % PS:
            raise KvmError(errno.EINVAL, "madvise", "offset must be page aligned")
        length = -(-length // PS) * PS  # madvise rounds the length up to whole pages
        if length and offset + length > -(-self.length // PS) * PS:
            raise KvmError(errno.ENOMEM, "madvise", "range reaches past the mapping")
        if length:
            start, end = self.pgoff + offset // PS, self.pgoff + (offset + length) // PS
            self.process.invalidate_file_range(self.file, start, end,
                                               lambda: self.file.discard_pages(start, end))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.process.munmap(self)

    def __del__(self) -> None:
        try:
            if not self.closed:
                self.process.defer_release(self)
        except Exception:
            pass

    def __enter__(self) -> ModelMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelMapping(addr={self.addr:#x}, length={self.length:#x}, pgoff={self.pgoff:#x})"


class Process:
    """The fd table and address space of the (single) host process the model simulates."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # The fd table and the mapping table hold the user's objects weakly: as on the kernel
        # backend, an object nobody references any more is closed (see :meth:`defer_release`).
        self._fds: dict[int, weakref.ref[object]] = {}
        self._vmas: RangeMap[int | None] = RangeMap(None)  # virtual page -> mapping id
        self._mappings: dict[int, weakref.ref[ModelMapping]] = {}
        # Mapping ids per mapped file (by ``id(file)``), so that invalidating a file's pages looks
        # only at that file's mappings, not at every mapping of the process (rmap's i_mmap).
        self._by_file: dict[int, set[int]] = {}
        self._owned: list[ModelMapping] = []  # mappings only this process holds (fork's copies)
        self._next_top = _MMAP_BASE
        self._notifiers: list[weakref.ref[MmuNotifier]] = []
        self._deferred: collections.deque[object] = collections.deque()
        self.fd_cloexec: set[int] = set()  # fds with FD_CLOEXEC (per fd, not per open file)

    # --- fds -----------------------------------------------------------------------------------
    def install(self, obj: object) -> int:
        """Install ``obj`` at the lowest free fd >= 3 (0-2 are stdio), as the kernel does."""
        with self._lock:
            fd = 3
            while fd in self._fds:
                fd += 1
            self._fds[fd] = weakref.ref(obj)
            return fd

    def fget(self, fd: int) -> object | None:
        with self._lock:
            ref = self._fds.get(fd)
            return None if ref is None else ref()

    def close_fd(self, fd: int) -> object | None:
        with self._lock:
            ref = self._fds.pop(fd, None)
            self.fd_cloexec.discard(fd)
            return None if ref is None else ref()

    # --- release of what nobody holds any more (the kernel backend's finalizers) ---------------
    def defer_release(self, obj: object) -> None:
        """Called from ``__del__``: ``obj`` (a file, mapping or VM nobody references) is closed the
        next time this process enters the model holding no lock — as the kernel defers the final
        ``fput`` to task work on the way back to userspace, never running it inside a lock."""
        self._deferred.append(obj)

    def run_deferred(self) -> None:
        """Close what :meth:`defer_release` queued (a no-op inside a locked region)."""
        if not self._deferred or holds_locks():
            return
        while self._deferred:
            try:
                obj = self._deferred.popleft()
            except IndexError:
                return
            obj.close()  # type: ignore[attr-defined]

    # --- MMU notifiers ----------------------------------------------------------------------------
    @property
    def mmu_notifiers(self) -> list[MmuNotifier]:
        with self._lock:
            return [n for n in (r() for r in self._notifiers) if n is not None]

    def register_notifier(self, n: MmuNotifier) -> None:
        with self._lock:
            self._notifiers.append(weakref.ref(n))

    def unregister_notifier(self, n: MmuNotifier) -> None:
        with self._lock:
            self._notifiers = [r for r in self._notifiers if r() is not None and r() is not n]

    # --- address space -------------------------------------------------------------------------
    def mmap(self, file: MappableFile, length: int, pgoff: int = 0, *, align: int = PS) -> ModelMapping:
        """Map ``file`` from page ``pgoff``; ``align`` (a power of two) aligns the address, as a VMM
        aligns guest RAM to the hugepage size so that memslots can map it huge."""
        if align < PS or align & (align - 1):
            raise ValueError(f"align must be a power of two of at least a page, not {align:#x}")
        npages = check_mmap_length(length, pgoff)
        with self._lock:
            # Leave a guard page between mappings so neighbours never look contiguous.
            top = (self._next_top - (npages + 1) * PS) & ~(align - 1)
            if top < _MMAP_MIN:
                raise KvmError(errno.ENOMEM, "mmap", "no room for the mapping in the address space")
            self._next_top = addr = top
            m = ModelMapping(self, file, addr, length, pgoff)
            self._mappings[id(m)] = weakref.ref(m)
            self._by_file.setdefault(id(file), set()).add(id(m))
            self._vmas.set(addr // PS, addr // PS + npages, id(m))
        file.get_file()
        return m

    def munmap(self, m: ModelMapping) -> None:
        with self._lock:
            if id(m) not in self._mappings:
                return
        end = m.addr + (m.length + PS - 1) // PS * PS
        self._notify(m.addr, end, self._unmap_locked(m))
        m.file.put_file()

    def _unmap_locked(self, m: ModelMapping):  # -> Callable[[], None]
        def action() -> None:
            with self._lock:
                self._mappings.pop(id(m), None)
                ids = self._by_file.get(id(m.file))
                if ids is not None:
                    ids.discard(id(m))
                    if not ids:
                        del self._by_file[id(m.file)]
                if m in self._owned:
                    self._owned.remove(m)
                self._vmas.set(m.addr // PS, (m.addr + m.length + PS - 1) // PS, None)
        return action

    # --- MMU notifiers (mm/mmu_notifier.c): secondary MMUs hear about host PTE changes --------
    def _notify(self, start: int, end: int, action) -> None:  # action: Callable[[], None]
        subs = list(self.mmu_notifiers)
        for n in subs:
            n.invalidate_range_start(start, end)
        try:
            action()
        finally:
            for n in subs:
                n.invalidate_range_end(start, end)

    def invalidate_file_range(self, file: object, start: int, end: int, action) -> None:
        """Run ``action`` (which removes pages [start, end) of ``file``) inside MMU-notifier
        invalidations of every host virtual range that maps those pages."""
        ranges = []
        with self._lock:
            refs = [self._mappings.get(mid) for mid in self._by_file.get(id(file), ())]
        for ref in refs:
            m = None if ref is None else ref()
            if m is None or m.file is not file:
                continue
            npages = (m.length + PS - 1) // PS
            a, b = max(start, m.pgoff), min(end, m.pgoff + npages)
            if a < b:
                ranges.append((m.addr + (a - m.pgoff) * PS, m.addr + (b - m.pgoff) * PS))
        subs = self.mmu_notifiers if ranges else []
        for n in subs:
            for a, b in ranges:
                n.invalidate_range_start(a, b)
        try:
            action()
        finally:
            for n in subs:
                for a, b in ranges:
                    n.invalidate_range_end(a, b)

    def mapping_count(self, file: object) -> int:
        """How many live mappings of ``file`` this process has (``i_mmap_writable``: every model
        mapping is shared and writable)."""
        with self._lock:
            return len(self._by_file.get(id(file), ()))

    def resolve(self, addr: int) -> tuple[ModelMapping, int] | None:
        """The mapping holding virtual address ``addr`` and the offset within it."""
        with self._lock:
            mid = self._vmas.get(addr // PS)
            ref = None if mid is None else self._mappings.get(mid)
            m = None if ref is None else ref()
            if m is None:
                return None
            return m, addr - m.addr

    def fork(self) -> Process:
        """A child process: the same open files and the same MAP_SHARED mappings at the same
        addresses (what fork(2) gives a VMM's child).  Its accesses go through the same files,
        so it sees conversions and hole punches exactly as the parent does."""
        child = Process()
        with self._lock:
            child._fds = dict(self._fds)
            child.fd_cloexec = set(self.fd_cloexec)
            child._next_top = self._next_top
            for m in self.mappings():
                cm = ModelMapping(child, m.file, m.addr, m.length, m.pgoff)
                child._mappings[id(cm)] = weakref.ref(cm)
                child._by_file.setdefault(id(m.file), set()).add(id(cm))
                child._owned.append(cm)
                child._vmas.set(m.addr // PS, (m.addr + m.length + PS - 1) // PS, id(cm))
                m.file.get_file()
        return child

    def mapping_at(self, addr: int) -> ModelMapping | None:
        hit = self.resolve(addr)
        return None if hit is None else hit[0]

    def mappings(self) -> list[ModelMapping]:
        with self._lock:
            return [m for m in (r() for r in self._mappings.values()) if m is not None]
