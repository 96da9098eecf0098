"""Memory failure on guest_memfd (kvm_gmem_error_folio): zap, don't truncate; EHWPOISON later."""

from __future__ import annotations

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitMemoryFault
from guestmem.errors import EHWPOISON, GuestAccessFault
from guestmem.guest.ops import Program, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32


@pytest.mark.parametrize("private", [False, True])
def test_poisoned_page_faults_with_ehwpoison(private: bool) -> None:
    kvm = guestmem.open("model")
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM if private else u.KVM_X86_DEFAULT_VM)
    flags = u.GUEST_MEMFD_FLAG_MMAP | (0 if private else u.GUEST_MEMFD_FLAG_INIT_SHARED)
    gmem = vm.create_guest_memfd(4 * PS, flags)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 4 * PS, 0, gmem, 0)
    if private:
        vm.set_memory_attributes(GPA, 4 * PS, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, 4 * PS, 0x21)]))
    assert isinstance(vcpu.run(), ExitHalt)
    frames = kvm.pool.allocated
    gmem.memory_failure(2 * PS)
    vm.check_invariants()
    assert kvm.pool.allocated == frames  # not truncated
    assert vm.mmu.count()["4K"] == 3  # but no longer mapped
    vcpu.load(Program([Verify(GPA, 4 * PS, 0x21)]))
    ex = vcpu.run()
    assert isinstance(ex, ExitMemoryFault) and ex.errno == EHWPOISON
    assert ex.gpa == GPA + 2 * PS and ex.private == private
    if not private:
        host = gmem.mmap()
        assert host.read(0, 2 * PS) == bytes([0x21]) * 2 * PS
        with pytest.raises(GuestAccessFault):
            host.read(2 * PS, 1)
    gmem.punch_hole(2 * PS, PS)  # userspace's decision: drop the page; it comes back clean
    vcpu.load(Program([Verify(GPA + 2 * PS, PS, 0), Verify(GPA + 3 * PS, PS, 0x21)]))
    assert isinstance(vcpu.run(), ExitHalt)
    vm.check_invariants()


def test_poison_before_the_fault_in_a_large_folio_does_not_livelock() -> None:
    """With 2 MiB folios a fault widens its lookup to the folio; a poisoned page *before* the
    faulting one must not cut the lookup short of it (the fuzzer found KVM_RUN spinning)."""
    import guestmem
    import guestmem.uapi as u
    from guestmem.api import ExitHalt
    from guestmem.guest import Program, Verify

    kvm = guestmem.open("model", gmem_folio_order=9)
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    g = vm.create_guest_memfd(10 * 4096, u.GUEST_MEMFD_FLAG_MMAP)
    shared = kvm.mmap_anonymous(1 << 22)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0x100200000, 10 * 4096, shared.addr, g, 0)
    g.allocate(0x3000, 0x7000)
    g.memory_failure(0x5000)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Verify(0x100207000, 0xC6, 0, "auto")]))
    assert isinstance(vcpu.run(), ExitHalt)
    vm.check_invariants()


def test_poison_on_the_faulting_page_in_a_large_folio_is_ehwpoison() -> None:
    """The widened lookup must not serve the folio's head and call that progress when the faulting
    page itself is poisoned: the guest gets the EHWPOISON memory fault (the fuzzer found a spin)."""
    import guestmem
    import guestmem.uapi as u
    from guestmem.api import ExitMemoryFault
    from guestmem.errors import EHWPOISON
    from guestmem.guest import Program, Write

    kvm = guestmem.open("model", attributes="gmem", gmem_folio_order=9)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    g = vm.create_guest_memfd(5 * 4096, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region2(3, u.KVM_MEM_GUEST_MEMFD, 0xC0000000, 5 * 4096, 0, g, 0)
    g.allocate(0, 5 * 4096)
    g.memory_failure(0x1000)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(0xC0001000, 0x2000, 0x33, "shared")]))
    ex = vcpu.run()
    assert isinstance(ex, ExitMemoryFault) and ex.errno == EHWPOISON and ex.gpa == 0xC0001000
    vm.check_invariants()
