"""Dirty-page logging: ``KVM_MEM_LOG_DIRTY_PAGES`` and ``KVM_GET_DIRTY_LOG`` (virt/kvm/kvm_main.c).

A memslot created with, or changed to, ``KVM_MEM_LOG_DIRTY_PAGES`` gets a dirty bitmap, one bit
per page.  While logging, the slot is mapped at 4 KiB only and its SPTEs start write-protected:
the first guest write to a page takes a write fault, which sets the page's bit and makes that
SPTE writable.  ``KVM_GET_DIRTY_LOG`` (``kvm_get_dirty_log_protect``, x86 without manual protect)
returns the bitmap, clears it and write-protects the pages it reported, so the next write to
them is seen again.  Host (userspace) writes through the mapping are not logged: KVM logs what
the guest (and KVM itself) writes.  A guest_memfd slot cannot log (EINVAL at creation).

The bitmap is a ``RangeMap[bool]``: a huge slot with few dirty pages costs what its runs cost.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.vm import ModelVm


def logging(slot: Memslot) -> bool:
    return slot.dirty_bitmap is not None


def slot_flags_set(vm: ModelVm, slot: Memslot, old_flags: int) -> None:
    """After a memslot is created, moved, or its flags change: give it a bitmap when logging
    starts (dropping every SPTE, so the slot is re-faulted at 4 KiB and write-protected) and
    drop the bitmap when logging stops.  A moved slot starts a new, clean bitmap."""
    on = bool(slot.flags & u.KVM_MEM_LOG_DIRTY_PAGES)
    was = bool(old_flags & u.KVM_MEM_LOG_DIRTY_PAGES)
    if not on:
        slot.dirty_bitmap = None
        return
    slot.dirty_bitmap = RangeMap(False)
    if was:
        return
    with vm.mmu_lock():
        vm.mmu.invalidate_begin()
        vm.mmu.range_add(slot.base_gfn, slot.end_gfn)
        vm.mmu.zap(slot.as_id, slot.base_gfn, slot.end_gfn)
        vm.mmu.invalidate_end()


def mark_dirty(slot: Memslot, start: int, end: int) -> None:
    """``mark_page_dirty_in_slot`` for gfns [start, end) of ``slot``."""
    if slot.dirty_bitmap is not None:
        slot.dirty_bitmap.set(start - slot.base_gfn, end - slot.base_gfn, True)


def bitmap_bytes(npages: int) -> int:
    """``kvm_dirty_bitmap_bytes``: whole longs."""
    return -(-npages // 64) * 8


def get_dirty_log(vm: ModelVm, slot_arg: int) -> bytes:
    """``kvm_vm_ioctl_get_dirty_log``: EINVAL for an address space or slot id out of range,
    ENOENT for no slot or a slot that does not log; else the bitmap (little-endian longs, bit
    ``i`` = page ``i`` of the slot), cleared and write-protected behind it."""
    as_id, sid = slot_arg >> 16, slot_arg & 0xFFFF
    if as_id >= len(vm.memslots) or sid >= u.KVM_USER_MEM_SLOTS:
        raise KvmError(errno.EINVAL, "KVM_GET_DIRTY_LOG", f"slot {slot_arg:#x} out of range")
    slot = vm.memslots[as_id].get(sid)
    if slot is None or slot.dirty_bitmap is None:
        raise KvmError(errno.ENOENT, "KVM_GET_DIRTY_LOG", f"slot {slot_arg:#x} does not log dirty pages")
    bits = 0
    with vm.mmu_lock():
        runs = [(s, e) for s, e, v in slot.dirty_bitmap.segments(0, slot.npages) if v]
        slot.dirty_bitmap.set(0, slot.npages, False)
        sptes = vm.mmu.sptes[slot.as_id]
        for s, e in runs:
            bits |= ((1 << (e - s)) - 1) << s
            for a, b, sp in list(sptes.segments(slot.base_gfn + s, slot.base_gfn + e)):
                if sp is not None and sp.writable:
                    sptes.set(a, b, replace(sp, writable=False))
    return bits.to_bytes(bitmap_bytes(slot.npages), "little")


def check(vm: ModelVm) -> str | None:
    """Invariant 8: in a logging slot no SPTE is larger than 4 KiB and every writable SPTE maps a
    page whose dirty bit is set (else a guest write could go unlogged).  Returns the violation."""
    for ms in vm.memslots:
        for slot in ms:
            bitmap = slot.dirty_bitmap
            if bitmap is None:
                continue
            for s, e, sp in vm.mmu.sptes[slot.as_id].segments(slot.base_gfn, slot.end_gfn):
                if sp is None:
                    continue
                if sp.order:
                    return f"a {1 << sp.order}-page SPTE at gfn {s:#x} in dirty-logging slot {slot.id}"
                if sp.writable and bitmap.any_match(s - slot.base_gfn, e - slot.base_gfn, lambda v: not v):
                    return f"writable SPTEs [{s:#x},{e:#x}) of slot {slot.id} over pages not logged dirty"
    return None
