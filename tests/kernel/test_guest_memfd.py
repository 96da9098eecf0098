"""guest_memfd files on the real kernel: creation, flags, fallocate, file ops, mmap, faults, pins.

Mirrors upstream's ``guest_memfd_test.c``; each refusal asserts the errno the kernel returns.
"""

from __future__ import annotations

import errno
import gc
import os

import pytest

import guestmem.uapi as u
from guestmem.api import GuestMemfd
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.linux import KernelKvm, KernelVm

from .support import MIB, PS, errno_of, require_gmem_flags

MMAP = u.GUEST_MEMFD_FLAG_MMAP
SHARED = u.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP, PUNCH = u.FALLOC_FL_KEEP_SIZE, u.FALLOC_FL_PUNCH_HOLE
SIZE = 4 * PS


# --- creation ---------------------------------------------------------------------------------------


def test_create_invalid_sizes_einval(vm: KernelVm) -> None:
    require_gmem_flags(vm)
    for size in range(1, PS):
        assert errno_of(lambda size=size: vm.create_guest_memfd(size, 0)) == errno.EINVAL, size
    for size in (0, PS + 1, 2 * PS - 1, -PS, 1 << 63):
        assert errno_of(lambda size=size: vm.create_guest_memfd(size, 0)) == errno.EINVAL, size


def test_create_multiple_distinct_inodes_and_stat(vm: KernelVm) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(PS, 0) as a, vm.create_guest_memfd(2 * PS, 0) as b:
        assert isinstance(a, GuestMemfd)
        sa, sb = a.stat(), b.stat()
        assert sa[:2] == (PS, PS)
        assert sb[:2] == (2 * PS, PS)  # st_size, st_blksize
        assert sa[2] != sb[2]


def test_create_large_size_is_lazy(vm: KernelVm) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(1 << 40, 0) as g:
        assert g.stat()[0] == 1 << 40


@pytest.mark.parametrize("bit", range(64))
def test_flag_bit_accepted_iff_in_cap(vm: KernelVm, bit: int) -> None:
    require_gmem_flags(vm)
    supported = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
    if supported & (1 << bit):
        vm.create_guest_memfd(PS, 1 << bit).close()
    else:
        assert errno_of(lambda: vm.create_guest_memfd(PS, 1 << bit)) == errno.EINVAL


def test_fd_is_not_cloexec(vm: KernelVm) -> None:
    # Upstream creates the fd with get_unused_fd_flags(0).
    require_gmem_flags(vm)
    with vm.create_guest_memfd(PS, 0) as g:
        assert os.get_inheritable(g.fd)


# --- file operations --------------------------------------------------------------------------------


def test_read_write_pread_pwrite_fail(vm: KernelVm) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(SIZE, 0) as g:
        assert errno_of(lambda: g.read(PS, 0)) == errno.ESPIPE  # pread on a non-seekable file
        assert errno_of(lambda: g.write(b"x" * PS, 0)) == errno.ESPIPE
        for call in (lambda: os.read(g.fd, PS), lambda: os.write(g.fd, b"x")):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EINVAL  # no read/write handlers
        with pytest.raises(OSError) as info:
            os.lseek(g.fd, 0, os.SEEK_SET)
        assert info.value.errno == errno.ESPIPE


@pytest.mark.parametrize("size", [0, PS, SIZE, 8 * PS])
def test_truncate_einval(vm: KernelVm, size: int) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(SIZE, 0) as g:
        assert errno_of(lambda: g.truncate(size)) == errno.EINVAL
        assert g.stat()[0] == SIZE


def test_set_memory_attributes2_without_in_place_conversion(vm: KernelVm) -> None:
    if vm.check_extension(u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES):
        pytest.skip("host has KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: covered by the conformance suite")
    require_gmem_flags(vm)
    with vm.create_guest_memfd(SIZE, 0) as g:
        with pytest.raises(KvmError) as info:
            g.set_memory_attributes2(0, PS, 0)
        assert info.value.errno == errno.ENOTTY  # no ioctl handler on the guest_memfd file
        assert info.value.operation == "KVM_SET_MEMORY_ATTRIBUTES2"
        assert info.value.error_offset == 0  # read back from the struct (not written by the kernel)
        with pytest.raises(OverflowError):
            g.set_memory_attributes2(0, PS, 0, 0, reserved=[0] * 12)


# --- fallocate --------------------------------------------------------------------------------------

FALLOCATE_CASES = [
    # (mode, offset, length, errno or 0): upstream guest_memfd_test.c's table, then refused modes.
    (KEEP, 0, SIZE, 0),
    (KEEP | PUNCH, PS - 1, PS, errno.EINVAL),
    (KEEP, SIZE, PS, errno.EINVAL),
    (KEEP, SIZE + PS, PS, errno.EINVAL),
    (KEEP | PUNCH, SIZE, PS, 0),
    (KEEP | PUNCH, SIZE + PS, PS, 0),
    (KEEP | PUNCH, PS, PS - 1, errno.EINVAL),
    (KEEP | PUNCH, PS, PS, 0),
    (KEEP, PS, PS, 0),
    (KEEP, 3 * PS, 2 * PS, errno.EINVAL),  # allocation crossing the end
    (KEEP | PUNCH, 0, 1 << 62, 0),  # punching far beyond the end is fine
    (KEEP, 0, 0, errno.EINVAL),  # the VFS refuses len <= 0
    (KEEP | PUNCH, 0, 0, errno.EINVAL),
    (KEEP, -PS, PS, errno.EINVAL),
    (KEEP, 0, -PS, errno.EINVAL),
    (0, 0, PS, errno.EOPNOTSUPP),  # no KEEP_SIZE
    (PUNCH, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_ZERO_RANGE, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_ZERO_RANGE | KEEP, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_COLLAPSE_RANGE, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_INSERT_RANGE, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_UNSHARE_RANGE | KEEP, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_NO_HIDE_STALE, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_WRITE_ZEROES, 0, PS, errno.EOPNOTSUPP),
    (u.FALLOC_FL_WRITE_ZEROES | KEEP, 0, PS, errno.EOPNOTSUPP),
]


@pytest.mark.parametrize(("mode", "offset", "length", "err"), FALLOCATE_CASES,
                         ids=[f"mode{m:#x}-{o:#x}-{n:#x}" for m, o, n, _ in FALLOCATE_CASES])
def test_fallocate(vm: KernelVm, mode: int, offset: int, length: int, err: int) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(SIZE, 0) as g:
        if err:
            assert errno_of(lambda: g.fallocate(mode, offset, length)) == err
        else:
            g.fallocate(mode, offset, length)


@pytest.mark.parametrize(("offset", "length"), [(0, 1), (0, PS - 1), (0, PS + 1), (1, 1), (1, PS - 1),
                                                (1, PS), (1, PS + 1), (PS, 1), (PS, PS - 1), (PS, PS + 1)])
def test_invalid_punch_hole_einval(vm: KernelVm, offset: int, length: int) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(SIZE, 0) as g:
        assert errno_of(lambda: g.punch_hole(offset, length)) == errno.EINVAL
        assert errno_of(lambda: g.allocate(offset, length)) == errno.EINVAL


# --- mmap and host faults ---------------------------------------------------------------------------


def test_mmap_private_einval(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g:
        assert errno_of(lambda: g.mmap(shared=False)) == errno.EINVAL


def test_mmap_without_mmap_flag_enodev(vm: KernelVm) -> None:
    require_gmem_flags(vm)
    with vm.create_guest_memfd(SIZE, 0) as g:
        assert errno_of(lambda: g.mmap()) == errno.ENODEV
        assert errno_of(lambda: g.mmap(shared=False)) == errno.ENODEV


def test_mmap_offsets_and_lengths(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g:
        g.mmap(PS, PS).close()
        g.mmap(PS, 8 * PS).close()  # an offset past the end maps (and faults on access)
        assert errno_of(lambda: g.mmap(PS, 1)) == errno.EINVAL
        assert errno_of(lambda: g.mmap(0)) == errno.EINVAL


def test_mmap_supported_and_punch_hole(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g, g.mmap() as m:
        assert m.read(0, SIZE) == bytes(SIZE)  # first touch zeroes
        m.fill(0, SIZE, 0xAA)
        assert m.read(0, SIZE) == b"\xaa" * SIZE
        g.punch_hole(0, PS)
        assert m.read(0, PS) == bytes(PS)
        assert m.read(PS, SIZE - PS) == b"\xaa" * (SIZE - PS)
        m.fill(0, PS, 0xAA)
        assert m.read(0, SIZE) == b"\xaa" * SIZE


def test_two_mappings_share_pages(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g, g.mmap() as a, g.mmap(PS, PS) as b:
        a.write(PS + 10, b"hello")
        assert b.read(10, 5) == b"hello"


def test_fault_overflow_is_a_guest_access_fault(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g, g.mmap(4 * SIZE) as m:
        with pytest.raises(GuestAccessFault) as info:
            m.fill(0, 4 * SIZE, 0xAA)
        assert info.value.offset == SIZE
        assert info.value.errno == errno.EFAULT
        with pytest.raises(GuestAccessFault) as info:
            m.read(SIZE, 1)
        assert info.value.offset == SIZE
        with pytest.raises(GuestAccessFault) as info:
            m.read(SIZE - 8, 16)  # straddles the end: fails at the first unreachable byte
        assert info.value.offset == SIZE
        with pytest.raises(GuestAccessFault):
            m.write(2 * SIZE, b"x")
        assert m.read(0, SIZE) == b"\xaa" * SIZE  # the bytes before the fault were written


def test_fault_without_init_shared(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP)
    with vm.create_guest_memfd(SIZE, MMAP) as g, g.mmap() as m:
        for call in (lambda: m.read(0, 1), lambda: m.write(PS, b"x"), lambda: m.fill(0, SIZE, 1)):
            with pytest.raises(GuestAccessFault):
                call()


def test_discard_punches_the_file(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g, g.mmap() as m, g.mmap() as other:
        m.fill(0, SIZE, 0x11)
        m.discard(PS, PS)
        assert other.read(PS, PS) == bytes(PS)
        assert other.read(0, PS) == b"\x11" * PS


def test_discard_private_anonymous_einval(kvm: KernelKvm) -> None:
    from guestmem.linux import KernelMapping

    with KernelMapping.anonymous(SIZE, shared=False) as m:
        assert errno_of(lambda: m.discard(0, PS)) == errno.EINVAL


# --- pins -------------------------------------------------------------------------------------------


def test_pin_holds_the_page_across_a_punch(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g, g.mmap() as m:
        m.fill(0, SIZE, 0xAA)
        pin = m.pin(PS, PS)
        with pin:
            assert pin.held and pin.pinned == PS
            g.punch_hole(PS, PS)
            assert m.read(PS, PS) == bytes(PS)  # the file no longer has the page...
            assert pin.drain() == b"\xaa" * PS  # ...but the pipe still referenced the old one
        assert not pin.held


def test_pin_large_range_spans_pipes(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    size = 4 * MIB
    with vm.create_guest_memfd(size, MMAP | SHARED) as g, g.mmap() as m:
        m.fill(0, size, 0x3C)
        pin = m.pin(0, size)
        with pin:
            assert pin.pinned == size
            data = pin.drain()
        assert data == b"\x3c" * size


def test_pin_of_unfaultable_range_is_a_guest_access_fault(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    with vm.create_guest_memfd(SIZE, MMAP | SHARED) as g, g.mmap(2 * SIZE) as m:
        pin = m.pin(SIZE - PS, 2 * PS)
        with pytest.raises(GuestAccessFault) as info, pin:
            pass
        assert info.value.offset == SIZE
        assert not pin.held


# --- lifetimes --------------------------------------------------------------------------------------


def test_guest_memfd_outlives_its_vm(kvm: KernelKvm) -> None:
    vm = kvm.create_vm()
    require_gmem_flags(vm, MMAP | SHARED)
    g = vm.create_guest_memfd(SIZE, MMAP | SHARED)
    vm.close()
    del vm
    gc.collect()
    g.allocate(0, SIZE)
    with g.mmap() as m:
        m.fill(0, PS, 7)
        g.punch_hole(0, PS)
        assert m.read(0, PS) == bytes(PS)
    assert g.stat()[0] == SIZE
    g.close()


def test_mapping_outlives_the_fd(vm: KernelVm) -> None:
    require_gmem_flags(vm, MMAP | SHARED)
    g = vm.create_guest_memfd(SIZE, MMAP | SHARED)
    m = g.mmap()
    g.close()
    m.fill(0, SIZE, 9)  # the mapping holds the file
    assert m.read(SIZE - 1, 1) == b"\x09"
    m.close()


def test_close_idempotent_and_ops_after_close_ebadf(vm: KernelVm) -> None:
    require_gmem_flags(vm)
    g = vm.create_guest_memfd(SIZE, 0)
    g.close()
    g.close()
    assert errno_of(lambda: g.allocate(0, PS)) == errno.EBADF
    assert errno_of(g.stat) == errno.EBADF

