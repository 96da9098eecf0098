"""Extra (no single upstream selftest): the KVM_HC_MAP_GPA_RANGE hypercall plumbing that
private_mem_conversions_test relies on, from ``arch/x86/kvm/x86.c`` (``__kvm_emulate_hypercall``,
``complete_hypercall_exit``, KVM_CAP_EXIT_HYPERCALL) -- spec section 2.10.

KVM itself converts nothing: it validates the arguments, exits to userspace with
KVM_EXIT_HYPERCALL {nr = 12, args = (gpa, npages, attrs)}, and returns ``run->hypercall.ret`` to the
guest in RAX.  None of this needs private memory, so it runs on DEFAULT VMs (and on the kernel
backend wherever the host offers KVM_CAP_EXIT_HYPERCALL for MAP_GPA_RANGE and the hypercall
instruction actually completes -- see ``support.require_map_gpa_range_exit``).
"""

from __future__ import annotations

import errno

import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitHypercall, Kvm, Vm
from guestmem.guest.ops import MapGpaRange, Program

from .support import (
    GMEM_GPA,
    PAGE,
    check,
    raises_errno,
    require_cap,
    require_map_gpa_range_exit,
    require_vm_type,
)

MAP_GPA_RANGE_BIT = 1 << u.KVM_HC_MAP_GPA_RANGE
ENCRYPTED = u.KVM_MAP_GPA_RANGE_ENCRYPTED


def hypercall_vm(kvm: Kvm, *, needs_guest: bool = True) -> Vm:
    if needs_guest:
        require_map_gpa_range_exit(kvm)
    vm = require_vm_type(kvm, u.KVM_X86_DEFAULT_VM)
    require_cap(vm, u.KVM_CAP_EXIT_HYPERCALL, MAP_GPA_RANGE_BIT)
    return vm


def test_exit_hypercall_cap_rejects_unknown_hypercalls(backend: Kvm) -> None:
    """KVM_ENABLE_CAP(EXIT_HYPERCALL) with a bit outside the valid mask is EINVAL; the valid mask
    (MAP_GPA_RANGE) is accepted."""
    with hypercall_vm(backend, needs_guest=False) as vm:
        valid = vm.check_extension(u.KVM_CAP_EXIT_HYPERCALL)
        for bit in (0, 1, 11, 13, 63):
            if valid & (1 << bit):
                continue
            with raises_errno(errno.EINVAL):
                vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << bit,))
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(MAP_GPA_RANGE_BIT,))
        check(vm)


def test_map_gpa_range_not_enabled_is_enosys(backend: Kvm) -> None:
    """Without the user exit enabled, the guest gets -KVM_ENOSYS and the host sees no exit."""
    with hypercall_vm(backend) as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([MapGpaRange(GMEM_GPA, 1, ENCRYPTED, expect_ret=-u.KVM_ENOSYS)]))
        ex = vcpu.run()
        check(vm)
        assert isinstance(ex, ExitHalt), f"expected the guest to halt, got {ex!r}"
        vcpu.close()


def test_map_gpa_range_invalid_args_are_einval(backend: Kvm) -> None:
    """An unaligned gpa, npages == 0, or a gfn range that wraps return -KVM_EINVAL to the guest
    without exiting to the host."""
    with hypercall_vm(backend) as vm:
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(MAP_GPA_RANGE_BIT,))
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([
            MapGpaRange(GMEM_GPA + 1, 1, 0, expect_ret=-u.KVM_EINVAL),
            MapGpaRange(GMEM_GPA + 8, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED, expect_ret=-u.KVM_EINVAL),
            MapGpaRange(GMEM_GPA, 0, 0, expect_ret=-u.KVM_EINVAL),
            # gfn + npages wraps to 0
            MapGpaRange(GMEM_GPA, (1 << 64) - (GMEM_GPA >> 12), 0, expect_ret=-u.KVM_EINVAL),
        ]))
        ex = vcpu.run()
        check(vm)
        assert isinstance(ex, ExitHalt), f"expected the guest to halt, got {ex!r}"
        vcpu.close()


def test_map_gpa_range_exits_to_userspace(backend: Kvm) -> None:
    """With the exit enabled, each call exits with nr 12 and the guest's (gpa, npages, attrs),
    in long mode; whatever the host puts in ``ret`` is what the guest gets back."""
    with hypercall_vm(backend) as vm:
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(MAP_GPA_RANGE_BIT,))
        check(vm)
        calls = [
            (GMEM_GPA, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED, 0),
            (GMEM_GPA + PAGE, 512, u.KVM_MAP_GPA_RANGE_DECRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M, 0),
            (0, 3, u.KVM_MAP_GPA_RANGE_ENCRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_1G, -u.KVM_EINVAL),
            (GMEM_GPA, 2, 0x300, -u.KVM_EFAULT),  # attrs are passed through unchecked
        ]
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([MapGpaRange(gpa, npages, attrs, expect_ret=ret)
                           for gpa, npages, attrs, ret in calls]))
        for gpa, npages, attrs, ret in calls:
            ex = vcpu.run()
            check(vm)
            assert isinstance(ex, ExitHypercall), f"expected KVM_EXIT_HYPERCALL, got {ex!r}"
            assert ex.nr == u.KVM_HC_MAP_GPA_RANGE
            assert (ex.gpa, ex.npages, ex.attrs) == (gpa, npages, attrs)
            assert tuple(ex.args[:3]) == (gpa, npages, attrs)
            assert ex.to_private == bool(attrs & u.KVM_MAP_GPA_RANGE_ENCRYPTED)
            assert ex.longmode
            ex.ret = ret
        ex = vcpu.run()
        check(vm)
        assert isinstance(ex, ExitHalt), f"expected the guest to halt, got {ex!r}"
        vcpu.close()
