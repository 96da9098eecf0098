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

from guestmem import native
from guestmem import uapi as u
from guestmem.args import as_bytes, mapping_range, pin_range, u8, u64
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.ranges import RangeMap
from guestmem.sync import holds_locks, schedule_point

MADV_REMOVE = 9

PS = u.PAGE_SIZE
_MMAP_BASE = 0x7F00_0000_0000  # model addresses grow down from here, like the kernel's mmap_base
_MMAP_MIN = 0x1_0000_0000  # below this the model's address space is "full" (ENOMEM)
# The compiled one-page MADV_REMOVE (guestmem/model/_fastconv.c; configured by the KVM model, and
# refusing everything until then), or None: the Python madvise below is the reference.
_FAST = native.load("model._fastconv")
PROT_READ, PROT_WRITE = 0x1, 0x2
PROT_RW = PROT_READ | PROT_WRITE
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

    def __init__(self, process: Process, file: MappableFile, addr: int, length: int, pgoff: int,
                 *, prot: int = PROT_RW, shared: bool = True, source: MappableFile | None = None) -> None:
        self.process = process
        self.file = file
        self.addr = addr
        self.length = length
        self.pgoff = pgoff
        self.closed = False
        self.shared = shared
        # What accesses fault through: the file itself, or (MAP_PRIVATE of a file) its
        # copy-on-write view (guestmem.model.mm.cow).  ``file`` stays the mapped file (rmap).
        self.source: MappableFile = file if source is None else source
        # Protection per page of the mapping (mprotect); ``_prot_all`` is the one value when
        # every page has it (the fast path: no per-access lookup).
        self.prot_map: RangeMap[int] = RangeMap(prot)
        self._prot_all: int | None = prot
        # The protections mprotect may grant (VM_MAYREAD/MAYWRITE/MAYEXEC): mmap takes MAYEXEC
        # away on a noexec mount (guest_memfd's) and MAYWRITE from a shared read-only mapping
        # of a write-sealed memfd; asking for more is EACCES.
        self.max_prot = 0x7
        # MAP_FIXED mappings placed over parts of this one (Mapping.mmap_fixed), by address.
        self.children: list[ModelMapping] = []
        self.parent: ModelMapping | None = None
        # Pages (by mapping page index) this process has a host PTE for: set by every fault (a
        # host access, a pin, KVM's GUP), cleared where the PTEs are zapped (MADV_DONTNEED, a
        # punch or conversion of a shared file).  move_pages and mbind's page walk look at it.
        self.mapped: RangeMap[bool] = RangeMap(False)
        # Pages MADV_DONTFORK marked (VM_DONTCOPY): fork leaves them out of the child.
        self.dontfork: RangeMap[bool] = RangeMap(False)

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
                runs = self.source.host_fault(self.pgoff + idx, self.pgoff + last, write)
            except HostFault as f:
                bad = max((f.index - self.pgoff) * PS, pos)
                raise GuestAccessFault(op, bad, f.reason) from None
            if runs:
                # The host now holds translations for these pages; the access happens next.
                schedule_point("host: access", self.file, runs[0][0], runs[-1][1], write)
            if runs:
                self.mapped.set(runs[0][0] - self.pgoff, runs[-1][1] - self.pgoff, True)
            for s, e, pfn in runs:
                view = self.source.frame_view(pfn, e - s).reshape(-1)
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
        self._access("mapping.read", offset, length, out, None)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        buf = as_bytes(data, "data")
        offset, _ = self.check_access("mapping.write", offset, len(buf))
        self._access("mapping.write", offset, len(buf), np.frombuffer(buf, dtype=np.uint8), None)

    def fill(self, offset: int, length: int, byte: int) -> None:
        value = u8(byte, "byte")
        offset, length = self.check_access("mapping.fill", offset, length)
        self._access("mapping.fill", offset, length, None, value)

    def _access(self, op: str, offset: int, length: int, buf: object, byte: int | None) -> None:
        """One checked access: ``buf`` a bytearray to read into, a uint8 array to write from, or
        None with ``byte`` to fill.  Pieces that MAP_FIXED children cover go to them (the host
        resolves addresses, not mapping objects); a page without the needed protection stops
        the access there with a SIGSEGV, after the bytes before it (as a CPU loop would)."""
        if self.children:
            for target, a, n in self._pieces(offset, length):
                if target is None:
                    raise GuestAccessFault(op, a, "SIGSEGV: address not mapped")
                if target is self:
                    self._access_own(op, a, n, a - offset, buf, byte)
                    continue
                sub = a - (target.addr - self.addr)
                if byte is not None:
                    target._checked(op, sub, n, lambda t, o, k: t.fill(o, k, byte))
                elif isinstance(buf, bytearray):
                    data = target._checked(op, sub, n, lambda t, o, k: t.read(o, k))
                    buf[a - offset : a - offset + n] = data
                else:
                    piece = bytes(buf[a - offset : a - offset + n])  # type: ignore[index]
                    target._checked(op, sub, n, lambda t, o, k, d=piece: t.write(o, d))
            return
        self._access_own(op, offset, length, 0, buf, byte)

    def _checked(self, op: str, offset: int, length: int, fn):  # -> object
        """Run ``fn(self, offset, length)``, reporting a fault at the parent's offset."""
        try:
            return fn(self, offset, length)
        except GuestAccessFault as f:
            raise GuestAccessFault(op, f.offset + (self.addr - self.parent.addr) if self.parent
                                   else f.offset, f.message) from None

    def _access_own(self, op: str, offset: int, length: int, at: int, buf: object,
                    byte: int | None) -> None:
        write = not isinstance(buf, bytearray)
        limit = self._permitted(offset, length, PROT_WRITE if write else PROT_READ)
        with self.source.access_lock():
            for pos, view in self._runs(offset, limit - offset, write, op):
                k = at + pos - offset
                if byte is not None:
                    view.fill(byte)
                elif write:
                    view[:] = buf[k : k + len(view)]  # type: ignore[index]
                else:
                    buf[k : k + len(view)] = view.tobytes()  # type: ignore[index]
        if limit < offset + length:
            raise GuestAccessFault(op, limit, "SIGSEGV: page protection forbids the access")

    def notify_pages(self, start: int, end: int, action: Callable[[], None]) -> None:
        """Run ``action`` (which changes what file pages [start, end) map to in this mapping)
        inside MMU-notifier invalidations of their host addresses."""
        a = self.addr + max(0, start - self.pgoff) * PS
        b = self.addr + max(0, end - self.pgoff) * PS
        self.process._notify(a, b, action)

    def gup_range(self, offset: int, npages: int, write: bool) -> tuple[int, bool]:
        """For a secondary MMU (KVM's ``hva_to_pfn``) taking ``npages`` from page-aligned
        ``offset``: how many GUP may take for this access (0: it fails, EFAULT), and whether the
        host maps them writable (a protection without PROT_WRITE, or a MAP_PRIVATE page that is
        not yet the mapping's own copy, is mapped read-only)."""
        need = PROT_WRITE if write else PROT_READ
        n = (self._permitted(offset, npages * PS, need) - offset) // PS
        if n == 0:
            return 0, False
        writable = self._permitted(offset, n * PS, PROT_WRITE) == offset + n * PS
        overlay = getattr(self.source, "overlay", None)
        if writable and not write and overlay is not None:
            first = self.pgoff + offset // PS
            writable = overlay.cache.all_allocated(first, first + n)
        return n, writable

    def _permitted(self, offset: int, length: int, need: int) -> int:
        """The end of the prefix of ``[offset, offset+length)`` whose pages allow ``need``."""
        if self._prot_all is not None:
            return offset + length if self._prot_all & need else offset
        if length == 0:
            return offset
        bad = self.prot_map.first_match(offset // PS, (offset + length + PS - 1) // PS,
                                        lambda p: not p & need)
        return offset + length if bad is None else max(offset, bad * PS)

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[ModelMapping | None, int, int]]:
        """Split ``[offset, offset+length)`` by who maps it now: this mapping, a live MAP_FIXED
        child, or nobody (a child was unmapped); a later child covers an earlier one."""
        owner: RangeMap[ModelMapping | None] = RangeMap(self)
        for c in self.children:
            lo = (c.addr - self.addr) // PS
            owner.set(lo, lo + -(-c.length // PS), None if c.closed else c)
        end = offset + length
        for s, e, target in owner.segments(offset // PS, -(-end // PS)):
            a, b = max(offset, s * PS), min(end, e * PS)
            if a < b:
                yield target, a, b - a
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
        limit = self._permitted(offset, length, PROT_READ)  # the kernel backend pins by vmsplice
        if limit < offset + length:
            raise GuestAccessFault("pin", limit, "SIGSEGV: page protection forbids the access")
        with self.source.access_lock():
            # A private mapping's pin takes the pages it sees now (its copies, else the file's),
            # as the kernel backend's vmsplice does: no copy-on-write for it.
            for _ in self._runs(offset, length, self.shared, "mapping.pin"):
                pass
            schedule_point("host: pin", self.file, start, end)
            unpin = self.source.pin_pages(start, end)
        try:
            yield
        finally:
            unpin()

    def discard(self, offset: int, length: int) -> None:
        """``madvise(MADV_REMOVE)``: punch the range out of the mapped file."""
        fast = _FAST  # one page, compiled (madvise offers it too; this saves a call per page)
        if fast is not None and fast.discard_one(self, offset, length, MADV_REMOVE) is None:
            return
        self.madvise(offset, length, MADV_REMOVE)

    # --- mprotect / madvise (mm/mprotect.c, mm/madvise.c) ------------------------------------------
    def _range(self, op: str, offset: object, length: object, past_errno: int) -> tuple[int, int]:
        from guestmem import mman

        self.process.run_deferred()
        off, n = mman.mbind_range(op, offset, length, self.length, self.closed)
        if n and mman.past_mapping(off, n, self.length):
            raise KvmError(past_errno, op, "range reaches past the mapping (unmapped memory)")
        return off, n

    def mprotect(self, offset: int, length: int, prot: int) -> None:
        """``mprotect``: EINVAL for an unaligned offset or unknown protection bits, ENOMEM for a
        range past the mapping; then every page of the range gets ``prot``."""
        from guestmem import mman

        self.process.run_deferred()
        off, n, value = mman.mprotect_range(offset, length, prot, self.length, self.closed)
        if not n:
            return
        if value & ~self.max_prot:  # do_mprotect_pkey: a VM_WRITE/VM_EXEC without its VM_MAY*
            raise KvmError(errno.EACCES, "mprotect", f"protection {value:#x} exceeds what the "
                           f"mapping may have ({self.max_prot:#x})")
        first, last = off // PS, (off + n) // PS
        for c in self.children:
            lo = (c.addr - self.addr) // PS
            hi = lo + -(-c.length // PS)
            a, b = max(first, lo), min(last, hi)
            if a < b and not c.closed:
                c.mprotect((a - lo) * PS, (b - a) * PS, value)
        # change_protection: secondary MMUs drop what they mapped of the range (KVM re-faults
        # it under the new protection).
        self.process._notify(self.addr + off, self.addr + off + n,
                             lambda: self.prot_map.set(first, last, value))
        npages = -(-self.length // PS)
        uniform = {p for _, _, p in self.prot_map.segments(0, npages)}
        self._prot_all = uniform.pop() if len(uniform) == 1 else None

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """``madvise`` with the advices of :data:`guestmem.mman.MADV_SUPPORTED`; see
        :meth:`guestmem.api.Mapping.madvise` for each one's meaning and errnos."""
        fast = _FAST  # MADV_REMOVE of one page with nothing to free or zap, compiled
        if fast is not None and fast.discard_one(self, offset, length, advice) is None:
            return
        from guestmem import mman

        off, n = u64(offset, "offset"), u64(length, "length")
        value = mman.check_advice(advice)
        off, n = self._range("madvise", off, n, errno.ENOMEM)
        if not n:
            return
        start, end = self.pgoff + off // PS, self.pgoff + (off + n) // PS
        if value == mman.MADV_REMOVE:
            if self.source is self.file and getattr(self.file, "kind", "") == "anon" and not self.shared:
                raise KvmError(errno.EINVAL, "madvise", "MADV_REMOVE needs a file (private anonymous)")
            if not self.shared:
                raise KvmError(errno.EACCES, "madvise", "MADV_REMOVE needs a shared mapping")
            self.process.invalidate_file_range(self.file, start, end,
                                               lambda: self.file.discard_pages(start, end))
        elif value == mman.MADV_DONTNEED:
            first, last = off // PS, (off + n) // PS
            if self.shared:  # zap the host PTEs: secondary MMUs hear of it; contents stay
                self.process._notify(self.addr + off, self.addr + off + n,
                                     lambda: self.mapped.set(first, last, False))
            else:  # private pages go: the mapping sees the file (or zeros) again
                def drop() -> None:
                    self.mapped.set(first, last, False)
                    self.source.discard_pages(start, end)

                self.process._notify(self.addr + off, self.addr + off + n, drop)
        elif value in (mman.MADV_POPULATE_READ, mman.MADV_POPULATE_WRITE):
            write = value == mman.MADV_POPULATE_WRITE
            if self._permitted(off, n, PROT_WRITE if write else PROT_READ) < off + n:
                raise KvmError(errno.EINVAL, "madvise", "populate: the protection forbids the access")
            try:
                with self.source.access_lock():
                    for _ in self._runs(off, n, write, "madvise"):
                        pass
            except GuestAccessFault as f:
                raise KvmError(errno.EFAULT, "madvise", f"populating would {f.message}") from None
        elif value == mman.MADV_COLLAPSE and not self._may_collapse():
            raise KvmError(errno.EINVAL, "madvise", "MADV_COLLAPSE: no huge pages for this mapping")
        elif value in (mman.MADV_DONTFORK, mman.MADV_DOFORK):  # VM_DONTCOPY (no VM_IO here)
            first, last = off // PS, (off + n) // PS
            for c in self.children:
                lo = (c.addr - self.addr) // PS
                a, b = max(first, lo), min(last, lo + -(-c.length // PS))
                if a < b and not c.closed:
                    c.dontfork.set(a - lo, b - lo, value == mman.MADV_DONTFORK)
            self.dontfork.set(first, last, value == mman.MADV_DONTFORK)
        # NORMAL, RANDOM, SEQUENTIAL, WILLNEED, HUGEPAGE, NOHUGEPAGE: hints (readahead, THP) the
        # model's allocations do not depend on.

    def _may_collapse(self) -> bool:
        """``thp_vma_allowable_order(TVA_FORCED_COLLAPSE)``: guest_memfd never (collapsing would map
        past shared ranges into host page tables); shmem only with huge folios configured
        (``anon_folio_order`` >= 9, the model's shmem_enabled); private anonymous memory always."""
        if getattr(self.file, "kind", None) not in ("anon", "memfd"):
            return False
        if not self._holds_pmd():
            return False
        if not self.shared and self.source is self.file:
            return True
        return getattr(self.file, "folio_order", 0) >= 9

    def _holds_pmd(self) -> bool:
        """``thp_vma_suitable_order`` for the PMD order at the mapping's last huge page: the
        mapping must cover a whole 2 MiB-aligned range (a file mapping's address must also line up
        with its file offset), else no order is allowed and MADV_COLLAPSE is EINVAL."""
        huge = 512 * PS
        private_anon = (self.source is self.file and getattr(self.file, "kind", "") == "anon"
                        and not self.shared)
        if not private_anon and (self.addr // PS - self.pgoff) % 512:
            return False
        end = self.addr + -(-self.length // PS) * PS
        start = (end - huge) & ~(huge - 1)
        return start >= self.addr and start + huge <= end

    # --- NUMA policy (mm/mempolicy.c) ----------------------------------------------------------
    def _policy_file(self):  # -> object with .shared_policy and .page_cache
        return getattr(self.source, "overlay", self.file)

    def mbind(self, offset: int, length: int, mode: int, nodemask: int | None = None, maxnode: int = 64,
              flags: int = 0) -> None:
        """``mbind``: sanitize the mode, read the nodemask, check flags and alignment, build the
        policy (EINVAL on the way for each), EFAULT for a range past the mapping; then the
        mapped file's shared policy for the range is replaced (MPOL_DEFAULT removes it).  Pages
        already allocated stay where they are unless MPOL_MF_MOVE asks to migrate the mapped
        ones on other nodes (guest_memfd's cannot move).  MPOL_MF_STRICT alone is EIO, changing
        nothing, when a mapped page of the range is on a node outside the mask; with MOVE it is
        EIO (the policy set) when a page could not be moved."""
        from guestmem import mman

        off, n, mode, nodemask, maxnode, fl = mman.convert_mbind_args(offset, length, mode, nodemask,
                                                                      maxnode, flags)
        base, mode_flags = mman.sanitize_mode("mbind", mode)
        nodes = mman.get_nodes("mbind", nodemask, maxnode)
        if fl & ~mman.MPOL_MF_VALID:
            raise KvmError(errno.EINVAL, "mbind", f"invalid flags {fl:#x}")
        if self.closed:
            raise KvmError(errno.EBADF, "mbind", "mapping is closed")
        if off % PS:
            raise KvmError(errno.EINVAL, "mbind", "address must be page aligned")
        n = -(-n // PS) * PS
        # A length PAGE_ALIGN rounds up to 0 is do_mbind's `end == start`: nothing to do.  An
        # offset + length past 2**64 is relative: unmapped memory past the mapping (EFAULT below).
        if not n or n >= 1 << 64:
            return
        pol = mman.mpol_new("mbind", base, mode_flags, nodes, self.process.online_nodes)
        if mman.past_mapping(off, n, self.length):
            raise KvmError(errno.EFAULT, "mbind", "range reaches past the mapping (unmapped memory)")
        start, end = self.pgoff + off // PS, self.pgoff + (off + n) // PS
        move = bool(fl & (mman.MPOL_MF_MOVE | mman.MPOL_MF_MOVE_ALL))
        strict = bool(fl & mman.MPOL_MF_STRICT) and pol is not None
        # queue_pages_range: the mapped pages on a node outside the requested mask.
        misplaced = ([i for i, node in self._nodes(start, end) if node >= 0 and not nodes >> node & 1]
                     if pol is not None and (strict or move) else [])
        if misplaced and not move and strict:  # strictly_unmovable: EIO before any policy is set
            raise KvmError(errno.EIO, "mbind", "MPOL_MF_STRICT: pages already on other nodes")
        self._policy_file().shared_policy.set(start, end, pol)
        failed = sum(not self._migrate(i, pol) for i in misplaced) if move else len(misplaced)
        if failed and strict:
            raise KvmError(errno.EIO, "mbind", f"MPOL_MF_STRICT: {failed} page(s) could not be moved")

    def _migrate(self, index: int, pol: object) -> bool:
        """``migrate_pages`` of the page at file ``index`` to where ``pol`` places a new page:
        the mapping's own copy, or the shmem file's page (every mapping of it is invalidated
        around the move).  guest_memfd pages cannot move (``kvm_gmem_migrate_folio`` refuses),
        nor can pinned ones (EAGAIN); returns whether the page moved."""
        from guestmem.model.mm.numa import policy_node

        node = policy_node(pol, self.process.task_policy)  # type: ignore[arg-type]
        overlay = getattr(self.source, "overlay", None)
        if overlay is not None and overlay.cache.is_allocated(index):
            cache, notify = overlay.cache, self.notify_pages
        elif getattr(self.file, "kind", None) in ("anon", "memfd"):
            cache = self.file.page_cache  # type: ignore[attr-defined]

            def notify(s: int, e: int, act: Callable[[], None]) -> None:
                self.process.invalidate_file_range(self.file, s, e, act, unmap=False)
        else:
            return False
        moved: list[bool] = []

        def move() -> None:
            try:
                cache.migrate(index, node)
                moved.append(True)
            except KvmError:
                pass

        notify(index, index + 1, move)
        return bool(moved)

    def _nodes(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(index, node)`` of the file pages [start, end) this mapping has a host PTE for;
        -ENOENT where it has none."""
        pool_of = self.process.pool
        for i in range(start, end):
            pfn = None
            if not self.mapped.get(i - self.pgoff):
                yield i, -errno.ENOENT
                continue
            if hasattr(self.source, "overlay"):
                hit = self.source.overlay.page_cache.lookup(i)  # type: ignore[attr-defined]
                pfn = None if hit is None else hit[0]
            if pfn is None:
                hit = self.file.page_cache.lookup(i)  # type: ignore[attr-defined]
                pfn = None if hit is None else hit[0]
            yield i, (-errno.ENOENT if pfn is None or pool_of is None else pool_of.node_of(pfn))

    def get_mempolicy(self, offset: int, flags: int = 0x2) -> tuple[int, int]:
        """``get_mempolicy(MPOL_F_ADDR[|MPOL_F_NODE])`` for the page at ``offset``."""
        from guestmem import mman

        off, fl = u64(offset, "offset"), u64(flags, "flags")
        if fl & ~(mman.MPOL_F_NODE | mman.MPOL_F_ADDR | mman.MPOL_F_MEMS_ALLOWED):
            raise KvmError(errno.EINVAL, "get_mempolicy", f"invalid flags {fl:#x}")
        if fl & mman.MPOL_F_MEMS_ALLOWED or not fl & mman.MPOL_F_ADDR:
            raise KvmError(errno.EINVAL, "get_mempolicy", "a mapping's policy is asked with MPOL_F_ADDR")
        if self.closed:
            raise KvmError(errno.EBADF, "get_mempolicy", "mapping is closed")
        if off >= -(-self.length // PS) * PS:
            raise KvmError(errno.EFAULT, "get_mempolicy", "address not mapped")
        target, sub = self, off
        for c in self.children:
            if c.addr - self.addr <= off < c.addr - self.addr + c.length:
                if c.closed:
                    raise KvmError(errno.EFAULT, "get_mempolicy", "address not mapped")
                target, sub = c, off - (c.addr - self.addr)
        pol = target._policy_file().shared_policy.lookup(target.pgoff + sub // PS)
        nodes = 0 if pol is None else pol.nodes
        if fl & mman.MPOL_F_NODE:
            page = sub // PS * PS
            if target._permitted(page, 1, PROT_READ) <= page:
                raise KvmError(errno.EFAULT, "get_mempolicy", "page not readable")
            try:
                with target.source.access_lock():
                    for _ in target._runs(page, 1, False, "get_mempolicy"):
                        pass
            except GuestAccessFault as f:
                raise KvmError(errno.EFAULT, "get_mempolicy", f.message) from None
            idx = target.pgoff + sub // PS
            return next(target._nodes(idx, idx + 1))[1], nodes
        if pol is None:
            return mman.MPOL_DEFAULT, 0
        return pol.mode | (pol.flags & mman.MPOL_MODE_FLAGS), nodes

    def page_nodes(self, offset: int, npages: int) -> list[int]:
        """``move_pages(0, n, pages, NULL, status, 0)``: the node of each page from ``offset``
        (no fault), ``-ENOENT`` where no page is present, ``-EFAULT`` past the mapping."""
        off, count = u64(offset, "offset"), u64(npages, "npages")
        if self.closed:
            raise KvmError(errno.EBADF, "move_pages", "mapping is closed")
        out: list[int] = []
        for k in range(count):
            addr = self.addr + off + k * PS
            hit = self.process.resolve(addr)
            if hit is None or off + k * PS >= -(-self.length // PS) * PS:
                out.append(-errno.EFAULT)
                continue
            m, sub = hit
            idx = m.pgoff + sub // PS
            out.append(next(m._nodes(idx, idx + 1))[1])
        return out

    # --- MAP_FIXED over part of this mapping ------------------------------------------------------
    def mmap_fixed(self, offset: int, length: int, prot: int, flags: int, fd: object = None,
                   file_offset: int = 0) -> ModelMapping:
        """``mmap(self.addr + offset, length, prot, flags | MAP_FIXED, fd, file_offset)``."""
        from guestmem import mman

        off, n = mman.mmap_fixed_range(self, offset, length)
        child = self.process.map_request(n, prot, flags, fd, file_offset, fixed=self.addr + off)
        child.parent = self
        self.children.append(child)
        return child

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
        # Set by the system that owns the process: where frames come from (NUMA node lookups),
        # which nodes have memory, the mmap implementation, and this task's memory policy.
        self.pool = None  # guestmem.model.mm.frames.FramePool
        self.online_nodes = 1
        self.system = None  # guestmem.model.kvm.system.ModelKvm (weakly meaningful)
        from guestmem.model.mm.numa import TaskPolicy

        self.task_policy = TaskPolicy()

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
    def mmap(self, file: MappableFile, length: int, pgoff: int = 0, *, align: int = PS,
             prot: int = PROT_RW, shared: bool = True, source: MappableFile | None = None,
             fixed: int | None = None) -> ModelMapping:
        """Map ``file`` from page ``pgoff``; ``align`` (a power of two) aligns the address, as a VMM
        aligns guest RAM to the hugepage size so that memslots can map it huge.  ``fixed`` places
        it at that address over what is there (MAP_FIXED; the caller checked the range)."""
        if align < PS or align & (align - 1):
            raise ValueError(f"align must be a power of two of at least a page, not {align:#x}")
        npages = check_mmap_length(length, pgoff)
        if fixed is not None:  # what was mapped there goes: secondary MMUs hear of it
            self._notify(fixed, fixed + npages * PS, lambda: None)
        with self._lock:
            if fixed is not None:
                addr = fixed
            else:
                # Leave a guard page between mappings so neighbours never look contiguous.
                top = (self._next_top - (npages + 1) * PS) & ~(align - 1)
                if top < _MMAP_MIN:
                    raise KvmError(errno.ENOMEM, "mmap", "no room for the mapping in the address space")
                self._next_top = addr = top
            m = ModelMapping(self, file, addr, length, pgoff, prot=prot, shared=shared, source=source)
            if source is not None and hasattr(source, "notify"):
                source.notify = m.notify_pages  # a COW copy replaces the host PTE
            self._mappings[id(m)] = weakref.ref(m)
            self._by_file.setdefault(id(file), set()).add(id(m))
            self._vmas.set(addr // PS, addr // PS + npages, id(m))
        file.get_file()
        return m

    def map_request(self, length: int, prot: int, flags: int, fd: object, offset: int,
                    fixed: int | None = None) -> ModelMapping:
        """``mmap(2)`` as the system implements it (see ``ModelKvm.mmap``)."""
        if self.system is None:
            raise KvmError(errno.ENODEV, "mmap", "process has no system")
        return self.system.map_into(self, length, prot, flags, fd, offset, fixed)

    def munmap(self, m: ModelMapping) -> None:
        for c in list(m.children):  # munmap of the whole range takes MAP_FIXED pieces with it
            c.close()
        with self._lock:
            if id(m) not in self._mappings:
                return
        end = m.addr + (m.length + PS - 1) // PS * PS
        self._notify(m.addr, end, self._unmap_locked(m))
        m.source.put_file()
        release = getattr(m.source, "overlay", None)
        if release is not None:  # a private mapping's copies die with it
            release.put_file()

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

    def invalidate_file_range(self, file: object, start: int, end: int, action, *,
                              unmap: bool = True) -> None:
        """Run ``action`` (which removes pages [start, end) of ``file``) inside MMU-notifier
        invalidations of every host virtual range that maps those pages.  ``unmap`` False: the
        pages stay mapped in the host (a migration replaces the PTEs)."""
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
                if m.shared and unmap:  # unmap_mapping_range: the PTEs go (private copies stay)
                    m.mapped.set(a - m.pgoff, b - m.pgoff, False)
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
        """A child process: the same open files, the same mappings at the same addresses with the
        same protections (what fork(2) gives a VMM's child), and the task's memory policy.
        MAP_SHARED mappings go through the same files, so the child sees conversions and hole
        punches exactly as the parent does; MAP_PRIVATE ones get their own copy of every page the
        parent had made private (fork's copy-on-write, observably a copy)."""
        child = Process()
        child.pool, child.online_nodes, child.system = self.pool, self.online_nodes, self.system
        child.task_policy = self.task_policy.copy()
        with self._lock:
            child._fds = dict(self._fds)
            child.fd_cloexec = set(self.fd_cloexec)
            child._next_top = self._next_top
            parents = self.mappings()
        copies: dict[int, ModelMapping] = {}
        for m in sorted(parents, key=lambda x: x.parent is not None):
            source = m.source
            if not m.shared:
                source = self.system.private_copy(m) if self.system is not None else m.source
            cm = ModelMapping(child, m.file if source is m.source or m.source is not m.file else source,
                              m.addr, m.length, m.pgoff, shared=m.shared, source=source)
            cm.prot_map = m.prot_map.copy() if hasattr(m.prot_map, "copy") else m.prot_map
            cm._prot_all = m._prot_all
            cm.max_prot = m.max_prot
            copies[id(m)] = cm
            with child._lock:
                child._mappings[id(cm)] = weakref.ref(cm)
                child._by_file.setdefault(id(cm.file), set()).add(id(cm))
                child._owned.append(cm)
                child._vmas.set(m.addr // PS, (m.addr + m.length + PS - 1) // PS, id(cm))
                for a, b, skip in m.dontfork.segments(0, (m.length + PS - 1) // PS):
                    if skip:  # dup_mmap skips VM_DONTCOPY: nothing is mapped there in the child
                        child._vmas.set(m.addr // PS + a, m.addr // PS + b, None)
            if source is m.source:
                m.source.get_file()
        for m in parents:
            if m.parent is not None and id(m.parent) in copies:
                cm, cp = copies[id(m)], copies[id(m.parent)]
                cm.parent = cp
                cp.children.append(cm)
        for m in parents:  # a MAP_FIXED piece is above its parent in the address space
            if m.parent is not None:
                cm = copies[id(m)]
                child._vmas.set(cm.addr // PS, (cm.addr + cm.length + PS - 1) // PS, id(cm))
        return child

    def exit(self) -> None:
        """The process exits: every mapping it holds is unmapped (its files released)."""
        for m in list(self._owned):
            m.close()

    def mapping_at(self, addr: int) -> ModelMapping | None:
        hit = self.resolve(addr)
        return None if hit is None else hit[0]

    def mappings(self) -> list[ModelMapping]:
        with self._lock:
            return [m for m in (r() for r in self._mappings.values()) if m is not None]
