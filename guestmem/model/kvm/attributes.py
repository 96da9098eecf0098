"""Per-VM memory attributes: ``KVM_SET_MEMORY_ATTRIBUTES`` (kvm_main.c + the x86 arch hooks).

The attribute of every gfn lives in the VM's RangeMap (default 0 = shared), covering gfns with no
memslot too.  An update that changes nothing returns early without invalidating; otherwise the
memslots intersecting the range go through one invalidation: begin, the range added, the x86
head/tail hugepage rule, SPTEs zapped, the attributes stored, MIXED tracking recomputed, end.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guestmem import native, ranges, sync
from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.kvm import mmu as mmu_mod

if TYPE_CHECKING:
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.vm import ModelVm

OP = "KVM_SET_MEMORY_ATTRIBUTES"
PS = u.PAGE_SIZE

#: The compiled one-page path (guestmem/model/_fastconv.c), or None: ``ModelVm.set_memory_attributes``
#: offers it every call; it runs only the common case (one page, nothing mapped at the gfn, no
#: explorer, no lock held, RangeMaps that keep their layout) and answers NotImplemented, having
#: changed nothing, for everything else -- the Python path below is the reference.
#: :func:`configure_fast` (called once ModelVm exists) tells it the types it may handle.
FAST = native.load("model._fastconv")


def configure_fast(vm_type: type, shmem_type: type, pagecache_type: type) -> None:
    """Give the compiled one-page paths the classes whose objects they may read and edit: a map of
    any other class, a notifier that is not a model VM, a file that is not shmem is refused.  If
    the classes are not what the compiled code was written for (RangeMap's slots changed), it is
    switched off here, and the Python paths do everything."""
    global FAST
    if FAST is None:
        return
    try:
        FAST.configure(ranges.RangeMap, getattr(ranges, "_NativeRangeMap", None), ranges, sync,
                       sync._held, vm_type, shmem_type, pagecache_type)
    except (TypeError, AttributeError):
        from guestmem.model import process

        FAST = process._FAST = None


def set_vm_memory_attributes(vm: ModelVm, address: int, size: int, attributes: int, flags: int) -> None:
    if vm.system.options.gmem_attributes:
        raise KvmError(errno.ENOTTY, OP, "per-VM attributes are disabled (in-place conversion mode)")
    if not vm.system.options.memory_attributes:
        # kvm_vm_ioctl's case KVM_SET_MEMORY_ATTRIBUTES is under #ifdef
        # CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES (virt/kvm/kvm_main.c); without it, no such ioctl.
        raise KvmError(errno.ENOTTY, OP, "built without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES")
    if flags:
        raise KvmError(errno.EINVAL, OP, "flags must be 0")
    if attributes & ~vm.supported_mem_attributes():
        raise KvmError(errno.EINVAL, OP, f"unsupported attributes {attributes:#x}")
    if size == 0 or address + size >= 1 << 64:
        raise KvmError(errno.EINVAL, OP, "size is 0 or the range wraps")
    if address % PS or size % PS:
        raise KvmError(errno.EINVAL, OP, "address and size must be page aligned")
    start, end = address // PS, (address + size) // PS
    with vm.slots_lock():
        if (vm.attributes.get(start) == attributes if end == start + 1
                else vm.attributes.all_equal(start, end, attributes)):
            return
        apply_vm_attributes(vm, start, end, attributes)
    vm.system.stats["conversions"] += 1


def _intersecting_slots(vm: ModelVm, start: int, end: int) -> list[tuple[Memslot, int, int]]:
    out = []
    if end == start + 1:  # one gfn: one lookup per address space
        for ms in vm.memslots:
            slot = ms.lookup(start)
            if slot is not None:
                out.append((slot, start, end))
        return out
    for ms in vm.memslots:
        for s, e, slot in ms.in_range(start, end):
            if slot is not None:
                out.append((slot, s, e))
    return out


def apply_vm_attributes(vm: ModelVm, start: int, end: int, attributes: int) -> None:
    """``kvm_vm_set_mem_attributes`` after validation, under slots_lock."""
    targets = _intersecting_slots(vm, start, end)
    mmu = vm.mmu
    if not targets:
        vm.attributes.set(start, end, attributes)
        return
    # Zap the SPTEs of the old kind (the filter matters only for mirrored roots).
    flt = mmu_mod.FILTER_SHARED if attributes & u.KVM_MEMORY_ATTRIBUTE_PRIVATE else mmu_mod.FILTER_PRIVATE
    with vm.mmu_lock():
        mmu.invalidate_begin()
        flush = False
        for slot, s, e in targets:
            mmu.range_add(s, e)
            mmu_mod.pre_set_attributes_range_add(vm, slot, s, e)
            flush |= mmu.unmap_gfn_range(slot, s, e, flt)
        vm.attributes.set(start, end, attributes)
        for slot, s, e in targets:
            mmu_mod.post_set_attributes(vm, slot, s, e, attributes)
        mmu.invalidate_end()
