"""/dev/kvm itself: API version, capabilities, VM types, host memory helpers, lifetimes."""

from __future__ import annotations

import errno
import gc
import os

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import Kvm, Mapping, Vm
from guestmem.errors import GuestAccessFault
from guestmem.linux import KernelKvm, open_kernel

from .support import PS, errno_of


def test_open_kernel_through_guestmem_open(kvm: KernelKvm) -> None:
    with guestmem.open("kernel") as k:
        assert k.backend == "kernel"
        assert isinstance(k, Kvm)


def test_open_missing_device_gives_the_kernels_errno() -> None:
    assert errno_of(lambda: open_kernel("/nonexistent/kvm")) == errno.ENOENT


def test_api_version(kvm: KernelKvm) -> None:
    assert kvm.api_version() == u.KVM_API_VERSION


def test_check_extension_unknown_cap_is_zero(kvm: KernelKvm, vm: Vm) -> None:
    assert kvm.check_extension(0x7FFF_0000) == 0
    assert vm.check_extension(0x7FFF_0000) == 0


def test_guest_memfd_flags_on_system_fd_and_vm_agree_for_default_vm(kvm: KernelKvm, vm: Vm) -> None:
    # kvm == NULL reports every flag; a DEFAULT VM (no private memory) supports INIT_SHARED too.
    assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) & ~kvm.check_extension(
        u.KVM_CAP_GUEST_MEMFD_FLAGS) == 0


@pytest.mark.parametrize("vm_type", sorted(u.VM_TYPE_NAMES), ids=lambda t: u.VM_TYPE_NAMES[t])
def test_create_vm_type_follows_cap_vm_types(kvm: KernelKvm, vm_type: int) -> None:
    mask = kvm.check_extension(u.KVM_CAP_VM_TYPES)
    if vm_type == u.KVM_X86_DEFAULT_VM or mask & (1 << vm_type):
        kvm.create_vm(vm_type).close()
    else:
        assert errno_of(lambda: kvm.create_vm(vm_type)) == errno.EINVAL


def test_create_vm_unknown_type_einval(kvm: KernelKvm) -> None:
    assert errno_of(lambda: kvm.create_vm(63)) == errno.EINVAL


def test_mmap_anonymous_roundtrip(kvm: KernelKvm) -> None:
    with kvm.mmap_anonymous(4 * PS) as m:
        assert isinstance(m, Mapping)
        assert m.addr % PS == 0
        assert m.read(0, 16) == bytes(16)
        m.write(PS - 2, b"abcd")
        m.fill(3 * PS, PS, 0x5A)
        assert m.read(PS - 2, 4) == b"abcd"
        assert m.read(3 * PS, PS) == b"\x5a" * PS
        with pytest.raises(GuestAccessFault):  # outside the mapping: refused before any access
            m.read(4 * PS - 1, 2)


def test_memfd_create_is_a_plain_file(kvm: KernelKvm) -> None:
    with kvm.memfd_create(2 * PS) as f:
        assert os.fstat(f.fd).st_size == 2 * PS


def test_close_is_idempotent_and_later_calls_ebadf(kvm: KernelKvm) -> None:
    k = open_kernel()
    k.close()
    k.close()
    assert errno_of(k.api_version) == errno.EBADF


def test_finalizer_closes_fds_on_gc(kvm: KernelKvm) -> None:
    vm = kvm.create_vm()
    gmem = vm.create_guest_memfd(PS, 0)
    vm_fd, gmem_fd = vm.fd, gmem.fd
    vm_ino = os.fstat(vm_fd).st_ino
    gmem_ino = os.fstat(gmem_fd).st_ino
    del vm, gmem
    gc.collect()
    for fd, ino in ((vm_fd, vm_ino), (gmem_fd, gmem_ino)):
        try:
            assert os.fstat(fd).st_ino != ino  # closed (the number may have been reused)
        except OSError as err:
            assert err.errno == errno.EBADF
