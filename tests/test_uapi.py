"""The ABI numbers and layouts guestmem uses, held against upstream's values."""

import ctypes

import guestmem.uapi as u


def test_struct_sizes_match_upstream():
    assert ctypes.sizeof(u.kvm_userspace_memory_region2) == 160
    assert ctypes.sizeof(u.kvm_create_guest_memfd) == 64
    assert ctypes.sizeof(u.kvm_memory_attributes) == 32
    assert ctypes.sizeof(u.kvm_memory_attributes2) == 128
    assert ctypes.sizeof(u.kvm_pre_fault_memory) == 64
    assert ctypes.sizeof(u.kvm_run) == 2352


def test_ioctl_numbers():
    assert u.KVM_CREATE_VM == 0xAE01
    assert u.KVM_CHECK_EXTENSION == 0xAE03
    assert u.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert u.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert u.KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2
    assert u.KVM_CREATE_GUEST_MEMFD == 0xC040AED4
    assert u.KVM_PRE_FAULT_MEMORY == 0xC040AED5
    assert u.KVM_SET_MEMORY_ATTRIBUTES2 == 0xC080AED2


def test_memory_fault_exit_layout():
    assert u.kvm_run.u.offset == 32
    mf = u._kvm_run_memory_fault
    assert (mf.flags.offset, mf.gpa.offset, mf.size.offset) == (0, 8, 16)
    assert u.KVM_EXIT_MEMORY_FAULT == 39 and u.KVM_MEMORY_EXIT_FLAG_PRIVATE == 8
