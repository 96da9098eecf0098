"""Port of upstream ``tools/testing/selftests/kvm/guest_memfd_test.c``.

Upstream runs every file test for each VM type in ``KVM_CAP_VM_TYPES`` and each guest_memfd flag
set {0, MMAP, MMAP|INIT_SHARED} the VM supports, on a 4-page file; here that is the
``vm_type`` x ``flags`` parametrization (unsupported combinations skip, naming what is missing).
``guest_memfd_guest`` runs a guest on a DEFAULT VM with a GMEM_ONLY slot at 4 GiB.

Expected errnos are the real kernel's: upstream only asserts "fails" for several cases (read,
write, MAP_PRIVATE, mmap without MMAP, unaligned fallocate); the errnos asserted here come from
the kernel sources (fs/read_write.c, fs/open.c, virt/kvm/guest_memfd.c) and were confirmed on a
6.18 host.

Not ported (not expressible through guestmem.api): ``mbind``, ``numa_allocation`` (NUMA policy)
and ``collapse`` (MADV_HUGEPAGE/MADV_COLLAPSE/MADV_DONTNEED).
"""

from __future__ import annotations

import errno

import pytest

import guestmem.uapi as u
from guestmem.api import Kvm, Vm
from guestmem.errors import GuestAccessFault
from guestmem.guest.ops import Verify, Write
from guestmem.releases import rules_of

from .support import (
    GMEM_GPA,
    PAGE,
    VM_TYPES,
    GuestScript,
    check,
    drive,
    raises_errno,
    require_cap,
    require_vm_type,
    vm_type_name,
)

MMAP = u.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = u.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = u.FALLOC_FL_KEEP_SIZE
PUNCH = u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE

GMEM_SIZE = 4 * PAGE  # upstream gmem_test(): page_size * 4
MEM_SLOT = 10

FLAG_SETS = [
    pytest.param(0, id="flags0"),
    pytest.param(MMAP, id="MMAP"),
    pytest.param(MMAP | INIT_SHARED, id="MMAP+INIT_SHARED"),
]
MMAP_FLAG_SETS = FLAG_SETS[1:]


def gmem_vm(kvm: Kvm, vm_type: int) -> Vm:
    """A VM of ``vm_type`` on a host with guest_memfd (upstream: TEST_REQUIRE(KVM_CAP_GUEST_MEMFD))."""
    require_cap(kvm, u.KVM_CAP_GUEST_MEMFD)
    return require_vm_type(kvm, vm_type)


def require_gmem_flags(vm: Vm, flags: int) -> None:
    supported = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
    missing = flags & ~supported
    if missing:
        names = "|".join(n for f, n in u.GUEST_MEMFD_FLAG_NAMES.items() if missing & f) or hex(missing)
        pytest.skip(f"host lacks GUEST_MEMFD_FLAG_{names} for {vm_type_name(vm.vm_type)} "
                    f"(KVM_CAP_GUEST_MEMFD_FLAGS={supported:#x})")


# --- test_guest_memfd_flags / test_create_guest_memfd_* ---------------------------------------------


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_guest_memfd_flags(backend: Kvm, vm_type: int) -> None:
    """Each single flag bit 0..63 succeeds iff KVM_CAP_GUEST_MEMFD_FLAGS has it, else EINVAL."""
    with gmem_vm(backend, vm_type) as vm:
        valid = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
        for bit in range(64):
            flag = 1 << bit
            if flag & valid:
                gmem = vm.create_guest_memfd(PAGE, flag)
                assert gmem.flags == flag
                gmem.close()
            else:
                with raises_errno(errno.EINVAL):
                    vm.create_guest_memfd(PAGE, flag)
            check(vm)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_guest_memfd_flags_cap_per_vm_type(backend: Kvm, vm_type: int) -> None:
    """Extra (kvm_gmem_get_supported_flags, 6.18): MMAP always; INIT_SHARED only where
    ``kvm_arch_supports_gmem_init_shared`` -- on x86, VMs without private memory (DEFAULT) and the
    system fd (kvm == NULL); a VM with private memory can't start out shared."""
    system = require_cap(backend, u.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert system == MMAP | INIT_SHARED
    with gmem_vm(backend, vm_type) as vm:
        expected = MMAP | INIT_SHARED if vm_type == u.KVM_X86_DEFAULT_VM else MMAP
        assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == expected


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_create_guest_memfd_multiple(backend: Kvm, vm_type: int) -> None:
    """Two files of 1 and 2 pages: each st_size is its own, and the inodes differ."""
    with gmem_vm(backend, vm_type) as vm:
        gmem1 = vm.create_guest_memfd(PAGE, 0)
        assert gmem1.stat()[0] == PAGE
        gmem2 = vm.create_guest_memfd(2 * PAGE, 0)
        check(vm)
        size2, _, ino2 = gmem2.stat()
        assert size2 == 2 * PAGE
        size1, _, ino1 = gmem1.stat()
        assert size1 == PAGE, "the first file's size must not change"
        assert ino1 != ino2, "different guest_memfd files must have different inode numbers"
        assert gmem1.fd != gmem2.fd
        gmem2.close()
        gmem1.close()
        check(vm)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_invalid_binding(backend: Kvm, vm_type: int) -> None:
    """guest_memfd_test.c:test_invalid_binding: slot 0 at GPA 0 covering the whole file, bound at
    offset ALIGN_DOWN(INT64_MAX, PAGE_SIZE).  7.2 takes the offset unsigned, so offset + size is
    past the file: EINVAL (upstream's assertion).  Through 6.18 the offset is a signed loff_t and
    the sum wraps negative, which the range check let through: the binding is accepted.  The
    release rule (``guestmem.releases``) says which; this host's kernel is the 6.18 witness."""
    size = 4 * PAGE
    with gmem_vm(backend, vm_type) as vm, vm.create_guest_memfd(size, 0) as gmem:
        offset = ((1 << 63) - 1) & ~(PAGE - 1)
        if rules_of(backend).bind_offset_signed:
            vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, 0, gmem, offset)
            check(vm)
            vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 0, 0, gmem, offset)
        else:
            with raises_errno(errno.EINVAL):
                vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, 0, gmem, offset)
        check(vm)


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_create_guest_memfd_invalid_sizes(backend: Kvm, vm_type: int, flags: int) -> None:
    """Sizes 1..PAGE_SIZE-1 are refused with EINVAL."""
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        for size in range(1, PAGE):
            with raises_errno(errno.EINVAL):
                vm.create_guest_memfd(size, flags)
        check(vm)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_create_guest_memfd_size_zero_and_negative(backend: Kvm, vm_type: int) -> None:
    """Extra (kvm_gmem_create: ``size <= 0 || !PAGE_ALIGNED(size)``): size 0, an unaligned size above
    a page, and a u64 size that is negative as loff_t are all EINVAL."""
    with gmem_vm(backend, vm_type) as vm:
        for size in (0, PAGE + 1, 2 * PAGE - 1, 1 << 63, (1 << 64) - PAGE):
            with raises_errno(errno.EINVAL):
                vm.create_guest_memfd(size, 0)
        check(vm)


# --- per-file tests (gmem_test) ---------------------------------------------------------------------


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_file_read_write(backend: Kvm, vm_type: int, flags: int) -> None:
    """read, write, pread and pwrite on a guest_memfd all fail (upstream asserts only that).

    The errnos, from fs/read_write.c and confirmed on a 6.18 host: read(2)/write(2) reach
    vfs_read/vfs_write, which answer EINVAL (no read/write handler, so no FMODE_CAN_READ/WRITE);
    pread(2)/pwrite(2) stop earlier with ESPIPE (the anonymous-inode file has no FMODE_PREAD/PWRITE).
    ``GuestMemfd.read(n)``/``write(data)`` without an offset are read(2)/write(2); with an offset
    they are pread(2)/pwrite(2).
    """
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem:
            with raises_errno(errno.EINVAL):
                gmem.read(64)
            with raises_errno(errno.EINVAL):
                gmem.write(b"\0" * 64)
            with raises_errno(errno.ESPIPE):
                gmem.read(64, 0)
            with raises_errno(errno.ESPIPE):
                gmem.write(b"\0" * 64, 0)
            with raises_errno(errno.ESPIPE):
                gmem.read(64, PAGE)
            check(vm)


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_file_truncate(backend: Kvm, vm_type: int, flags: int) -> None:
    """Extra (kvm_gmem_setattr): the size is immutable, ftruncate() is EINVAL and changes nothing."""
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem:
            for size in (2 * GMEM_SIZE, PAGE, GMEM_SIZE):
                with raises_errno(errno.EINVAL):
                    gmem.truncate(size)
            assert gmem.stat()[0] == GMEM_SIZE
            check(vm)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_mmap_supported(backend: Kvm, vm_type: int) -> None:
    """MMAP|INIT_SHARED: the host writes and reads back 0xaa; PUNCH_HOLE of page 0 zeroes exactly
    page 0 (in the existing mapping); rewriting it works."""
    flags = MMAP | INIT_SHARED
    val = 0xAA
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem, gmem.mmap() as mem:
            assert mem.length == GMEM_SIZE
            mem.fill(0, GMEM_SIZE, val)
            check(vm)
            assert mem.read(0, GMEM_SIZE) == bytes([val]) * GMEM_SIZE

            gmem.fallocate(PUNCH, 0, PAGE)
            check(vm)
            assert mem.read(0, PAGE) == bytes(PAGE)
            assert mem.read(PAGE, GMEM_SIZE - PAGE) == bytes([val]) * (GMEM_SIZE - PAGE)

            mem.fill(0, PAGE, val)
            check(vm)
            assert mem.read(0, GMEM_SIZE) == bytes([val]) * GMEM_SIZE


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_fault_overflow(backend: Kvm, vm_type: int) -> None:
    """A mapping 4x the file size: memset over all of it faults (SIGBUS) at the file's end, a read
    at offset ``size`` faults, and the first ``size`` bytes hold what memset wrote before faulting."""
    flags = MMAP | INIT_SHARED
    val = 0xAA
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem, gmem.mmap(4 * GMEM_SIZE) as mem:
            with pytest.raises(GuestAccessFault) as fault:
                mem.fill(0, 4 * GMEM_SIZE, val)
            assert fault.value.offset == GMEM_SIZE
            with pytest.raises(GuestAccessFault) as fault:
                mem.read(GMEM_SIZE, 1)
            assert fault.value.offset == GMEM_SIZE
            check(vm)
            assert mem.read(0, GMEM_SIZE) == bytes([val]) * GMEM_SIZE


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_fault_private(backend: Kvm, vm_type: int) -> None:
    """MMAP without INIT_SHARED: mmap succeeds, but any access faults (SIGBUS) at offset 0."""
    flags = MMAP
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem, gmem.mmap() as mem:
            with pytest.raises(GuestAccessFault) as fault:
                mem.fill(0, GMEM_SIZE, 0xAA)
            assert fault.value.offset == 0
            with pytest.raises(GuestAccessFault) as fault:
                mem.read(0, 1)
            assert fault.value.offset == 0
            with pytest.raises(GuestAccessFault):
                mem.write(PAGE, b"\xaa")
            check(vm)


@pytest.mark.parametrize("flags", MMAP_FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_mmap_cow(backend: Kvm, vm_type: int, flags: int) -> None:
    """MAP_PRIVATE (copy-on-write) is refused: kvm_gmem_mmap wants VM_SHARED|VM_MAYSHARE -> EINVAL."""
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem:
            with raises_errno(errno.EINVAL):
                gmem.mmap(GMEM_SIZE, shared=False)
            check(vm)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_mmap_not_supported(backend: Kvm, vm_type: int) -> None:
    """Without GUEST_MEMFD_FLAG_MMAP, MAP_SHARED of one page or of the whole file is ENODEV."""
    with gmem_vm(backend, vm_type) as vm, vm.create_guest_memfd(GMEM_SIZE, 0) as gmem:
        with raises_errno(errno.ENODEV):
            gmem.mmap(PAGE)
        with raises_errno(errno.ENODEV):
            gmem.mmap(GMEM_SIZE)
        check(vm)


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_file_size(backend: Kvm, vm_type: int, flags: int) -> None:
    """fstat: st_size is the requested size, st_blksize is PAGE_SIZE."""
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem:
            st_size, st_blksize, _ = gmem.stat()
            assert st_size == GMEM_SIZE
            assert st_blksize == PAGE
            assert gmem.size == GMEM_SIZE


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_fallocate(backend: Kvm, vm_type: int, flags: int) -> None:
    """upstream test_fallocate: allocation must stay inside the file and be page aligned; punching
    a hole at or past the end is a successful no-op."""
    size = GMEM_SIZE
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(size, flags) as gmem:
            gmem.fallocate(KEEP, 0, size)
            check(vm)
            with raises_errno(errno.EINVAL):  # unaligned offset
                gmem.fallocate(PUNCH, PAGE - 1, PAGE)
            with raises_errno(errno.EINVAL):  # allocation beginning at the end of the file
                gmem.fallocate(KEEP, size, PAGE)
            with raises_errno(errno.EINVAL):  # allocation beginning after the end of the file
                gmem.fallocate(KEEP, size + PAGE, PAGE)
            gmem.fallocate(PUNCH, size, PAGE)  # punch at the end: OK
            check(vm)
            gmem.fallocate(PUNCH, size + PAGE, PAGE)  # punch after the end: OK
            check(vm)
            with raises_errno(errno.EINVAL):  # unaligned length
                gmem.fallocate(PUNCH, PAGE, PAGE - 1)
            gmem.fallocate(PUNCH, PAGE, PAGE)
            check(vm)
            gmem.fallocate(KEEP, PAGE, PAGE)  # restore the punched hole
            check(vm)
            # The helpers are the same calls.
            gmem.punch_hole(0, size)
            check(vm)
            gmem.allocate(0, size)
            check(vm)


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_invalid_punch_hole(backend: Kvm, vm_type: int, flags: int) -> None:
    """PUNCH_HOLE with an offset and/or length that is not page aligned is EINVAL.  Extra: where
    the host can see the data (INIT_SHARED), a refused punch left it intact."""
    cases = [
        (0, 1), (0, PAGE - 1), (0, PAGE + 1),
        (1, 1), (1, PAGE - 1), (1, PAGE), (1, PAGE + 1),
        (PAGE, 1), (PAGE, PAGE - 1), (PAGE, PAGE + 1),
    ]
    with gmem_vm(backend, vm_type) as vm:
        require_gmem_flags(vm, flags)
        with vm.create_guest_memfd(GMEM_SIZE, flags) as gmem:
            mem = gmem.mmap() if flags & INIT_SHARED else None
            if mem is not None:
                mem.fill(0, GMEM_SIZE, 0x5A)
            for offset, length in cases:
                with raises_errno(errno.EINVAL):
                    gmem.fallocate(PUNCH, offset, length)
                check(vm)
            if mem is not None:
                assert mem.read(0, GMEM_SIZE) == b"\x5a" * GMEM_SIZE
                mem.close()


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_fallocate_mode_and_range_errors(backend: Kvm, vm_type: int) -> None:
    """Extra (fs/open.c vfs_fallocate, then kvm_gmem_fallocate), confirmed on a 6.18 host:
    len <= 0 / offset < 0 -> EINVAL (VFS, first); unsupported modes -> EOPNOTSUPP (the mode is
    checked before alignment); offset+len past s_maxbytes or wrapping -> EFBIG; a punch of any
    length from inside the file is fine; an allocation past the end is EINVAL."""
    flags = 0
    with gmem_vm(backend, vm_type) as vm, vm.create_guest_memfd(GMEM_SIZE, flags) as gmem:
        for mode, offset, length, err in [
            (KEEP, 0, 0, errno.EINVAL),
            (PUNCH, 0, 0, errno.EINVAL),
            (u.FALLOC_FL_PUNCH_HOLE, 0, 0, errno.EINVAL),
            (KEEP, -PAGE, PAGE, errno.EINVAL),
            (PUNCH, 0, -PAGE, errno.EINVAL),
            (0, 0, PAGE, errno.EOPNOTSUPP),  # no KEEP_SIZE
            (0, 1, 1, errno.EOPNOTSUPP),  # mode before alignment
            (u.FALLOC_FL_PUNCH_HOLE, 0, PAGE, errno.EOPNOTSUPP),  # punch needs KEEP_SIZE
            (u.FALLOC_FL_PUNCH_HOLE, 1, 1, errno.EOPNOTSUPP),
            (KEEP | u.FALLOC_FL_ZERO_RANGE, 0, PAGE, errno.EOPNOTSUPP),
            (KEEP | u.FALLOC_FL_COLLAPSE_RANGE, 0, PAGE, errno.EOPNOTSUPP),
            (KEEP | u.FALLOC_FL_INSERT_RANGE, 0, PAGE, errno.EOPNOTSUPP),
            (KEEP | u.FALLOC_FL_UNSHARE_RANGE, 0, PAGE, errno.EOPNOTSUPP),
            (KEEP | u.FALLOC_FL_NO_HIDE_STALE, 0, PAGE, errno.EOPNOTSUPP),
            (PUNCH | u.FALLOC_FL_NO_HIDE_STALE, 0, PAGE, errno.EOPNOTSUPP),
            (u.FALLOC_FL_WRITE_ZEROES, 0, PAGE, errno.EOPNOTSUPP),
            (KEEP | 0x100, 0, PAGE, errno.EOPNOTSUPP),
            (KEEP, 1, 1, errno.EINVAL),
            (KEEP, 0, 1 << 62, errno.EINVAL),  # allocation past the end
            (PUNCH, (1 << 63) - PAGE, PAGE, errno.EFBIG),  # offset+len wraps loff_t
            (PUNCH, PAGE, (1 << 63) - PAGE, errno.EFBIG),
            (PUNCH, 1 << 62, 1 << 62, errno.EFBIG),
        ]:
            with raises_errno(err):
                gmem.fallocate(mode, offset, length)
            check(vm)
        gmem.fallocate(PUNCH, 0, 1 << 62)  # punch has no size check
        check(vm)


# --- test_guest_memfd_guest -------------------------------------------------------------------------


def _default_vm_with_shared_gmem(kvm: Kvm) -> Vm:
    """upstream: skip if the host has no KVM_CAP_GUEST_MEMFD_FLAGS; then a DEFAULT VM *must*
    support MMAP and INIT_SHARED."""
    require_cap(kvm, u.KVM_CAP_GUEST_MEMFD_FLAGS)
    vm = require_vm_type(kvm, u.KVM_X86_DEFAULT_VM)
    supported = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert supported & MMAP, f"DEFAULT VM should support MMAP, supported flags = {supported:#x}"
    assert supported & INIT_SHARED, f"DEFAULT VM should support INIT_SHARED, supported flags = {supported:#x}"
    return vm


def test_guest_memfd_guest(backend: Kvm) -> None:
    """The host writes 0xaa through an mmap of the guest_memfd, the guest (slot 1 at 4 GiB,
    KVM_MEM_GUEST_MEMFD, so GMEM_ONLY) checks 0xaa and writes 0xff, the host sees 0xff.

    Departure from upstream: userspace_addr is the guest_memfd's own mmap address instead of
    NULL, because the kernel backend's host needs it (see the next test).
    """
    slot, gpa, size = 1, GMEM_GPA, PAGE
    with _default_vm_with_shared_gmem(backend) as vm:
        gmem = vm.create_guest_memfd(size, MMAP | INIT_SHARED)
        slot_map = gmem.mmap(size)
        vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, gpa, size, slot_map.addr,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        check(vm)
        with gmem.mmap(size) as mem:
            mem.fill(0, size, 0xAA)
        check(vm)

        vcpu = vm.create_vcpu(0)
        drive(vm, vcpu, GuestScript()(Verify(gpa, size, 0xAA), Write(gpa, size, 0xFF)))

        with gmem.mmap(size) as mem:
            assert mem.read(0, size) == b"\xff" * size
        vcpu.close()
        slot_map.close()
        gmem.close()
        check(vm)


def test_guest_memfd_guest_userspace_addr_null(backend: Kvm, request: pytest.FixtureRequest) -> None:
    """upstream test_guest_memfd_guest exactly: the GMEM_ONLY slot gets userspace_addr = NULL.

    Upstream KVM ignores userspace_addr for a slot bound to a guest_memfd with MMAP (GMEM_ONLY,
    kvm_gmem_bind): every guest access, shared ones included, is served from the guest_memfd.  The
    model does exactly that.  On this host's kernel (6.18, kvm_pvm), however, KVM's instruction
    emulator reads the slot through its userspace_addr rather than from guest_memfd, so with NULL
    the guest cannot reach the memory; the kernel backend is therefore marked xfail (non-strict,
    so a host that serves it from guest_memfd passes).  The other guest tests pass the gmem's own
    mmap address as userspace_addr, which works on both.
    """
    if backend.backend == "kernel":
        request.applymarker(pytest.mark.xfail(
            strict=False,
            reason="host KVM's instruction emulator reads a GMEM_ONLY slot via userspace_addr (NULL here) "
                   "instead of guest_memfd"))
    slot, gpa, size = 1, GMEM_GPA, PAGE
    with _default_vm_with_shared_gmem(backend) as vm:
        gmem = vm.create_guest_memfd(size, MMAP | INIT_SHARED)
        vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, gpa, size, 0,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        with gmem.mmap(size) as mem:
            mem.fill(0, size, 0xAA)
        check(vm)

        vcpu = vm.create_vcpu(0)
        drive(vm, vcpu, GuestScript()(Verify(gpa, size, 0xAA), Write(gpa, size, 0xFF)))

        with gmem.mmap(size) as mem:
            assert mem.read(0, size) == b"\xff" * size
        vcpu.close()
        gmem.close()
        check(vm)


def test_guest_sees_punch_hole_and_host_writes(backend: Kvm) -> None:
    """Extra (spec 2.2/2.6, the shared-gmem analogue of private_mem_conversions' punch-hole test):
    a GMEM_ONLY slot over 4 pages; after a PUNCH_HOLE the guest reads zeros there (SPTEs zapped,
    the page refaulted and zeroed) while the other pages keep their data, and a host write through
    the mmap between two guest runs is seen by the guest."""
    slot, gpa, npages = 1, GMEM_GPA, 4
    size = npages * PAGE
    with _default_vm_with_shared_gmem(backend) as vm:
        gmem = vm.create_guest_memfd(size, MMAP | INIT_SHARED)
        mem = gmem.mmap(size)
        vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, gpa, size, mem.addr,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        mem.fill(0, size, 0x11)
        check(vm)

        def punch_page_1() -> None:
            gmem.punch_hole(PAGE, PAGE)
            check(vm)
            assert mem.read(PAGE, PAGE) == bytes(PAGE)

        def host_writes_page_2() -> None:
            mem.fill(2 * PAGE, PAGE, 0x33)

        script = (GuestScript()
                  (Verify(gpa, size, 0x11), Write(gpa, size, 0x22))
                  .sync(punch_page_1)
                  (Verify(gpa, PAGE, 0x22), Verify(gpa + PAGE, PAGE, 0x00),
                   Verify(gpa + 2 * PAGE, 2 * PAGE, 0x22))
                  .sync(host_writes_page_2)
                  (Verify(gpa + 2 * PAGE, PAGE, 0x33), Write(gpa + PAGE, PAGE, 0x44)))
        vcpu = vm.create_vcpu(0)
        drive(vm, vcpu, script)
        assert mem.read(0, size) == b"\x22" * PAGE + b"\x44" * PAGE + b"\x33" * PAGE + b"\x22" * PAGE
        vcpu.close()
        mem.close()
        gmem.close()
        check(vm)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_fallocate_after_vm_close(backend: Kvm, vm_type: int) -> None:
    """Extra (from private_mem_conversions_test's tail, on every VM type): the guest_memfd holds a
    reference on its VM, so allocating and punching still work after the VM fd is closed, with
    and without a memslot still bound to it."""
    size = 4 * PAGE
    with gmem_vm(backend, vm_type) as vm:
        bound = vm.create_guest_memfd(size, 0)
        loose = vm.create_guest_memfd(size, 0)
        backing = backend.mmap_anonymous(size)
        vm.set_user_memory_region2(MEM_SLOT, u.KVM_MEM_GUEST_MEMFD, GMEM_GPA, size, backing.addr,
                                   guest_memfd=bound, guest_memfd_offset=0)
        bound.allocate(0, size)
        check(vm)
    check(backend)
    for gmem in (bound, loose):
        gmem.punch_hole(0, size)
        gmem.allocate(0, size)
        gmem.punch_hole(0, size)
        assert gmem.stat()[0] == size
        gmem.close()
    backing.close()
    check(backend)

