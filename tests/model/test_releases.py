"""The model's ``kernel`` release switch and the switches a host twin needs.

Each rule of guestmem/releases.py is checked on the model for every release it distinguishes, with
hostile input (a refused call changes nothing: no slot is left behind, invariants hold).
"""

from __future__ import annotations

import errno

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.errors import KvmError
from guestmem.model.options import ModelOptions
from guestmem.releases import NEWEST, RELEASES, release_for, release_of, rules

PS = u.PAGE_SIZE
GMEM = u.KVM_MEM_GUEST_MEMFD
WRAP_OFFSET = (1 << 63) - PS  # ALIGN_DOWN(INT64_MAX, PAGE_SIZE): test_invalid_binding's offset


def _errno(fn) -> int:  # type: ignore[no-untyped-def]
    try:
        fn()
    except KvmError as err:
        return err.errno or -1
    return 0


def test_default_is_the_newest_release() -> None:
    assert ModelOptions().kernel == NEWEST == RELEASES[-1]
    assert release_of(guestmem.open("model")) == NEWEST


@pytest.mark.parametrize("bad", ["6.9", "7", "", 7.2, None])
def test_unknown_release_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="kernel must be one of"):
        guestmem.open("model", kernel=bad)


def test_release_from_the_command_line() -> None:
    assert ModelOptions.parse_text("kernel", "6.18") == "6.18"
    with pytest.raises(ValueError):
        ModelOptions.parse_text("kernel", "6.17")


@pytest.mark.parametrize(("uname", "switch", "exact"), [
    ("6.8.0-31-generic", "6.8", True), ("6.12.5", "6.8", False), ("6.18.44-fc-v1045", "6.18", True),
    ("7.1.0", "6.18", False), ("7.2.0-rc3", "7.2", True), ("8.0.1", "7.2", False), ("5.15.0", "6.8", False),
])
def test_running_release_maps_to_a_switch(uname: str, switch: str, exact: bool) -> None:
    got, note = release_for(uname)
    assert got == switch and (note is None) == exact


@pytest.mark.parametrize("release", RELEASES)
def test_binding_whose_offset_plus_size_passes_int64_max(release: str) -> None:
    """test_invalid_binding: offset ALIGN_DOWN(INT64_MAX, PS), 4 pages.  The sum wraps as a signed
    loff_t through 6.18 (accepted); 7.2's unsigned offset keeps it huge (EINVAL)."""
    kvm = guestmem.open("model", kernel=release)
    with kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM) as vm, vm.create_guest_memfd(16 * PS, 0) as g:
        got = _errno(lambda: vm.set_user_memory_region2(1, GMEM, 1 << 32, 4 * PS, 0, g, WRAP_OFFSET))
        assert got == (0 if rules(release).bind_offset_signed else errno.EINVAL)
        vm.check_invariants()
        # An offset that is itself negative as a loff_t is refused by every release.
        assert _errno(lambda: vm.set_user_memory_region2(2, GMEM, 2 << 32, PS, 0, g, 1 << 63)) == errno.EINVAL
        vm.check_invariants()


@pytest.mark.parametrize(("release", "want"), [("6.8", errno.EINVAL), ("6.18", errno.EINVAL),
                                               ("7.2", errno.EEXIST)])
def test_second_binding_overlapping_only_in_the_file(release: str, want: int) -> None:
    kvm = guestmem.open("model", kernel=release)
    with kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM) as vm, vm.create_guest_memfd(16 * PS, 0) as g:
        vm.set_user_memory_region2(1, GMEM, 1 << 32, 8 * PS, 0, g, 0)
        assert _errno(lambda: vm.set_user_memory_region2(2, GMEM, 2 << 32, 8 * PS, 0, g, 7 * PS)) == want
        vm.check_invariants()
        # Nothing was left behind: the slot id is free, the file range past the overlap still is.
        vm.set_user_memory_region2(2, GMEM, 2 << 32, 8 * PS, 0, g, 8 * PS)
        vm.check_invariants()


def test_release_6_8_has_no_guest_memfd_flags_nor_default_vm_slots() -> None:
    kvm = guestmem.open("model", kernel="6.8")
    assert kvm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == 0
    assert kvm.check_extension(u.KVM_CAP_PRE_FAULT_MEMORY) == 0
    types_6_8 = (1 << u.KVM_X86_DEFAULT_VM) | (1 << u.KVM_X86_SW_PROTECTED_VM)
    assert kvm.check_extension(u.KVM_CAP_VM_TYPES) == types_6_8
    assert _errno(lambda: kvm.create_vm(u.KVM_X86_SNP_VM)) == errno.EINVAL
    with kvm.create_vm() as vm:
        assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD) == 0
        with vm.create_guest_memfd(PS, 0) as g:  # the ioctl exists; binding it does not
            assert _errno(lambda: vm.set_user_memory_region2(1, GMEM, 1 << 32, PS, 0, g, 0)) == errno.EINVAL
        assert _errno(lambda: vm.create_guest_memfd(PS, u.GUEST_MEMFD_FLAG_MMAP)) == errno.EINVAL
        vcpu = vm.create_vcpu(0)
        assert _errno(lambda: vcpu.pre_fault_memory(0, PS)) == errno.EINVAL
        vm.check_invariants()
    with kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM) as vm, vm.create_guest_memfd(PS, 0) as g:
        assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD) == 1
        vm.set_user_memory_region2(1, GMEM, 1 << 32, PS, 0, g, 0)


@pytest.mark.parametrize("release", ["6.18", "7.2"])
def test_later_releases_bind_guest_memfd_on_any_vm(release: str) -> None:
    kvm = guestmem.open("model", kernel=release)
    with kvm.create_vm() as vm, vm.create_guest_memfd(PS, u.GUEST_MEMFD_FLAG_MMAP) as g:
        assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD) == 1
        vm.set_user_memory_region2(1, GMEM, 1 << 32, PS, 0, g, 0)
        vm.check_invariants()


def test_without_memory_attributes() -> None:
    """CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES off: the cap is 0, the ioctl is ENOTTY (and changes
    nothing), and the VM types that need private memory do not exist."""
    kvm = guestmem.open("model", memory_attributes=False)
    assert kvm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert kvm.check_extension(u.KVM_CAP_VM_TYPES) == 1 << u.KVM_X86_DEFAULT_VM
    for t in (u.KVM_X86_SW_PROTECTED_VM, u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM):
        assert _errno(lambda t=t: kvm.create_vm(t)) == errno.EINVAL
    with kvm.create_vm() as vm:
        assert vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == 0
        assert _errno(lambda: vm.set_memory_attributes(0, PS, 0)) == errno.ENOTTY
        assert _errno(lambda: vm.set_memory_attributes(1, 0, 1 << 63, 7)) == errno.ENOTTY  # before any check
        vm.check_invariants()


def test_shadow_paging_pre_fault_answers_enospc_until_a_memslot_sized_the_mmu() -> None:
    """kvm_mmu_reload (mmu.c:5104) runs before the TDP check: with shadow paging and no memslot
    ever, there are no MMU pages (ENOSPC); once a slot was created (even if deleted) EOPNOTSUPP."""
    kvm = guestmem.open("model", tdp_mmu=False)
    assert kvm.check_extension(u.KVM_CAP_PRE_FAULT_MEMORY) == 0
    with kvm.create_vm() as vm, kvm.mmap_anonymous(PS) as m:
        vcpu = vm.create_vcpu(0)
        assert _errno(lambda: vcpu.pre_fault_memory(0, PS, 1)) == errno.EINVAL  # flags first
        assert _errno(lambda: vcpu.pre_fault_memory(1, PS)) == errno.EINVAL  # then alignment
        assert _errno(lambda: vcpu.pre_fault_memory(0, PS)) == errno.ENOSPC
        vm.set_user_memory_region(1, 0, 0, PS, m.addr)
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        assert _errno(lambda: vcpu.pre_fault_memory(0, PS)) == errno.EOPNOTSUPP
    with guestmem.open("model").create_vm() as vm:  # a TDP MMU: no slot there is ENOENT
        assert _errno(lambda: vm.create_vcpu(0).pre_fault_memory(0, PS)) == errno.ENOENT


def test_max_vcpu_id_cap_follows_max_vcpus() -> None:
    kvm = guestmem.open("model", max_vcpus=8)
    assert kvm.check_extension(128) == 32  # KVM_CAP_MAX_VCPU_ID
    with kvm.create_vm() as vm:
        vm.create_vcpu(31).close()
        assert _errno(lambda: vm.create_vcpu(32)) == errno.EINVAL
