"""Port of upstream ``tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c`` (per-VM memory
attributes, i.e. without in-place conversion), plus one extra case from the fault-path table
(spec section 3: a private access whose guest_memfd has been closed).

Upstream's guest reads ``EXITS_TEST_GPA`` in an endless loop while the host deletes the slot from
another thread, which makes the moment of deletion racy.  The guest programs here read, ``Sync``
to the host, and read again, so the host changes the memslot at a known point and the expected
exit is deterministic.  The exit is the same: ``KVM_RUN`` fails with EFAULT and
``KVM_EXIT_MEMORY_FAULT {flags = PRIVATE, gpa = EXITS_TEST_GPA, size = PAGE_SIZE}``.

These need a KVM_X86_SW_PROTECTED_VM and KVM_SET_MEMORY_ATTRIBUTES(PRIVATE); hosts without them
skip, naming what they lack.
"""

from __future__ import annotations

import errno

import guestmem.uapi as u
from guestmem.api import Exit, ExitHalt, ExitMemoryFault, ExitSync, GuestMemfd, Kvm, Mapping, Vcpu, Vm
from guestmem.guest.ops import Program, Sync, Verify

from .support import PAGE, check, require_cap, require_vm_type

EXITS_TEST_GPA = 0xC0000000
EXITS_TEST_NPAGES = 1
EXITS_TEST_SIZE = EXITS_TEST_NPAGES * PAGE
EXITS_TEST_SLOT = 10

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def protected_vm(kvm: Kvm) -> Vm:
    vm = require_vm_type(kvm, u.KVM_X86_SW_PROTECTED_VM)
    require_cap(vm, u.KVM_CAP_MEMORY_ATTRIBUTES, PRIVATE)
    return vm


def run_checked(vm: Vm, vcpu: Vcpu) -> Exit:
    ex = vcpu.run()
    check(vm)
    return ex


def assert_private_memory_fault(ex: Exit) -> None:
    assert isinstance(ex, ExitMemoryFault), f"expected KVM_EXIT_MEMORY_FAULT, got {ex!r}"
    assert ex.errno == errno.EFAULT
    assert ex.flags == u.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert ex.private
    assert ex.gpa == EXITS_TEST_GPA
    assert ex.size == EXITS_TEST_SIZE


def read_sync_read() -> Program:
    """Read the test page (private, so zero on first use), hand over to the host, read it again."""
    return Program([Verify(EXITS_TEST_GPA, 8, 0), Sync(1), Verify(EXITS_TEST_GPA, 8, 0)])


def add_gmem_slot(vm: Vm, backing: Mapping) -> GuestMemfd:
    """upstream vm_userspace_mem_region_add(..., KVM_MEM_GUEST_MEMFD): a fresh guest_memfd plus
    anonymous memory for the shared side.  The caller keeps the guest_memfd open: the binding does
    not hold a reference, closing the file would unbind it."""
    gmem = vm.create_guest_memfd(EXITS_TEST_SIZE, 0)
    vm.set_user_memory_region2(EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, EXITS_TEST_SIZE,
                               backing.addr, guest_memfd=gmem, guest_memfd_offset=0)
    check(vm)
    return gmem


def test_private_access_memslot_deleted(backend: Kvm) -> None:
    """A private read after the slot is deleted: memory-fault exit (PRIVATE, gpa, PAGE_SIZE), not MMIO.

    Extra: a VMM that re-creates the slot and re-runs gets the read through.
    """
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        gmem = add_gmem_slot(vm, backing)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)  # access the page privately
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(read_sync_read())
        assert isinstance(run_checked(vm, vcpu), ExitSync)

        vm.set_user_memory_region2(EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, 0, 0,
                                   guest_memfd=-1)
        check(vm)
        assert_private_memory_fault(run_checked(vm, vcpu))
        # Still no slot: the same exit again.
        assert_private_memory_fault(run_checked(vm, vcpu))

        gmem.close()
        gmem = add_gmem_slot(vm, backing)
        ex = run_checked(vm, vcpu)
        assert isinstance(ex, ExitHalt), f"expected the guest to halt, got {ex!r}"
        vcpu.close()
        gmem.close()


def test_private_access_memslot_not_private(backend: Kvm) -> None:
    """A private access to a slot without KVM_MEM_GUEST_MEMFD: memory-fault exit (PRIVATE, gpa,
    PAGE_SIZE).  Extra: converting the page back to shared lets the read through (zeros from the
    anonymous backing)."""
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        vm.set_user_memory_region2(EXITS_TEST_SLOT, 0, EXITS_TEST_GPA, EXITS_TEST_SIZE, backing.addr)
        check(vm)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([Verify(EXITS_TEST_GPA, 8, 0)]))
        assert_private_memory_fault(run_checked(vm, vcpu))

        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, 0)
        check(vm)
        assert isinstance(run_checked(vm, vcpu), ExitHalt)
        vcpu.close()


def test_private_access_guest_memfd_closed(backend: Kvm) -> None:
    """Extra (spec 2.5/3): closing the last reference to the guest_memfd unbinds it from the slot
    (zapping its mappings) but leaves the slot in place; a private access then gets the same
    memory-fault exit with EFAULT."""
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        gmem = add_gmem_slot(vm, backing)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(read_sync_read())
        assert isinstance(run_checked(vm, vcpu), ExitSync)  # the page is mapped now

        gmem.close()
        check(vm)
        assert_private_memory_fault(run_checked(vm, vcpu))

        # The slot is still there: deleting it succeeds (deleting an absent slot is EINVAL).
        vm.set_user_memory_region2(EXITS_TEST_SLOT, 0, EXITS_TEST_GPA, 0, 0)
        check(vm)
        vcpu.close()
