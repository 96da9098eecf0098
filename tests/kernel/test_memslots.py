"""Memslots on the real kernel: KVM_SET_USER_MEMORY_REGION(2) and guest_memfd binding.

Mirrors upstream's ``set_memory_region_test.c`` (flags, private memory regions, overlaps) on the
VM types this host offers; each refusal asserts the kernel's errno.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

import guestmem.uapi as u
from guestmem.linux import KernelGuestMemfd, KernelKvm, KernelMapping, KernelVm

from .support import GIB4, MIB, PS, errno_of, require_cap, require_gmem_flags

GM = u.KVM_MEM_GUEST_MEMFD
S = 2 * MIB
SLOT = 10


@pytest.fixture
def gmem(vm: KernelVm) -> Iterator[KernelGuestMemfd]:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(4 * S, 0) as g:
        yield g


@pytest.fixture
def anon(kvm: KernelKvm) -> Iterator[KernelMapping]:
    with kvm.mmap_anonymous(4 * S) as m:
        yield m


def test_v1_valid_flags_and_unknown_bits(vm: KernelVm, anon: KernelMapping) -> None:
    valid = u.KVM_MEM_LOG_DIRTY_PAGES
    if vm.check_extension(u.KVM_CAP_READONLY_MEM):
        valid |= u.KVM_MEM_READONLY
    for bit in range(32):
        flag = 1 << bit
        call = lambda flag=flag: vm.set_user_memory_region(SLOT, flag, GIB4, S, anon.addr)  # noqa: E731
        if flag & valid:
            call()
            vm.set_user_memory_region(SLOT, 0, GIB4, 0, 0)
        else:  # GUEST_MEMFD (bit 2) is v2-only
            assert errno_of(call) == errno.EINVAL, bit


def test_v2_unknown_bits_einval(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    require_cap(vm, u.KVM_CAP_USER_MEMORY2)
    for bit in range(3, 32):
        assert errno_of(lambda bit=bit: vm.set_user_memory_region2(
            SLOT, GM | (1 << bit), GIB4, S, 0, gmem, 0)) == errno.EINVAL, bit


@pytest.mark.parametrize("extra", [u.KVM_MEM_LOG_DIRTY_PAGES, u.KVM_MEM_READONLY],
                         ids=["LOG_DIRTY", "READONLY"])
def test_guest_memfd_excludes_log_dirty_and_readonly(vm: KernelVm, gmem: KernelGuestMemfd,
                                                     extra: int) -> None:
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM | extra, GIB4, S, 0, gmem, 0)) == errno.EINVAL


def test_bind_and_delete(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, 0)  # userspace_addr 0 is accepted
    vm.set_user_memory_region2(SLOT, 0, GIB4, 0, 0)
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem.fd, 0)  # a raw fd works too


def test_not_a_guest_memfd_einval(kvm: KernelKvm, vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    with kvm.memfd_create(4 * S) as memfd:
        for fd in (kvm.fd, vm.fd, memfd.fd):
            call = lambda fd=fd: vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, fd, 0)  # noqa: E731
            assert errno_of(call) == errno.EINVAL


def test_guest_memfd_of_another_vm_einval(kvm: KernelKvm, vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    with kvm.create_vm() as other, other.create_guest_memfd(4 * S, 0) as foreign:
        assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, foreign, 0)) == errno.EINVAL


def test_closed_fd_ebadf(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, r, 0)) == errno.EBADF
    closed = vm.create_guest_memfd(S, 0)
    closed.close()
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, closed, 0)) == errno.EBADF
    # Earlier checks win: an unaligned size is EINVAL even with a closed fd.
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, S + 1, 0, r, 0)) == errno.EINVAL


def test_guest_memfd_offset_unaligned_einval(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    for offset in range(1, PS):
        assert errno_of(lambda offset=offset: vm.set_user_memory_region2(
            SLOT, GM, GIB4, S, 0, gmem, offset)) == errno.EINVAL, offset
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, PS)


@pytest.mark.parametrize(("size", "offset"), [(S, 4 * S), (2 * S, 3 * S), (S, (1 << 64) - PS)],
                         ids=["offset-at-end", "range-past-end", "offset-wraps"])
def test_guest_memfd_range_beyond_file_einval(vm: KernelVm, gmem: KernelGuestMemfd, size: int,
                                              offset: int) -> None:
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, size, 0, gmem, offset)) == errno.EINVAL


def test_unaligned_size_gpa_uaddr_einval(vm: KernelVm, gmem: KernelGuestMemfd, anon: KernelMapping) -> None:
    for args in ((GIB4, S + 1, 0), (GIB4 + 1, S, 0), (GIB4, S, anon.addr + 1)):
        gpa, size, uaddr = args
        assert errno_of(lambda gpa=gpa, size=size, uaddr=uaddr: vm.set_user_memory_region2(
            SLOT, GM, gpa, size, uaddr, gmem, 0)) == errno.EINVAL, args


def test_gpa_wrap_and_too_many_pages_einval(vm: KernelVm, gmem: KernelGuestMemfd,
                                            anon: KernelMapping) -> None:
    wrap = (1 << 64) - PS
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, wrap, S, 0, gmem, 0)) == errno.EINVAL
    assert errno_of(lambda: vm.set_user_memory_region(SLOT, 0, GIB4, 1 << 44, anon.addr)) == errno.EINVAL


def test_gpa_overlap_eexist_and_gmem_offset_overlap_einval(vm: KernelVm, gmem: KernelGuestMemfd,
                                                            anon: KernelMapping) -> None:
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, 0)
    # GPA overlap (disjoint file range): EEXIST; the GPA check runs before the binding.
    r2 = vm.set_user_memory_region2
    assert errno_of(lambda: r2(SLOT + 1, GM, GIB4 + 16 * PS, S, 0, gmem, S)) == errno.EEXIST
    assert errno_of(lambda: r2(SLOT + 1, GM, GIB4, S, 0, gmem, 0)) == errno.EEXIST
    r1 = vm.set_user_memory_region
    assert errno_of(lambda: r1(SLOT + 2, 0, GIB4 + S - PS, S, anon.addr)) == errno.EEXIST
    # File-range overlap at a disjoint GPA: EINVAL from the binding.
    for offset in (0, S // 2, S - PS):
        assert errno_of(lambda offset=offset: vm.set_user_memory_region2(
            SLOT + 1, GM, GIB4 + 16 * S, S, 0, gmem, offset)) == errno.EINVAL, offset
    vm.set_user_memory_region2(SLOT + 1, GM, GIB4 + 16 * S, S, 0, gmem, S)  # disjoint: fine


def test_upstream_overlapping_private_regions(vm: KernelVm) -> None:
    # set_memory_region_test.c: slot A [G, 2S) @0, slot B [2G, 2S) @2S, delete A, recreate it overlapping B.
    require_gmem_flags(vm)
    size = 2 * S
    g_a, g_b = GIB4, 2 * GIB4
    with vm.create_guest_memfd(2 * size, 0) as g:
        vm.set_user_memory_region2(SLOT, GM, g_a, size, 0, g, 0)
        vm.set_user_memory_region2(SLOT + 1, GM, g_b, size, 0, g, size)
        vm.set_user_memory_region2(SLOT, GM, g_a, 0, 0, g, 0)
        for gpa in (g_b - size // 2, g_b + size // 2):
            call = lambda gpa=gpa: vm.set_user_memory_region2(SLOT, GM, gpa, size, 0, g, 0)  # noqa: E731
            assert errno_of(call) == errno.EEXIST


def test_modify_guest_memfd_slot_einval(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, 0)
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, 0)) == errno.EINVAL
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4 + 8 * S, S, 0, gmem, 0)) == errno.EINVAL
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, 0, GIB4, S, 0)) == errno.EINVAL


def test_delete_absent_slot_einval(vm: KernelVm) -> None:
    assert errno_of(lambda: vm.set_user_memory_region(SLOT, 0, GIB4, 0, 0)) == errno.EINVAL
    assert errno_of(lambda: vm.set_user_memory_region2(SLOT, GM, GIB4, 0, 0, None, 0)) == errno.EINVAL


def test_rebind_after_delete(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, 0)
    vm.set_user_memory_region2(SLOT, 0, GIB4, 0, 0)
    vm.set_user_memory_region2(SLOT + 1, GM, GIB4 + 8 * S, S, 0, gmem, 0)


def test_slot_id_and_address_space_limits(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    nr = vm.check_extension(u.KVM_CAP_NR_MEMSLOTS)
    vm.set_user_memory_region2(nr - 1, GM, GIB4, S, 0, gmem, 0)
    assert errno_of(lambda: vm.set_user_memory_region2(nr, GM, GIB4 + 8 * S, S, 0, gmem, S)) == errno.EINVAL
    spaces = max(vm.check_extension(u.KVM_CAP_MULTI_ADDRESS_SPACE), 1)
    assert errno_of(lambda: vm.set_user_memory_region2((spaces << 16) | 20, GM, GIB4 + 16 * S, S, 0, gmem,
                                                       2 * S)) == errno.EINVAL


def test_guest_memfd_without_mmap_flag_binds(vm: KernelVm, gmem: KernelGuestMemfd) -> None:
    assert gmem.flags == 0
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, gmem, 0)


def test_guest_memfd_still_bound_after_vm_fd_closed(kvm: KernelKvm) -> None:
    vm = kvm.create_vm()
    require_gmem_flags(vm)
    g = vm.create_guest_memfd(S, 0)
    vm.set_user_memory_region2(SLOT, GM, GIB4, S, 0, g, 0)
    vm.close()
    g.allocate(0, S)
    g.punch_hole(0, S)
    g.close()


def test_set_memory_attributes_follows_cap(vm: KernelVm) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES: a well-formed no-op succeeds where the cap exists; without the cap
    the kernel has no such ioctl (ENOTTY)."""
    if vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES):
        vm.set_memory_attributes(0, PS, 0)
        assert errno_of(lambda: vm.set_memory_attributes(0, PS, 0, 1)) == errno.EINVAL
    else:
        for args in ((0, PS, 0, 0), (0, PS, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0), (1, 1, 0, 1)):
            assert errno_of(lambda args=args: vm.set_memory_attributes(*args)) == errno.ENOTTY


def test_enable_cap_exit_hypercall(vm: KernelVm) -> None:
    mask = require_cap(vm, u.KVM_CAP_EXIT_HYPERCALL)
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 0, (mask,))
    invalid = (~mask) & ((1 << 64) - 1)
    assert errno_of(lambda: vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 0, (invalid & -invalid,))) == errno.EINVAL
    assert errno_of(lambda: vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1, (mask,))) == errno.EINVAL
    assert errno_of(lambda: vm.enable_cap(0x7FFF_0000, 0, ())) == errno.EINVAL
