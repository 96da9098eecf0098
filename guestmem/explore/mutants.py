"""The museum of mutants: bugs planted in the model for the explorer to find, each a real class of
bug from upstream's history or from the seeds' own designs.

A mutant is an explore-only patch: a context manager that swaps one model function for a broken
copy and restores it on exit.  Nothing here is a model option, and the model never imports this
module; ``guestmem explore --mutant NAME`` applies it around each schedule.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from guestmem import uapi as u
from guestmem.model.kvm import attributes as attributes_mod
from guestmem.model.kvm import inplace as inplace_mod
from guestmem.model.kvm import mmu as mmu_mod
from guestmem.model.kvm.guest_memfd import GmemFile
from guestmem.model.kvm.memslot import Memslot
from guestmem.model.kvm.vm import ModelVm
from guestmem.model.mm.pagecache import PageCache
from guestmem.model.process import HostFault

PS = u.PAGE_SIZE


@dataclass(frozen=True)
class Mutant:
    name: str
    summary: str
    origin: str  # the upstream commit, thread or seed the bug class comes from
    race: str  # the race (id) that witnesses it
    patch: Callable[[], Any]  # -> a context manager


@contextmanager
def _swap(owner: object, attr: str, new: object) -> Iterator[None]:
    old = getattr(owner, attr)
    setattr(owner, attr, new)
    try:
        yield
    finally:
        setattr(owner, attr, old)


# --- the broken copies ------------------------------------------------------------------------------

def _retry_never(self: mmu_mod.Mmu, seq: int, start: int, end: int) -> bool:
    return False


def _apply_end_before_store(vm: ModelVm, start: int, end: int, attributes: int) -> None:
    targets = attributes_mod._intersecting_slots(vm, start, end)
    mmu = vm.mmu
    if not targets:
        vm.attributes.set(start, end, attributes)
        return
    flt = mmu_mod.FILTER_SHARED if attributes & u.KVM_MEMORY_ATTRIBUTE_PRIVATE else mmu_mod.FILTER_PRIVATE
    with vm.mmu_lock():
        mmu.invalidate_begin()
        for slot, s, e in targets:
            mmu.range_add(s, e)
            mmu_mod.pre_set_attributes_range_add(vm, slot, s, e)
            mmu.unmap_gfn_range(slot, s, e, flt)
        mmu.invalidate_end()  # BUG: the invalidation ends before the new attributes are stored
    with vm.mmu_lock():
        vm.attributes.set(start, end, attributes)
        for slot, s, e in targets:
            mmu_mod.post_set_attributes(vm, slot, s, e, attributes)


def _apply_without_zap(vm: ModelVm, start: int, end: int, attributes: int) -> None:
    targets = attributes_mod._intersecting_slots(vm, start, end)
    mmu = vm.mmu
    with vm.mmu_lock():
        mmu.invalidate_begin()
        for _slot, s, e in targets:
            mmu.range_add(s, e)  # BUG: no unmap of the old kind's SPTEs
        vm.attributes.set(start, end, attributes)
        for slot, s, e in targets:
            mmu_mod.post_set_attributes(vm, slot, s, e, attributes)
        mmu.invalidate_end()


_real_first_elevated = PageCache.first_elevated


def _first_elevated_unless_converting(self: PageCache, start: int, end: int) -> int | None:
    if sys._getframe(1).f_code is inplace_mod.set_memory_attributes2.__code__:
        return None  # BUG: the conversion skips the refcount (pin) check
    return _real_first_elevated(self, start, end)


def _punch_free_first(self: GmemFile, offset: int, length: int) -> None:
    inode = self.inode
    start, end = offset // PS, (offset + length) // PS
    with inode.invalidate_lock.write():
        # BUG (v8's inaccessible_fallocate order): the pages go first, the invalidation after.
        self.system.process.invalidate_file_range(self, start, end, lambda: inode.remove_pages(start, end))
        inode.invalidate_begin(start, end)
        inode.invalidate_end(start, end)
    self.system.stats["punches"] += 1


def _release_keeps_file(self: GmemFile) -> None:
    vm, inode = self.vm, self.inode
    with vm.slots_lock(), inode.invalidate_lock.write():
        # BUG: the bound memslots keep pointing at this file.
        self.invalidate_begin(0, 1 << 51, inode.filter_for(0, inode.npages))
        self.invalidate_end(0, 1 << 51)
        inode.files.remove(self)
        self.released = True
    if not inode.files:
        inode.free()
    vm.put()


def _release_lock_inversion(self: GmemFile) -> None:
    vm, inode = self.vm, self.inode
    with inode.invalidate_lock.write(), vm.slots_lock():  # BUG: against slots_lock -> invalidate_lock
        for _, _, slot in list(self.bindings.items()):
            if slot is not None:
                slot.gmem_file = None
        self.invalidate_begin(0, 1 << 51, inode.filter_for(0, inode.npages))
        self.invalidate_end(0, 1 << 51)
        inode.files.remove(self)
        self.released = True
    self.bindings.clear()
    if not inode.files:
        inode.free()
    vm.put()


def _lpage_ignores_mixed(self: Memslot, gfn: int, order: int) -> bool:
    if not self.contains_hugepage(gfn, order):
        return False
    return not (self.base_gfn ^ (self.userspace_addr >> u.PAGE_SHIFT)) & ((1 << order) - 1)


def _no_split(inode: object, start: int, end: int) -> None:
    return None  # BUG: a conversion through a 2 MiB folio leaves it whole


def _delete_no_wait(self: ModelVm, slot: Memslot) -> None:
    with self.mmu_lock():
        # BUG: no invalidation around the deletion, so a fault in flight does not retry.
        self.mmu.zap(slot.as_id, slot.base_gfn, slot.end_gfn)
        self.memslots[slot.as_id].remove(slot)
    if slot.gmem_file is not None:
        slot.gmem_file.unbind(slot)


def _host_fault_no_private_check(self: GmemFile, start: int, end: int, write: bool
                                 ) -> list[tuple[int, int, int]]:
    inode = self.inode
    with inode.invalidate_lock.read():
        stop = min(end, inode.npages)  # BUG: private pages are not refused (no SIGBUS)
        if stop <= start:
            raise HostFault(start, "SIGBUS")
        return [(s, e, pfn) for s, e, pfn, _ in inode.get_folios(start, stop, zero=True)]


def _memfail_no_zap(self: GmemFile, offset: int) -> None:
    inode = self.inode
    index = offset // PS
    fol = inode.cache.folio(index)
    if fol is None:
        raise OSError(errno.EINVAL, "no page")
    with inode.invalidate_lock.read():
        inode.hwpoison.set(fol[0], fol[0] + (1 << fol[2]), True)  # BUG: no invalidation, no zap


# --- the museum -------------------------------------------------------------------------------------

MUTANTS: list[Mutant] = [
    Mutant("no-seq-recheck", "the fault path never rechecks mmu_invalidate_seq/in_progress",
           "mmu_invalidate_retry_gfn() in is_page_fault_stale() (arch/x86/kvm/mmu/mmu.c:4807-4834); "
           "the seq/retry protocol of the MMU-notifier work (e930bffe95e1, 2008), extended to "
           "attribute changes by seed 003 (v14 18/34)",
           "fault-vs-attr:sw", lambda: _swap(mmu_mod.Mmu, "retry", _retry_never)),
    Mutant("end-before-store", "KVM_SET_MEMORY_ATTRIBUTES ends the invalidation before storing",
           "kvm_vm_set_mem_attributes() (virt/kvm/kvm_main.c:2559-2617): pre_set_range (begin+zap), "
           "the xa_store loop, then post_set_range (end); seed 003",
           "fault-vs-attr:sw", lambda: _swap(attributes_mod, "apply_vm_attributes", _apply_end_before_store)),
    Mutant("no-zap-on-attr-change", "an attribute change that zaps no SPTEs",
           "kvm_arch_pre_set_memory_attributes() (arch/x86/kvm/mmu/mmu.c:8138) unmaps the old kind; "
           "seed 003: 'zap on attribute change'",
           "fault-vs-attr:sw", lambda: _swap(attributes_mod, "apply_vm_attributes", _apply_without_zap)),
    Mutant("inplace-no-refcount", "in-place conversion to private without the refcount (pin) check",
           "seed 004 (RFC v5 22/53: EAGAIN on elevated refcounts; 15/53 'Handle lru_add fbatch "
           "refcounts during conversion safety check')",
           "convert-vs-pin:sw-gmem",
           lambda: _swap(PageCache, "first_elevated", _first_elevated_unless_converting)),
    Mutant("punch-free-before-invalidate", "hole punch frees the pages, then invalidates",
           "seed 002 (v8 01/8 inaccessible_fallocate: memfd fallocate, then "
           "inaccessible_notifier_invalidate); fixed in v9 (seed 000: invalidate_start, fallocate, "
           "invalidate_end) and kvm_gmem_punch_hole() (virt/kvm/guest_memfd.c:234-252)",
           "fault-vs-punch:sw", lambda: _swap(GmemFile, "_punch_hole", _punch_free_first)),
    Mutant("release-keeps-file", "guest_memfd release leaves the memslots' file pointer set",
           "kvm_gmem_release() WRITE_ONCE(slot->gmem.file, NULL) under slots_lock "
           "(virt/kvm/guest_memfd.c:327-352), so kvm_gmem_get_file() returns NULL after release",
           "fault-vs-close:sw", lambda: _swap(GmemFile, "_release", _release_keeps_file)),
    Mutant("release-lock-inversion", "release takes filemap_invalidate_lock before slots_lock",
           "kvm_gmem_release() takes slots_lock first (virt/kvm/guest_memfd.c:338-347); lock order "
           "slots_lock -> filemap_invalidate_lock -> mmu_lock (upstream-spec I8)",
           "fault-vs-close:sw", lambda: _swap(GmemFile, "_release", _release_lock_inversion)),
    Mutant("hugepage-mixed", "a hugepage may map over mixed private/shared attributes",
           "KVM_LPAGE_MIXED_FLAG and hugepage_has_attrs() (arch/x86/kvm/mmu/mmu.c:751, 8201); seed 003: "
           "'no hugepage over mixed attributes'",
           "hugepage-vs-fault:sw", lambda: _swap(Memslot, "lpage_allowed", _lpage_ignores_mixed)),
    Mutant("no-split-on-convert", "in-place conversion through a 2 MiB folio does not split it",
           "the hugepage (1G/2M guest_memfd) series' split on conversion, which seed 004's in-place "
           "design prepares for: a folio must be uniform in attributes",
           "hugepage-vs-fault:sw-gmem", lambda: _swap(inplace_mod, "_split_edges", _no_split)),
    Mutant("delete-no-wait", "memslot deletion does not wait for faults in flight",
           "kvm_swap_active_memslots(): synchronize_srcu_expedited() (virt/kvm/kvm_main.c:1600-1634) "
           "waits out faults that still see the old slot; the model's form is the invalidation seq",
           "run-vs-slot-delete:sw", lambda: _swap(ModelVm, "_delete_slot", _delete_no_wait)),
    Mutant("host-fault-no-private-check", "a host mmap fault on a private page is served (no SIGBUS)",
           "in-place series kvm_gmem_fault_user_mapping(): private -> EACCES -> SIGBUS "
           "(upstream-spec 2.3, seed 004)",
           "convert-vs-host-access:sw-gmem",
           lambda: _swap(GmemFile, "host_fault", _host_fault_no_private_check)),
    Mutant("memfail-no-zap", "memory failure marks the page poisoned without zapping its SPTEs",
           "kvm_gmem_error_folio() (virt/kvm/guest_memfd.c:503-525) invalidates the folio's range",
           "memfail-vs-fault:sw", lambda: _swap(GmemFile, "memory_failure", _memfail_no_zap)),
]
BY_NAME: dict[str, Mutant] = {m.name: m for m in MUTANTS}


@contextmanager
def applied(name: str | None) -> Iterator[None]:
    """Apply mutant ``name`` (None: the model as it is) for the duration of the block."""
    if name is None:
        yield
        return
    with BY_NAME[name].patch():
        yield
