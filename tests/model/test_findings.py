"""docs/findings.md, executable: the model reproduces upstream's behaviour under its defaults, the
invariant checker flags it, and the model switch for the fix removes it."""

from __future__ import annotations

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.guest import Program, Write
from guestmem.model.kvm.invariants import InvariantError

PS = u.PAGE_SIZE
GPA = 1 << 32


def _tdx_gmem_only_punch(close: bool, **options: object):
    kvm = guestmem.open("model", **options)
    vm = kvm.create_vm(u.KVM_X86_TDX_VM)
    g = vm.create_guest_memfd(16 * PS, u.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, GPA, 16 * PS, 0, g, 0)
    vm.launch_finalize()
    vcpu = vm.create_vcpu(0)
    assert vcpu.pre_fault_memory(GPA, 16 * PS) == 0
    if close:
        g.close()
    else:
        g.punch_hole(0, 16 * PS)
    victim = kvm.mmap_anonymous(16 * PS)
    victim.fill(0, 16 * PS, 0x11)
    return kvm, vm, vcpu, victim


@pytest.mark.parametrize("close", [False, True], ids=["punch", "close"])
def test_finding1_upstream_leaves_shared_sptes_on_freed_pages(close: bool) -> None:
    """Finding 1 as upstream 7.2 has it: the guest's shared write lands in the victim's page."""
    kvm, vm, vcpu, victim = _tdx_gmem_only_punch(close)
    with pytest.raises(InvariantError, match="invariant 1"):
        vm.check_invariants()
    vcpu.load(Program([Write(GPA, 16 * PS, 0xEE, "shared")]))
    vcpu.run()
    assert victim.read(0, 1) == b"\xee"


@pytest.mark.parametrize("close", [False, True], ids=["punch", "close"])
def test_finding1_fix_switch_zaps_shared_sptes(close: bool) -> None:
    kvm, vm, vcpu, victim = _tdx_gmem_only_punch(close, gmem_invalidate_shared_fix=True)
    vm.check_invariants()
    vcpu.load(Program([Write(GPA, 16 * PS, 0xEE, "shared")]))
    vcpu.run()
    assert victim.read(0, 16 * PS) == b"\x11" * 16 * PS
    vm.check_invariants()


def test_finding1_other_vm_types_are_not_affected() -> None:
    """SW_PROTECTED has no mirror root: the PRIVATE filter zaps the direct root, so nothing stale."""
    kvm = guestmem.open("model")
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    g = vm.create_guest_memfd(16 * PS, u.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, GPA, 16 * PS, 0, g, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.pre_fault_memory(GPA, 16 * PS)
    g.punch_hole(0, 16 * PS)
    vm.check_invariants()
