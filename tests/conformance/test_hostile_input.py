"""The interface's promises under hostile input, written once and run on both backends.

* integers are taken as the uAPI field holds them: TypeError for non-integers, OverflowError for a
  value no field of that width holds, and otherwise the kernel's own errno (guestmem/args.py);
* a call through a closed object is EBADF — in the kernel's order of checks;
* host accesses are validated before anything is allocated;
* a pin keeps its pages alive through a punch or a close;
* an object nobody references any more is closed, as the kernel backend's finalizers close it.
"""

from __future__ import annotations

import errno
import gc

import pytest

import guestmem.uapi as u
from guestmem.api import Kvm
from guestmem.errors import GuestAccessFault, KvmError

from .support import GMEM_GPA, PAGE, check, errno_of

SIZE = 16 * PAGE


def expect_errno(err: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    got = errno_of(lambda: fn(*args))
    assert got == err, f"expected {errno.errorcode.get(err)}, got {errno.errorcode.get(got, got)}"
MMAP_SHARED = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED


def _gmem(backend: Kvm, flags: int = MMAP_SHARED):
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    if backend.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) & flags != flags:
        pytest.skip(f"host lacks guest_memfd flags {flags:#x}")
    return vm, vm.create_guest_memfd(SIZE, flags)


@pytest.mark.parametrize("bad", [4096.0, "4096", None, True, b"\x00"])
def test_non_integers_are_type_errors_before_anything(backend: Kvm, bad: object) -> None:
    vm, g = _gmem(backend)
    calls = [
        lambda: vm.create_guest_memfd(bad, 0),  # type: ignore[arg-type]
        lambda: vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, bad, SIZE, 0, g, 0),  # type: ignore[arg-type]
        lambda: vm.set_memory_attributes(0, bad, 0),  # type: ignore[arg-type]
        lambda: vm.create_vcpu(bad),  # type: ignore[arg-type]
        lambda: g.fallocate(bad, 0, PAGE),  # type: ignore[arg-type]
        lambda: g.mmap(PAGE, bad),  # type: ignore[arg-type]
        lambda: backend.mmap_anonymous(bad),  # type: ignore[arg-type]
        lambda: backend.check_extension(bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    assert g.stat()[0] == SIZE  # nothing happened to the file


@pytest.mark.parametrize("value", [1 << 64, -(1 << 63) - 1, 1 << 100])
def test_unrepresentable_integers_overflow(backend: Kvm, value: int) -> None:
    vm, g = _gmem(backend)
    for call in (lambda: vm.create_guest_memfd(value, 0),
                 lambda: vm.set_memory_attributes(value, PAGE, 0),
                 lambda: g.fallocate(u.FALLOC_FL_KEEP_SIZE, value, PAGE),
                 lambda: g.punch_hole(0, value)):
        with pytest.raises(OverflowError):
            call()


def test_negative_values_arrive_as_twos_complement(backend: Kvm) -> None:
    """-4096 in a __u64 is 2**64 - 4096: the kernel's own checks refuse it (EINVAL), on both."""
    vm, g = _gmem(backend)
    expect_errno(errno.EINVAL, vm.create_guest_memfd, -PAGE, 0)  # (loff_t)size <= 0
    expect_errno(errno.EINVAL, vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, -PAGE, SIZE, 0, g, 0)
    expect_errno(errno.EINVAL, vm.create_vcpu, -1)
    expect_errno(errno.EINVAL, g.fallocate, u.FALLOC_FL_KEEP_SIZE, -PAGE, PAGE)  # loff_t offset < 0


def test_closed_guest_memfd_is_ebadf_in_the_kernels_order(backend: Kvm) -> None:
    vm, g = _gmem(backend)
    g.close()
    expect_errno(errno.EBADF, g.fallocate, u.FALLOC_FL_KEEP_SIZE, 0, PAGE)
    expect_errno(errno.EBADF, g.mmap, PAGE, 0)
    expect_errno(errno.EBADF, g.stat)
    expect_errno(errno.EBADF, g.read, PAGE, 0)
    # Checked before the fd is looked up: a negative pread offset, a negative ftruncate length,
    # an unaligned mmap offset.
    expect_errno(errno.EINVAL, g.read, PAGE, -1)
    expect_errno(errno.EINVAL, g.truncate, -1)
    expect_errno(errno.EINVAL, g.mmap, PAGE, 1)
    expect_errno(errno.EBADF, vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, GMEM_GPA, SIZE, 0, g, 0)


def test_closed_vm_mapping_and_system_are_ebadf(backend: Kvm) -> None:
    vm, g = _gmem(backend)
    m = backend.mmap_anonymous(SIZE)
    m.close()
    for call in (lambda: m.read(0, 1), lambda: m.write(0, b"x"), lambda: m.fill(0, 1, 0),
                 lambda: m.discard(0, PAGE)):
        expect_errno(errno.EBADF, call)
    vm.close()
    for call in (lambda: vm.create_guest_memfd(SIZE, 0), lambda: vm.create_vcpu(0),
                 lambda: vm.check_extension(u.KVM_CAP_GUEST_MEMFD)):
        expect_errno(errno.EBADF, call)
    g.allocate(0, PAGE)  # the guest_memfd holds its VM: it still works
    g.close()


def test_mapping_access_is_validated_before_it_allocates(backend: Kvm) -> None:
    m = backend.mmap_anonymous(16 * PAGE)
    with pytest.raises(GuestAccessFault):
        m.read(0, 2 << 30)  # would be 2 GiB of buffer if it were allocated first
    with pytest.raises(GuestAccessFault):
        m.read(0, -1)  # size_t: 2**64 - 1
    with pytest.raises(OverflowError):
        m.read(0, 1 << 64)
    with pytest.raises(TypeError):
        m.fill(0, PAGE, 1.5)  # type: ignore[arg-type]
    expect_errno(errno.EINVAL, m.pin, 1, PAGE)
    m.close()


def test_pin_survives_punch_and_close(backend: Kvm) -> None:
    vm, g = _gmem(backend)
    m = g.mmap(SIZE)
    m.fill(0, SIZE, 0x42)
    with m.pin(0, PAGE):
        g.punch_hole(0, PAGE)
        assert m.read(0, PAGE) == bytes(PAGE)  # the file has a new (zero) page there now
    a = backend.mmap_anonymous(SIZE)
    a.fill(0, SIZE, 7)
    with a.pin(0, PAGE):
        a.close()
    m.close()
    g.close()
    check(vm)


def test_dropped_guest_memfd_is_closed(backend: Kvm) -> None:
    """The kernel backend closes an fd whose object was collected; the model does the same."""
    vm, g = _gmem(backend)
    fd = g.fd
    del g
    gc.collect()
    expect_errno(errno.EBADF, vm.set_user_memory_region2, 0, u.KVM_MEM_GUEST_MEMFD, GMEM_GPA, SIZE, 0, fd, 0)


def test_mapping_holds_its_guest_memfd(backend: Kvm) -> None:
    vm, g = _gmem(backend)
    m = g.mmap(SIZE)
    del g
    gc.collect()
    m.fill(0, PAGE, 0x11)  # the mapping keeps the file: still usable
    assert m.read(0, 1) == b"\x11"
    m.close()


def test_error_of_closed_fd_is_kvmerror(backend: Kvm) -> None:
    vm, g = _gmem(backend)
    g.close()
    with pytest.raises(KvmError):
        g.punch_hole(0, PAGE)


@pytest.mark.parametrize("vcpu_id, err", [(0x400, 0), (4095, 0), (4096, errno.EINVAL), (-1, errno.EINVAL)])
def test_vcpu_ids_up_to_kvm_max_vcpu_ids(backend: Kvm, vcpu_id: int, err: int) -> None:
    """x86 allows ids up to KVM_MAX_VCPU_IDS (4 x 1024), beyond the number of vCPUs (the fuzzer's
    differential mode found the model stopping at 1024)."""
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    assert errno_of(lambda: vm.create_vcpu(vcpu_id)) == err
