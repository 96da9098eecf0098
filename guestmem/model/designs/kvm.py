"""KVM's half of v7, v8 and v9: the private memslot, its notifier, and shared/private tracking.

All three postings extend the *existing* memslot instead of adding a new object: with
``KVM_MEM_PRIVATE`` the ``kvm_userspace_memory_region_ext`` names the private memory as
``private_fd``/``private_offset`` (v9: ``restricted_fd``/``restricted_offset``) *beside* the
``userspace_addr`` that keeps serving shared memory.  The fd is one userspace made; KVM takes a
reference and registers a notifier on it — how it recognises the file and how that notifier is
called is what the versions differ in:

=====  ========================================  ==============================================
 ver    file KVM accepts                          invalidation KVM receives
=====  ========================================  ==============================================
 v7     any memfile backing store (shmem);        ``invalidate(start, end)`` per folio, before
        EOPNOTSUPP otherwise                      the folio is truncated
 v8     the inaccessible shim (EINVAL otherwise)  ``invalidate(start, end)`` once per fallocate,
                                                  *after* it (pages already freed)
 v9     ``file_is_restrictedmem`` (EINVAL)        ``invalidate_start``/``invalidate_end`` around
                                                  every fallocate (the reply: per folio + order)
=====  ========================================  ==============================================

Shared/private is KVM's in all three (v7 moved it out of the backing store): the SEV ioctls
``KVM_MEMORY_ENCRYPT_REG_REGION`` / ``UNREG_REGION`` over a guest physical range store "private" /
"shared" in KVM's per-VM attribute map and zap the range — every time, changed or not.  The model
keeps that map where the per-VM attributes live (``vm.attributes``) and reuses the core's
attribute update, so hugepage MIXED tracking (added in v8, patch 6) holds for all three.

The memslot's ``gmem_file`` is a :class:`PrivateMemslot`, which presents the protocol the core
fault path and invariant checks use (``get_pfn_range``, ``released``, ``inode.cache``, ``unbind``).
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.directmap import released_folio
from guestmem.model.designs.files import BackedFile, resolve_fd
from guestmem.model.designs.inaccessible import (
    InaccessibleFile,
    inaccessible_register_notifier,
    inaccessible_unregister_notifier,
)
from guestmem.model.designs.memfile import memfile_register_notifier, memfile_unregister_notifier
from guestmem.model.designs.restricted import (
    file_is_restrictedmem,
    restrictedmem_register_notifier,
    restrictedmem_unregister_notifier,
)
from guestmem.model.kvm import mmu as mmu_mod
from guestmem.model.kvm.attributes import apply_vm_attributes
from guestmem.model.kvm.memslot import Memslot
from guestmem.model.mm.pagecache import PageCache

if TYPE_CHECKING:
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
U64 = 1 << 64
OP_REGION = "KVM_SET_USER_MEMORY_REGION"


class _InodeView:
    """What the invariant checks read through ``slot.gmem_file.inode``: the file's page cache."""

    def __init__(self, cache: PageCache) -> None:
        self.cache = cache


class PrivateMemslot:
    """The private half of one v7/v8/v9 memslot, as KVM holds it (``slot.gmem_file``).

    It is also the notifier KVM registered on the file: each ``invalidate*`` call zaps the gfns
    the invalidated indices map to in this slot, inside the MMU's invalidation protocol, and (on
    SEV-SNP) gives the frames still present back to the host's RMP.
    """

    kind = "private-memslot"

    def __init__(self, front: HistoricalKvm, slot: Memslot, file: BackedFile) -> None:
        self.front = front
        self.vm = front.vm
        self.slot = slot
        self.file = file
        self.inode = _InodeView(file.cache)
        self.released = False
        self.backing_store: object = None  # v7: the memfile backing store registration returned

    # --- the fault path (kvm_*_get_pfn over a run of gfns) ---------------------------------------
    def get_pfn_range(self, slot: Memslot, gfn: int, end_gfn: int, zero: bool = True
                      ) -> tuple[list[tuple[int, int, int, int]], int]:
        if self.released or slot.gmem_file is not self:
            return [], errno.EFAULT
        i0, i1 = slot.gfn_to_index(gfn), slot.gfn_to_index(end_gfn)
        order = self.file.folio_order
        if order:  # a large folio is handed out whole, so that it can be mapped huge
            mask = (1 << order) - 1
            i0 = max(i0 & ~mask, slot.gmem_pgoff)
            i1 = min((i1 + mask) & ~mask, slot.gmem_pgoff + slot.npages)
        try:
            runs = self.file.pages(i0, i1, zero=zero)
        except KvmError as e:
            return [], e.errno or errno.ENOMEM
        skew = slot.gmem_pgoff - slot.base_gfn
        out = [(slot.index_to_gfn(s), slot.index_to_gfn(e), pfn, o if skew % (1 << o) == 0 else 0)
               for s, e, pfn, o in runs]
        self.vm.arch.gmem_prepare(self, slot, out)  # type: ignore[arg-type]
        return out, 0

    def unbind(self, slot: Memslot) -> None:
        """The memslot is gone (``kvm_free_memslot``): unregister, drop the file reference."""
        if slot.gmem_file is not self:
            return
        self.front.unregister(self)
        slot.gmem_file = None
        self.released = True
        self.file.put_file()

    # --- notifier ops -------------------------------------------------------------------------------
    def _gfns(self, start: int, end: int) -> tuple[int, int] | None:
        slot, pg = self.slot, self.slot.gmem_pgoff
        s, e = max(start, pg), min(end, pg + self.slot.npages)
        if s >= e:
            return None
        return slot.base_gfn + s - pg, slot.base_gfn + e - pg

    def _stale_pages(self, g0: int, g1: int) -> int:
        """Private SPTE pages in [g0, g1) whose frame the file no longer holds at that index."""
        slot, n = self.slot, 0
        for s, e, sp in self.vm.mmu.present(slot.as_id, g0, g1):
            if sp is None or not sp.private:
                continue
            i = slot.gfn_to_index(s)
            for a, b, pfn, _ in self.file.cache.lookup_range(i, i + (e - s)):
                if pfn is None or pfn != slot.index_to_gfn(a) + sp.delta:
                    n += b - a
        return n

    def _invalidate(self, start: int, end: int, order: int | None, *, close: bool = True) -> None:
        gfns = self._gfns(start, end)
        if gfns is None:
            return
        vm, stats = self.vm, self.vm.system.stats
        stats["invalidations"] += 1
        stats["stale_pages"] += self._stale_pages(*gfns)
        with vm.mmu_lock():
            vm.mmu.invalidate_begin()
            vm.mmu.unmap_gfn_range(self.slot, *gfns)
            if close:
                vm.mmu.invalidate_end()
        # SEV-SNP: the frames still in the file leave the guest (RMP reclaim).  The order is known
        # only when the notifier passed one.
        pg = self.slot.gmem_pgoff
        for s, e, pfn, _ in self.file.cache.lookup_range(max(start, pg), min(end, pg + self.slot.npages)):
            if pfn is not None:
                with released_folio(vm.system, order):
                    vm.arch.gmem_invalidate(pfn, e - s)

    def invalidate(self, start: int, end: int) -> None:
        """v7 ``memfile_notifier_ops.invalidate`` / v8 ``inaccessible_notifier_ops.invalidate``."""
        self._invalidate(start, end, None)

    def invalidate_start(self, start: int, end: int) -> None:
        """v9: zap and hold faults off until :meth:`invalidate_end`."""
        self._invalidate(start, end, None, close=False)

    def invalidate_end(self, start: int, end: int) -> None:
        if self._gfns(start, end) is not None:
            with self.vm.mmu_lock():
                self.vm.mmu.invalidate_end()

    def invalidate_folio(self, index: int, order: int) -> None:
        """The reply's op: one whole folio of ``order`` at ``index`` is about to be freed."""
        self._invalidate(index, index + (1 << order), order)

    def __repr__(self) -> str:
        return f"PrivateMemslot({self.front.design}, slot={self.slot.id}, file={self.file!r})"


class HistoricalKvm(ABC):
    """The memslot and region ioctls of one historical design, on a model VM."""

    design = ""

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm
        self.system = vm.system

    # --- per-design file handling ---------------------------------------------------------------
    @abstractmethod
    def check_file(self, file: object) -> BackedFile:
        """Refuse a file this version's KVM does not take (before any reference is taken)."""

    @abstractmethod
    def register(self, binding: PrivateMemslot) -> None:
        """Register ``binding`` as the file's notifier (may refuse the file)."""

    @abstractmethod
    def unregister(self, binding: PrivateMemslot) -> None:
        """Undo :meth:`register`."""

    # --- KVM_SET_USER_MEMORY_REGION with kvm_userspace_memory_region_ext ------------------------
    def _set_region(self, slot_arg: int, flags: int, gpa: int, size: int, hva: int, fd: Any,
                    offset: int) -> None:
        vm = self.vm
        if not flags & hu.KVM_MEM_PRIVATE:
            vm.set_user_memory_region(slot_arg, flags, gpa, size, hva)  # an ordinary memslot
            return
        with vm.slots_lock():
            valid = u.KVM_MEM_LOG_DIRTY_PAGES
            if not vm.arch.has_protected_state:
                valid |= u.KVM_MEM_READONLY
            if vm.has_private_mem:  # kvm_arch_private_mem_supported
                valid |= hu.KVM_MEM_PRIVATE
            if flags & ~valid:
                raise KvmError(errno.EINVAL, OP_REGION, f"invalid memslot flags {flags:#x}")
            as_id, sid = vm.check_region_geometry(OP_REGION, slot_arg, gpa, size, hva, offset,
                                                  "private offset")
            slots = vm.memslots[as_id]
            old = slots.get(sid)
            if size == 0:
                if old is None:
                    raise KvmError(errno.EINVAL, OP_REGION, "deleting a memslot that does not exist")
                vm.set_user_memory_region(slot_arg, 0, gpa, 0, hva)  # delete: unbind via the core
                return
            npages = size // PS
            if npages > u.KVM_MEM_MAX_NR_PAGES:
                raise KvmError(errno.EINVAL, OP_REGION, "memslot too large")
            if old is not None:
                raise KvmError(errno.EINVAL, OP_REGION, "private memslots are immutable (delete, re-create)")
            base_gfn = gpa // PS
            if slots.overlaps(sid, base_gfn, base_gfn + npages):
                raise KvmError(errno.EEXIST, OP_REGION, "memslot overlaps another")
            obj = resolve_fd(self.system, fd)
            if obj is None:
                raise KvmError(errno.EINVAL, OP_REGION, "private fd is not open (fget failed)")
            file = self.check_file(obj)
            new = Memslot(as_id, sid, base_gfn, npages, flags, hva)
            new.gmem_pgoff = offset // PS
            binding = PrivateMemslot(self, new, file)
            file.get_file()
            try:
                self.register(binding)
            except KvmError:
                file.put_file()
                raise
            try:
                self._check_max_gfn(base_gfn, npages)
            except KvmError:
                self.unregister(binding)
                file.put_file()
                raise
            new.gmem_file = binding  # type: ignore[assignment]
            mmu_mod.init_memslot_lpage(vm, new)
            with vm.mmu_lock():
                slots.insert(new)

    def _check_max_gfn(self, base_gfn: int, npages: int) -> None:
        opts = self.system.options
        bits = opts.phys_bits if opts.tdp_mmu else 52
        last = base_gfn + npages - 1
        if last > (1 << (bits - u.PAGE_SHIFT)) - 1:
            raise KvmError(errno.EINVAL, OP_REGION, f"memslot beyond the {bits}-bit guest physical space")
        alias = self.vm.arch.gfn_alias_bit
        if alias and last >= alias:
            raise KvmError(errno.EINVAL, OP_REGION, "memslot reaches the shared-GPA alias")

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, private_fd: Any = -1, private_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``; with ``KVM_MEM_PRIVATE`` the ``_ext`` layout is read."""
        self._set_region(slot, flags, guest_phys_addr, memory_size, userspace_addr, private_fd,
                         private_offset)

    # --- KVM_MEMORY_ENCRYPT_{UN,}REG_REGION: shared/private lives in KVM ---------------------------
    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        """Mark guest physical [addr, addr+size) private (and zap it)."""
        self._set_private(addr, size, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, "KVM_MEMORY_ENCRYPT_REG_REGION")

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """Mark guest physical [addr, addr+size) shared (and zap it)."""
        self._set_private(addr, size, 0, "KVM_MEMORY_ENCRYPT_UNREG_REGION")

    def _set_private(self, addr: int, size: int, attrs: int, op: str) -> None:
        vm = self.vm
        if self.system.options.gmem_attributes or not vm.has_private_mem:
            raise KvmError(errno.ENOTTY, op, "not a VM with private memory tracked by KVM")
        if size == 0 or addr + size >= U64 or addr < 0:
            raise KvmError(errno.EINVAL, op, "size is 0 or the range wraps")
        if addr % PS or size % PS:
            raise KvmError(errno.EINVAL, op, "address and size must be page aligned")
        start, end = addr // PS, (addr + size) // PS
        with vm.slots_lock():
            changed = not vm.attributes.all_equal(start, end, attrs)
            # Store and zap unconditionally, as kvm_vm_ioctl_set_encrypted_region did.
            apply_vm_attributes(vm, start, end, attrs)
        if changed:
            self.system.stats["conversions"] += 1


class MemfileKvm(HistoricalKvm):
    """v7: ``private_fd`` must be a memfile backing-store file; registration sets its flags."""

    design = hu.DESIGN_V7

    def check_file(self, file: object) -> BackedFile:
        if not isinstance(file, BackedFile):
            # memfile_register_notifier finds no backing store that knows the file.
            raise KvmError(errno.EOPNOTSUPP, OP_REGION, "private fd is not a memfile backing-store file")
        return file

    def register(self, binding: PrivateMemslot) -> None:
        binding.backing_store = memfile_register_notifier(binding.file, hu.KVM_MEMFILE_FLAGS, binding)

    def unregister(self, binding: PrivateMemslot) -> None:
        memfile_unregister_notifier(binding.file, binding)  # type: ignore[arg-type]


class InaccessibleKvm(HistoricalKvm):
    """v8: ``private_fd`` must be an inaccessible memfd (the s_magic check review asked for)."""

    design = hu.DESIGN_V8

    def check_file(self, file: object) -> BackedFile:
        if not isinstance(file, InaccessibleFile):
            # As posted, v8 took any fd and oopsed on a plain memfd; the fix checks s_magic.
            raise KvmError(errno.EINVAL, OP_REGION, "private fd is not an MFD_INACCESSIBLE memfd")
        return file

    def register(self, binding: PrivateMemslot) -> None:
        inaccessible_register_notifier(binding.file, binding)  # type: ignore[arg-type]

    def unregister(self, binding: PrivateMemslot) -> None:
        inaccessible_unregister_notifier(binding.file, binding)  # type: ignore[arg-type]


class RestrictedKvm(HistoricalKvm):
    """v9: ``restricted_fd`` must be a ``memfd_restricted`` file."""

    design = hu.DESIGN_V9

    def check_file(self, file: object) -> BackedFile:
        if not file_is_restrictedmem(file):
            raise KvmError(errno.EINVAL, OP_REGION, "restricted_fd is not a memfd_restricted file")
        return file  # type: ignore[return-value]

    def register(self, binding: PrivateMemslot) -> None:
        restrictedmem_register_notifier(binding.file, binding)  # type: ignore[arg-type]

    def unregister(self, binding: PrivateMemslot) -> None:
        restrictedmem_unregister_notifier(binding.file, binding)  # type: ignore[arg-type]

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, restricted_fd: Any = -1, restricted_offset: int = 0,
                               ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` with v9's ``restricted_fd``/``restricted_offset``."""
        self._set_region(slot, flags, guest_phys_addr, memory_size, userspace_addr, restricted_fd,
                         restricted_offset)


FRONTS: dict[str, type[HistoricalKvm]] = {c.design: c for c in (MemfileKvm, InaccessibleKvm, RestrictedKvm)}


def attach(vm: ModelVm, design: str) -> HistoricalKvm:
    """The ioctls of ``design`` ("memfile_notifier", "inaccessible_memfd" or "restrictedmem") on ``vm``."""
    try:
        return FRONTS[design](vm)
    except KeyError:
        raise ValueError(f"unknown historical design {design!r}; choose one of {', '.join(FRONTS)}") from None
