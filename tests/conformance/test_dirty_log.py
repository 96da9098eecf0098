"""``KVM_MEM_LOG_DIRTY_PAGES`` and ``KVM_GET_DIRTY_LOG`` on both backends (issue 11 §1b).

What KVM logs is what the guest writes: a page's bit is set by its first guest write after the
last ``KVM_GET_DIRTY_LOG``, which returns the bitmap, clears it and re-arms write protection.
Reads and host (userspace) writes log nothing.  Upstream's ``check_memory_region_flags`` refuses
the flag on a guest_memfd slot ("Dirty logging private memory is not currently supported").
"""

from __future__ import annotations

import errno

import guestmem.uapi as u
from guestmem import mman
from guestmem.api import Kvm, Vcpu, Vm
from guestmem.guest.ops import Op, Verify, Write

from .support import MEM_REGION_GPA, PAGE, GuestScript, check, drive, raises_errno, require_vm_type

SLOT = 10
NPAGES = 100  # not a multiple of 64: the bitmap rounds up to whole longs
LOG = u.KVM_MEM_LOG_DIRTY_PAGES


def _bits(bitmap: bytes) -> list[int]:
    value = int.from_bytes(bitmap, "little")
    return [i for i in range(value.bit_length()) if value >> i & 1]


def _guest(vm: Vm, vcpu: Vcpu, *ops: Op) -> None:
    drive(vm, vcpu, GuestScript()(*ops))


def _writes(*pages: int) -> list[Op]:
    return [Write(MEM_REGION_GPA + p * PAGE + 8, 16, 0x5A) for p in pages]


def test_dirty_log_reports_guest_writes_once(backend: Kvm) -> None:
    vm = require_vm_type(backend, u.KVM_X86_DEFAULT_VM)
    mem = backend.mmap(NPAGES * PAGE, mman.PROT_READ | mman.PROT_WRITE,
                       mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    vm.set_user_memory_region(SLOT, LOG, MEM_REGION_GPA, NPAGES * PAGE, mem.addr)
    vcpu = vm.create_vcpu(0)
    log = vm.get_dirty_log(SLOT)
    assert len(log) == 16 and _bits(log) == []

    _guest(vm, vcpu, *_writes(1, 3, 64, 99))
    assert _bits(vm.get_dirty_log(SLOT)) == [1, 3, 64, 99]
    assert _bits(vm.get_dirty_log(SLOT)) == []  # cleared by the previous call

    _guest(vm, vcpu, Verify(MEM_REGION_GPA + 2 * PAGE, PAGE, 0), *_writes(3))  # 2 read, 3 written
    mem.write(5 * PAGE, b"host write")  # userspace writes are not logged
    assert _bits(vm.get_dirty_log(SLOT)) == [3]
    assert mem.read(3 * PAGE + 8, 16) == b"\x5a" * 16
    check(vm)
    vcpu.close()
    vm.close()
    mem.close()


def test_dirty_log_flag_toggled_on_a_live_slot(backend: Kvm) -> None:
    """FLAGS_ONLY: logging starts clean (earlier writes are not reported) and stops with ENOENT."""
    vm = require_vm_type(backend, u.KVM_X86_DEFAULT_VM)
    mem = backend.mmap(NPAGES * PAGE, mman.PROT_READ | mman.PROT_WRITE,
                       mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    vm.set_user_memory_region(SLOT, 0, MEM_REGION_GPA, NPAGES * PAGE, mem.addr)
    vcpu = vm.create_vcpu(0)
    with raises_errno(errno.ENOENT):
        vm.get_dirty_log(SLOT)
    _guest(vm, vcpu, *_writes(0, 2))
    vm.set_user_memory_region(SLOT, LOG, MEM_REGION_GPA, NPAGES * PAGE, mem.addr)
    assert _bits(vm.get_dirty_log(SLOT)) == []
    _guest(vm, vcpu, *_writes(2, 7))  # page 2 was mapped writable before logging began
    assert _bits(vm.get_dirty_log(SLOT)) == [2, 7]
    vm.set_user_memory_region(SLOT, 0, MEM_REGION_GPA, NPAGES * PAGE, mem.addr)
    with raises_errno(errno.ENOENT):
        vm.get_dirty_log(SLOT)
    _guest(vm, vcpu, *_writes(7))  # still runs fine without logging
    check(vm)
    vcpu.close()
    vm.close()
    mem.close()


def test_dirty_log_hostile(backend: Kvm) -> None:
    """EINVAL for an address space or slot id out of range, ENOENT for no slot; a guest_memfd
    slot with the flag is EINVAL and creates nothing; wrong types are TypeError."""
    vm = require_vm_type(backend, u.KVM_X86_DEFAULT_VM)
    nr_as = max(1, vm.check_extension(u.KVM_CAP_MULTI_ADDRESS_SPACE))
    with raises_errno(errno.ENOENT):
        vm.get_dirty_log(SLOT)
    with raises_errno(errno.EINVAL):
        vm.get_dirty_log(u.KVM_USER_MEM_SLOTS)
    with raises_errno(errno.EINVAL):
        vm.get_dirty_log(nr_as << 16)
    with raises_errno(errno.EINVAL):
        vm.get_dirty_log(0xFFFF_FFFF)
    try:
        vm.get_dirty_log("0")  # type: ignore[arg-type]
    except TypeError:
        pass
    else:
        raise AssertionError("a str slot must be a TypeError")
    if vm.check_extension(u.KVM_CAP_GUEST_MEMFD):
        gmem = vm.create_guest_memfd(PAGE * 4, 0)
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD | LOG, MEM_REGION_GPA, PAGE * 4, 0,
                                       guest_memfd=gmem)
        with raises_errno(errno.ENOENT):
            vm.get_dirty_log(SLOT)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, MEM_REGION_GPA, PAGE * 4, 0,
                                   guest_memfd=gmem)  # the slot id is still free
        with raises_errno(errno.ENOENT):
            vm.get_dirty_log(SLOT)
        gmem.close()
    check(vm)
    vm.close()
    with raises_errno(errno.EBADF):
        vm.get_dirty_log(SLOT)
