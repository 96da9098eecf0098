"""guest_memfd: fd-based guest memory owned by KVM (virt/kvm/guest_memfd.c, as merged in 6.8..6.18).

Two objects, as upstream: a :class:`GmemInode` is the storage (its size, flags, page cache, and the
per-page state that lives with folios: uptodate, hwpoison, extra references; in the in-place
design also the shared/private attributes), and a :class:`GmemFile` is one VM's view of it (the
fd, its memslot bindings, the reference on the VM).  Pages live with the inode; closing the file
zaps every SPTE it backs but frees nothing until the inode goes.

Invalidation follows upstream exactly: for each file, for each binding that intersects the range,
``invalidate_begin`` (under the VM's mmu_lock, once) and an unmap of the bound gfns; afterwards
``invalidate_end`` if any binding intersects.  Punch, bind, unbind and release hold the inode's
``filemap_invalidate_lock`` exclusive; allocation and the guest fault path hold it shared.
"""

from __future__ import annotations

import errno
import itertools
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from guestmem import uapi as u
from guestmem.args import as_bytes, check_reserved, s32, s64, u64
from guestmem.errors import EHWPOISON, KvmError
from guestmem.model.fileops import ModelFileOps
from guestmem.model.process import HostFault, ModelMapping, OpenFile, Process, check_mmap_length
from guestmem.model.vfs import vfs_fallocate_checks
from guestmem.ranges import RangeMap
from guestmem.sync import RwSem

if TYPE_CHECKING:
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.system import ModelKvm
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
ALL = 1 << (63 - u.PAGE_SHIFT)  # "-1ul": past the last index a file can have
_inode_numbers = itertools.count(0x4000)


def s64_wrap(value: int) -> int:
    """``value`` as a signed 64-bit C integer holds it (two's complement wrap)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


class GmemInode:
    """The storage behind a guest_memfd (``struct gmem_inode``)."""

    def __init__(self, system: ModelKvm, size: int, flags: int, folio_order: int) -> None:
        from guestmem.model.mm.pagecache import PageCache

        self.system = system
        self.size = size
        self.flags = flags
        self.ino = next(_inode_numbers)
        self.folio_order = folio_order
        self.cache = PageCache(system.pool)  # folios, uptodate and extra references live here
        self.hwpoison: RangeMap[bool] = RangeMap(False)
        # In-place conversion: shared/private per page lives here, covering [0, size) whether or
        # not a page is allocated.  Default private; INIT_SHARED starts shared.
        init = 0 if flags & u.GUEST_MEMFD_FLAG_INIT_SHARED else u.KVM_MEMORY_ATTRIBUTE_PRIVATE
        self.attributes: RangeMap[int] = RangeMap(init)
        self.invalidate_lock = RwSem("filemap_invalidate_lock")
        self._files: list[weakref.ref[GmemFile]] = []  # the files (views) of this inode, not owned
        self.freed = False
        self.arch_invalidate = None  # set by the owning VM's flavour (kvm_arch_gmem_invalidate)
        system.register_file(self)

    @property
    def files(self) -> list[GmemFile]:
        """The live files (one per VM view) of this inode."""
        return [f for f in (r() for r in self._files) if f is not None]

    def add_file(self, f: GmemFile) -> None:
        self._files.append(weakref.ref(f))

    def remove_file(self, f: GmemFile) -> None:
        self._files = [r for r in self._files if r() is not None and r() is not f]

    @property
    def npages(self) -> int:
        return self.size // PS

    @property
    def mmap_supported(self) -> bool:
        return bool(self.flags & u.GUEST_MEMFD_FLAG_MMAP)

    @property
    def init_shared(self) -> bool:
        return bool(self.flags & u.GUEST_MEMFD_FLAG_INIT_SHARED)

    def is_private(self, index: int) -> bool:
        return bool(self.attributes.get(index) & u.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    # --- page cache ---------------------------------------------------------------------------
    def get_folios(self, start: int, end: int, *, zero: bool) -> list[tuple[int, int, int, int]]:
        """Get or create the folios backing [start, end); return runs ``(s, e, pfn_of_s, order)``.

        With ``zero`` the pages not yet up to date are cleared and marked up to date (the
        "zeroed at most once, before first use" rule); allocation alone does neither.
        """
        if end == start + 1 and not self.folio_order:  # one 4 KiB page: no run lists
            pfn, order = self.cache.get_page(start, zero=zero, limit=self.npages)
            return [(start, end, pfn, order)]
        self._populate(start, end)
        if zero:
            self.cache.prepare(start, end)
        return [(s, e, pfn, order) for s, e, pfn, order in self.cache.lookup_range(start, end)
                if pfn is not None]

    def _populate(self, start: int, end: int) -> None:
        """Allocate the missing pages of [start, end) as folios of the inode's order — except, in
        the in-place design, where an aligned block's pages are not all shared or all private:
        a large folio there would be mapped huge over mixed attributes, so that block gets
        order-0 pages (split/merge keep every large folio uniform; allocation must too)."""
        order = self.folio_order
        if not order or not self.system.options.gmem_attributes:
            self.cache.populate(start, end, order, limit=self.npages)
            return
        size = 1 << order
        # Over the whole blocks the request widens to (populate allocates whole folios).
        lo, hi = start & ~(size - 1), min((end + size - 1) & ~(size - 1), self.npages)
        mixed = sorted({s & ~(size - 1) for s, _, _ in self.attributes.segments(lo, hi) if s % size})
        pos = start
        for block in mixed:
            a, b = max(block, start), min(block + size, end)
            if a >= b:
                continue
            if pos < a:
                self.cache.populate(pos, a, order, limit=self.npages)
            self.cache.populate(a, b, 0, limit=self.npages)
            pos = b
        if pos < end:
            self.cache.populate(pos, end, order, limit=self.npages)

    def remove_pages(self, start: int, end: int) -> int:
        """Truncate [start, end) from the page cache: frees the frames and forgets folio state."""
        if self.arch_invalidate is not None:
            # free_folio -> kvm_arch_gmem_invalidate (SNP: give the frames back to the host).
            for s, e, pfn, _ in list(self.cache.lookup_range(start, end)):
                if pfn is not None:
                    self.arch_invalidate(pfn, e - s)
        n = self.cache.remove(start, end)
        self.hwpoison.set(start, end, False)
        return n

    def free(self) -> None:
        """The inode's last reference is gone: give every frame back."""
        if not self.freed:
            self.freed = True
            self.remove_pages(0, ALL)
            self.system.unregister_file(self)

    # --- invalidation -------------------------------------------------------------------------
    def invalidate_filter(self) -> int:
        """Which SPTEs an invalidation zaps where the arch keeps private and shared apart
        (TDX mirror roots): upstream derives it from INIT_SHARED; the in-place design from the
        attributes in range (see :meth:`GmemFile.invalidate_begin`)."""
        from guestmem.model.kvm.mmu import FILTER_PRIVATE, FILTER_SHARED

        if self.init_shared:
            return FILTER_SHARED
        if self.mmap_supported and self.system.options.gmem_invalidate_shared_fix:
            # The fix for docs/findings.md #1: a gmem-only slot's shared SPTEs come from this
            # file too, so they must go with its pages.
            return FILTER_PRIVATE | FILTER_SHARED
        return FILTER_PRIVATE

    def invalidate_begin(self, start: int, end: int, attr_filter: int | None = None,
                         retry_span: tuple[int, int] | None = None) -> None:
        """Begin invalidating pages [start, end): zap their SPTEs.  ``retry_span`` (a superset)
        is what faults must retry on meanwhile without being zapped (the rest of a large folio
        being split); the matching :meth:`invalidate_end` is over the span."""
        if attr_filter is None:
            attr_filter = self.filter_for(start, end)
        for f in list(self.files):
            f.invalidate_begin(start, end, attr_filter, retry_span)

    def invalidate_end(self, start: int, end: int) -> None:
        for f in list(self.files):
            f.invalidate_end(start, end)

    def filter_for(self, start: int, end: int) -> int:
        from guestmem.model.kvm.mmu import FILTER_PRIVATE, FILTER_SHARED

        if not self.system.options.gmem_attributes:
            return self.invalidate_filter()
        flt = 0
        for _, _, v in self.attributes.segments(start, min(end, self.npages) if end > start else end):
            flt |= FILTER_PRIVATE if v & u.KVM_MEMORY_ATTRIBUTE_PRIVATE else FILTER_SHARED
        return flt or (FILTER_PRIVATE | FILTER_SHARED)


class GmemFile(ModelFileOps, OpenFile):
    """One VM's guest_memfd file (``struct gmem_file`` + the ``struct file``).

    Refcounted like a ``struct file``: the fd holds one reference and every mmap holds one; the
    file is released (``kvm_gmem_release``) when the last goes.  Memslots point at it without
    holding it (``weak_binding``), as ``slot->gmem.file`` does.
    """

    kind = "guest_memfd"
    weak_binding = True

    def __init__(self, vm: ModelVm, inode: GmemInode) -> None:
        self.vm = vm
        self.inode = inode
        self.bindings: RangeMap[Memslot | None] = RangeMap(None)
        self.released = False
        vm.get()  # the file pins the VM, not the other way round
        inode.add_file(self)

    # --- Protocol attributes --------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.inode.size

    @property
    def flags(self) -> int:
        return u.GuestMemfdFlag(self.inode.flags)  # an int that shows its flag names

    @property
    def system(self) -> ModelKvm:
        return self.vm.system

    # --- file lifetime ------------------------------------------------------------------------
    @property
    def owner_process(self) -> Process:
        return self.system.process

    def _release(self) -> None:
        """``kvm_gmem_release``: detach every bound slot and zap all SPTEs this file backs."""
        vm, inode = self.vm, self.inode
        with vm.slots_lock(), inode.invalidate_lock.write():
            for _, _, slot in list(self.bindings.items()):
                if slot is not None:
                    slot.gmem_file = None
            self.invalidate_begin(0, ALL, inode.filter_for(0, inode.npages))
            self.invalidate_end(0, ALL)
            inode.remove_file(self)
            self.released = True
        self.bindings.clear()
        if not inode.files:
            inode.free()
        vm.put()

    # --- file operations ----------------------------------------------------------------------
    def _check_open(self, op: str) -> None:
        """A call through a closed fd: EBADF (mappings keep the file itself alive)."""
        self.system.process.run_deferred()
        if self.fd < 0:
            raise KvmError(errno.EBADF, op, "guest_memfd is closed")

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        mode, offset, length = s32(mode, "mode"), s64(offset, "offset"), s64(length, "length")
        self._check_open("fallocate")
        vfs_fallocate_checks(mode, offset, length)
        op = "fallocate"
        if not mode & u.FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, op, "guest_memfd requires FALLOC_FL_KEEP_SIZE")
        if mode & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, op, f"mode {mode:#x} not supported by guest_memfd")
        if offset % PS or length % PS:
            raise KvmError(errno.EINVAL, op, "offset and length must be page aligned")
        if mode & u.FALLOC_FL_PUNCH_HOLE:
            self._punch_hole(offset, length)
        else:
            self._allocate(offset, length)

    def allocate(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        self.fallocate(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE, offset, length)

    def _punch_hole(self, offset: int, length: int) -> None:
        inode = self.inode
        start, end = offset // PS, (offset + length) // PS
        with inode.invalidate_lock.write():
            inode.invalidate_begin(start, end)
            # Removing pages from the page cache also zaps host PTEs (unmap_mapping_range),
            # which secondary MMUs hear about through their MMU notifiers.
            self.system.process.invalidate_file_range(self, start, end,
                                                      lambda: inode.remove_pages(start, end))
            inode.invalidate_end(start, end)
        self.system.stats["punches"] += 1

    def _allocate(self, offset: int, length: int) -> None:
        inode = self.inode
        if offset + length > inode.size:
            raise KvmError(errno.EINVAL, "fallocate", "range beyond the guest_memfd's size")
        with inode.invalidate_lock.read():
            # Allocation neither zeroes nor marks up to date (first use does).
            inode.get_folios(offset // PS, (offset + length) // PS, zero=False)

    def read(self, length: int, offset: int | None = None) -> bytes:
        # No read handler: read(2) fails in vfs_read with EINVAL; pread(2) fails earlier with
        # ESPIPE, because the file is not opened FMODE_PREAD.
        u64(length, "length")
        if offset is not None and s64(offset, "offset") < 0:
            raise KvmError(errno.EINVAL, "pread", "negative offset")  # checked before the fd
        self._check_open("read" if offset is None else "pread")
        if offset is not None:
            raise KvmError(errno.ESPIPE, "pread")
        raise KvmError(errno.EINVAL, "read")

    def write(self, data: bytes, offset: int | None = None) -> int:
        as_bytes(data, "data")
        if offset is not None and s64(offset, "offset") < 0:
            raise KvmError(errno.EINVAL, "pwrite", "negative offset")  # checked before the fd
        self._check_open("write" if offset is None else "pwrite")
        if offset is not None:
            raise KvmError(errno.ESPIPE, "pwrite")
        raise KvmError(errno.EINVAL, "write")

    def truncate(self, size: int) -> None:
        if s64(size, "size") < 0:
            raise KvmError(errno.EINVAL, "ftruncate", "negative length")  # checked before the fd
        self._check_open("ftruncate")
        raise KvmError(errno.EINVAL, "ftruncate", "guest_memfd's size is immutable")

    def stat(self) -> tuple[int, int, int]:
        self._check_open("fstat")
        return self.inode.size, PS, self.inode.ino

    def mmap(self, length: int | None = None, offset: int = 0, *, shared: bool = True) -> ModelMapping:
        length = self.inode.size if length is None else u64(length, "length")
        offset = s64(offset, "offset")
        if not isinstance(shared, bool):
            raise TypeError(f"shared must be a bool, not {type(shared).__name__}")
        if offset % PS:  # ksys_mmap_pgoff checks this before looking the fd up
            raise KvmError(errno.EINVAL, "mmap", "offset must be page aligned")
        self._check_open("mmap")
        # do_mmap: the length checks (EINVAL for 0, ENOMEM where it cannot fit) come before
        # file_mmap_ok's EOVERFLOW for a file range past MAX_LFS_FILESIZE (a negative offset).
        check_mmap_length(length, max(offset, 0) // PS)
        if offset < 0:
            raise KvmError(errno.EOVERFLOW, "mmap", "offset + length beyond MAX_LFS_FILESIZE")
        if not self.inode.mmap_supported:
            raise KvmError(errno.ENODEV, "mmap", "guest_memfd created without GUEST_MEMFD_FLAG_MMAP")
        if not shared:
            raise KvmError(errno.EINVAL, "mmap", "guest_memfd mappings must be MAP_SHARED")
        return self.system.process.mmap(self, length, offset // PS)

    def set_memory_attributes2(self, offset: int, size: int, attributes: int, flags: int = 0,
                               reserved: Sequence[int] = ()) -> None:
        from guestmem.model.kvm.inplace import set_memory_attributes2

        offset, size = u64(offset, "offset"), u64(size, "size")
        attributes, flags = u64(attributes, "attributes"), u64(flags, "flags")
        reserved = check_reserved(reserved, u.kvm_memory_attributes2)
        self._check_open("KVM_SET_MEMORY_ATTRIBUTES2")
        set_memory_attributes2(self, offset, size, attributes, flags, reserved)

    # --- host userspace faults (MappableFile) ---------------------------------------------------
    def host_fault(self, start: int, end: int, write: bool) -> list[tuple[int, int, int]]:
        """``kvm_gmem_fault_user_mapping`` over a run of pages: SIGBUS past i_size, and on a page
        the host may not touch (upstream: any page without INIT_SHARED; in-place: a private one)."""
        inode = self.inode
        with inode.invalidate_lock.read():
            stop = min(end, inode.npages)
            if not self.system.options.gmem_attributes:
                if not inode.init_shared:
                    stop = start
            else:
                first_private = inode.attributes.first_match(
                    start, stop, lambda v: bool(v & u.KVM_MEMORY_ATTRIBUTE_PRIVATE))
                if first_private is not None:
                    stop = first_private
            poisoned = inode.hwpoison.first_match(start, stop, bool) if stop > start else None
            if poisoned is not None:
                stop = poisoned
            if stop <= start:
                raise HostFault(start, "SIGBUS")
            runs = inode.get_folios(start, stop, zero=True)
            out = []
            for s, e, pfn, _ in runs:
                bad = self.vm.arch.host_may_access(pfn, e - s)
                if bad is not None:
                    if bad == pfn:
                        if not out:
                            raise HostFault(s, "SIGBUS: RMP violation (frame owned by the guest)")
                        break
                    out.append((s, s + (bad - pfn), pfn))
                    break
                out.append((s, e, pfn))
            return out

    def discard_pages(self, start: int, end: int) -> None:
        """MADV_REMOVE on a guest_memfd mapping punches the hole through the file."""
        self._punch_hole(start * PS, (end - start) * PS)

    def pin_pages(self, start: int, end: int) -> Callable[[], None]:
        return self.inode.cache.pin(start, end)

    def access_lock(self) -> AbstractContextManager[object]:
        """A host access holds the invalidate lock shared, so an in-place conversion (which takes
        it exclusive) cannot turn a page private between the host's fault and its store."""
        return self.inode.invalidate_lock.read()

    def frame_view(self, pfn: int, npages: int) -> np.ndarray:
        return self.system.pool.view(pfn, npages)

    # --- memory failure (kvm_gmem_error_folio) ---------------------------------------------------
    def memory_failure(self, offset: int) -> None:
        """A hardware memory error in the folio holding ``offset`` (what ``madvise(MADV_HWPOISON)``
        injects on a real host): mappings of it are zapped but the page is *not* truncated;
        userspace decides what to do.  A later guest fault on it gets EHWPOISON, a host access
        SIGBUS, and a hole punch clears it."""
        offset = u64(offset, "offset")
        self._check_open("memory_failure")
        inode = self.inode
        index = offset // PS
        if index >= inode.npages:
            raise KvmError(errno.EINVAL, "memory_failure", "offset beyond the guest_memfd")
        fol = inode.cache.folio(index)
        if fol is None:
            raise KvmError(errno.EINVAL, "memory_failure", "no page is allocated there")
        start, end = fol[0], fol[0] + (1 << fol[2])
        with inode.invalidate_lock.read():
            inode.invalidate_begin(start, end)
            inode.hwpoison.set(start, end, True)
            inode.invalidate_end(start, end)

    # --- bindings (kvm_gmem_bind / kvm_gmem_unbind) ---------------------------------------------
    def bind(self, slot: Memslot, offset: int) -> None:
        """Bind ``slot`` to pages starting at ``offset``; the caller has done the fget/type checks."""
        inode = self.inode
        size = slot.npages * PS
        release = self.vm.system.options.release
        end_offset = offset + size
        if release.bind_offset_signed:
            # Through 6.18 the offset is a signed loff_t: the sum wraps negative past INT64_MAX and
            # passes `offset + size > i_size_read(inode)`; 7.2's uoff_t (guest_memfd.c:673) does not.
            end_offset = s64_wrap(end_offset)
        if (release.bind_offset_signed and s64_wrap(offset) < 0) or offset % PS \
                or end_offset > inode.size:
            raise KvmError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2",
                           "guest_memfd_offset unaligned or range beyond the guest_memfd")
        with inode.invalidate_lock.write():
            start, end = offset // PS, offset // PS + slot.npages
            if self.bindings.any_match(start, end, lambda s: s is not None):
                # 6.8/6.18: EINVAL; 7.2: EEXIST (guest_memfd.c:681-686).
                raise KvmError(release.bind_overlap_errno, "KVM_SET_USER_MEMORY_REGION2",
                               "guest_memfd range already bound to another memslot")
            from guestmem.model.kvm.memslot import KVM_MEMSLOT_GMEM_ONLY

            slot.gmem_file = self
            slot.gmem_pgoff = start
            if inode.mmap_supported:
                slot.flags |= KVM_MEMSLOT_GMEM_ONLY
            self.bindings.set(start, end, slot)

    def unbind(self, slot: Memslot) -> None:
        if slot.gmem_file is not self:
            return  # already released: kvm_gmem_release nullified the binding
        with self.inode.invalidate_lock.write():
            self.bindings.set(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages, None)
            slot.gmem_file = None

    def bound_slots(self, start: int, end: int) -> list[tuple[Memslot, int, int]]:
        """Slots bound in [start, end) with the gfn range each covers there."""
        out = []
        seen: set[int] = set()
        for _s, _e, slot in self.bindings.segments(start, min(end, ALL)):
            if slot is None or id(slot) in seen:
                continue
            seen.add(id(slot))
            pg = slot.gmem_pgoff
            g0 = slot.base_gfn + max(pg, start) - pg
            g1 = slot.base_gfn + min(pg + slot.npages, end) - pg
            out.append((slot, g0, g1))
        return out

    def invalidate_begin(self, start: int, end: int, attr_filter: int,
                         retry_span: tuple[int, int] | None = None) -> None:
        vm = self.vm
        lo, hi = retry_span or (start, end)
        targets = self.bound_slots(lo, hi)
        if not targets:
            return
        with vm.mmu_lock():
            vm.mmu.invalidate_begin()
            for slot, g0, g1 in targets:
                vm.mmu.range_add(g0, g1)
                z0 = max(g0, slot.index_to_gfn(start))
                z1 = min(g1, slot.index_to_gfn(end))
                if z0 < z1:
                    vm.mmu.unmap_gfn_range(slot, z0, z1, attr_filter)
        self.system.stats["invalidations"] += 1

    def invalidate_end(self, start: int, end: int) -> None:
        if self.bindings.any_match(start, min(end, ALL), lambda s: s is not None):
            with self.vm.mmu_lock():
                self.vm.mmu.invalidate_end()

    # --- the guest side (kvm_gmem_get_pfn over a run of gfns) -------------------------------------
    def get_pfn_range(self, slot: Memslot, gfn: int, end_gfn: int, zero: bool = True
                      ) -> tuple[list[tuple[int, int, int, int]], int]:
        """Look up (allocating and zeroing on first use) the pages backing gfns [gfn, end_gfn).

        ``zero=False`` (a launch that encrypts the current contents in place) hands out pages
        without clearing the ones not yet up to date.

        Returns ``(runs, err)``: runs ``(gfn_s, gfn_e, pfn_of_gfn_s, max_order)`` for the longest
        servable prefix, and the errno that stops it (0 if the whole range was served).  An
        error at ``gfn`` itself yields no runs.
        """
        inode = self.inode
        if self.released or slot.gmem_file is not self:
            return [], errno.EFAULT
        req0, req1 = i0, i1 = slot.gfn_to_index(gfn), slot.gfn_to_index(end_gfn)
        if inode.folio_order:
            # A large folio is handed out whole (so it can be mapped huge): widen to folio
            # boundaries, within this slot's binding and the file.
            mask = (1 << inode.folio_order) - 1
            lo, hi = slot.gmem_pgoff, min(slot.gmem_pgoff + slot.npages, inode.npages)
            i0, i1 = max(i0 & ~mask, lo), min((i1 + mask) & ~mask, hi)
        with inode.invalidate_lock.read():
            if i0 < req0 and (self.bindings.first_match(i0, req0, lambda s: s is not slot) is not None
                              or inode.hwpoison.first_match(i0, req0, bool) is not None):
                i0 = req0  # the pages before the faulting one cannot come whole: no widening there
            err = 0
            bad = self.bindings.first_match(i0, i1, lambda s: s is not slot)
            if bad is not None:
                i1, err = bad, errno.EIO
            poisoned = inode.hwpoison.first_match(i0, i1, bool) if i1 > i0 else None
            if poisoned is not None:
                i1, err = poisoned, EHWPOISON
            if i1 >= req1:
                err = 0  # what was asked for is served; the widening's tail only stops short
            if i1 <= max(i0, req0):
                return [], err  # the faulting page itself cannot be served
            runs = inode.get_folios(i0, i1, zero=zero)
            out = []
            for s, e, pfn, order in runs:
                # A folio maps huge only where the gfn and the index agree in their low bits.
                if order and (slot.gfn_to_index(slot.base_gfn) - slot.base_gfn) % (1 << order):
                    order = 0
                out.append((slot.index_to_gfn(s), slot.index_to_gfn(e), pfn, order))
            self.vm.arch.gmem_prepare(self, slot, out)
            return out, err

    def __repr__(self) -> str:
        return f"GmemFile(fd={self.fd}, size={self.inode.size:#x}, flags={self.inode.flags:#x})"


def create_guest_memfd(vm: ModelVm, size: int, flags: int) -> GmemFile:
    """``kvm_gmem_create``: validate, then make an inode and a file, installed at a new fd."""
    op = "KVM_CREATE_GUEST_MEMFD"
    if flags & ~vm.gmem_supported_flags():
        raise KvmError(errno.EINVAL, op, f"unsupported flags {flags:#x}")
    if size >= 1 << 63:
        size -= 1 << 64  # loff_t is signed
    if size <= 0 or size % PS:
        raise KvmError(errno.EINVAL, op, "size must be a positive multiple of the page size")
    inode = GmemInode(vm.system, size, flags, vm.system.options.gmem_folio_order)
    inode.arch_invalidate = vm.arch.gmem_invalidate
    f = GmemFile(vm, inode)
    f.install()
    return f


def is_guest_memfd(obj: object) -> bool:
    return isinstance(obj, GmemFile)

