"""Extra (no single upstream selftest): KVM_SET_MEMORY_ATTRIBUTES on the VM fd, the per-VM
attribute store the private-memory selftests build on -- ``kvm_vm_ioctl_set_mem_attributes`` in
virt/kvm/kvm_main.c, spec section 2.7.

Kernels built without per-VM memory attributes (e.g. this 6.18 host) answer ENOTTY to the ioctl;
those tests ask the backend first and skip, naming the answer.  Which attributes a VM supports is
``KVM_CAP_MEMORY_ATTRIBUTES``: PRIVATE on a VM with private memory, 0 otherwise.
"""

from __future__ import annotations

import errno

import pytest

import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitMemoryFault, Kvm, Vm
from guestmem.errors import KvmError
from guestmem.guest.ops import Program, Verify

from .support import (
    MEM_REGION_GPA,
    MEM_REGION_SIZE,
    MEM_REGION_SLOT,
    PAGE,
    check,
    raises_errno,
    require_cap,
    require_vm_type,
)

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def require_attributes_ioctl(vm: Vm) -> None:
    """Skip if the host has no KVM_SET_MEMORY_ATTRIBUTES at all (ENOTTY); a no-op call tells."""
    try:
        vm.set_memory_attributes(MEM_REGION_GPA, PAGE, 0)
    except KvmError as exc:
        if exc.errno == errno.ENOTTY:
            pytest.skip("host lacks KVM_SET_MEMORY_ATTRIBUTES (ENOTTY)")
        raise


@pytest.mark.parametrize(("vm_type", "expected"), [
    pytest.param(u.KVM_X86_DEFAULT_VM, 0, id="DEFAULT"),
    pytest.param(u.KVM_X86_SW_PROTECTED_VM, PRIVATE, id="SW_PROTECTED"),
])
def test_memory_attributes_cap(backend: Kvm, vm_type: int, expected: int) -> None:
    """KVM_CAP_MEMORY_ATTRIBUTES: PRIVATE only on VMs with private memory.  Where the host has no
    attribute support at all the answer is 0, which also matches a DEFAULT VM."""
    with require_vm_type(backend, vm_type) as vm:
        value = vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES)
        if vm_type != u.KVM_X86_DEFAULT_VM and value == 0:
            pytest.skip("host lacks KVM_CAP_MEMORY_ATTRIBUTES")
        assert value == expected


@pytest.mark.parametrize("vm_type", [
    pytest.param(u.KVM_X86_DEFAULT_VM, id="DEFAULT"),
    pytest.param(u.KVM_X86_SW_PROTECTED_VM, id="SW_PROTECTED"),
])
def test_set_memory_attributes_invalid(backend: Kvm, vm_type: int) -> None:
    """flags != 0, an attribute the VM does not support, size 0, a range that wraps, an unaligned
    address or size: all EINVAL."""
    G = MEM_REGION_GPA
    with require_vm_type(backend, vm_type) as vm:
        require_attributes_ioctl(vm)
        supported = vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES)
        cases = [
            (G, PAGE, 0, 1),
            (G, PAGE, supported, 1 << 63),
            (G, PAGE, 1 << 0, 0),
            (G, PAGE, 1 << 4, 0),
            (G, PAGE, 1 << 63, 0),
            (G, 0, 0, 0),
            (G, 0, supported, 0),
            ((1 << 64) - PAGE, 2 * PAGE, supported, 0),
            (G + 1, PAGE, supported, 0),
            (G, PAGE + 1, supported, 0),
            (G, 1, supported, 0),
        ]
        if not supported & PRIVATE:
            cases.append((G, PAGE, PRIVATE, 0))
        for address, size, attributes, flags in cases:
            with raises_errno(errno.EINVAL):
                vm.set_memory_attributes(address, size, attributes, flags)
            check(vm)


def test_refused_or_unslotted_attributes(backend: Kvm) -> None:
    """A refused KVM_SET_MEMORY_ATTRIBUTES changes nothing (the guest still reads the shared page);
    attributes set where no memslot exists are stored all the same, and apply once a slot appears
    there (a private access to a slot without guest_memfd: memory-fault exit)."""
    G = MEM_REGION_GPA
    with require_vm_type(backend, u.KVM_X86_SW_PROTECTED_VM) as vm:
        require_cap(vm, u.KVM_CAP_MEMORY_ATTRIBUTES, PRIVATE)
        backing = backend.mmap_anonymous(MEM_REGION_SIZE)
        backing.fill(0, MEM_REGION_SIZE, 0x5A)
        vm.set_user_memory_region2(MEM_REGION_SLOT, 0, G, MEM_REGION_SIZE, backing.addr)
        check(vm)
        for address, size, flags in [(G, PAGE, 1), (G + 1, PAGE, 0), (G, PAGE + 1, 0)]:
            with raises_errno(errno.EINVAL):
                vm.set_memory_attributes(address, size, PRIVATE, flags)
            check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([Verify(G, MEM_REGION_SIZE, 0x5A)]))
        ex = vcpu.run()
        assert isinstance(ex, ExitHalt), f"expected the guest to halt, got {ex!r}"

        # No slot at 2G yet: the attribute is stored anyway.
        other = 2 * G
        vm.set_memory_attributes(other, PAGE, PRIVATE)
        vm.set_memory_attributes(other, PAGE, PRIVATE)  # same attributes again: a no-op, fine
        check(vm)
        vm.set_user_memory_region2(MEM_REGION_SLOT + 1, 0, other, MEM_REGION_SIZE, backing.addr)
        check(vm)
        vcpu.load(Program([Verify(other + PAGE, 8, 0x5A), Verify(other, 8, 0x5A)]))
        ex = vcpu.run()
        check(vm)
        assert isinstance(ex, ExitMemoryFault), f"expected KVM_EXIT_MEMORY_FAULT, got {ex!r}"
        assert (ex.gpa, ex.size, ex.flags, ex.errno) == (other, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE,
                                                          errno.EFAULT)
        vcpu.close()
        backing.close()
