"""The rules the recorded host-behaviour corpus found the model missing (issue #11), on both backends.

Each test is one rule the real kernel showed in ``tests/conformance/host_behaviours.json`` (the
``mmap2/``, ``mprotect/``, ``madvise/``, ``file2/`` and ``ioctl/`` behaviours) and the upstream line
it comes from; a refused call must change nothing.
"""

from __future__ import annotations

import errno

import pytest

import guestmem.uapi as u
from guestmem import fileabi as fa
from guestmem import mman
from guestmem.api import Kvm
from guestmem.errors import GuestAccessFault

from .support import PAGE, raises_errno, require_cap

MMAP_SHARED = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
RW = mman.PROT_READ | mman.PROT_WRITE
RWX = RW | mman.PROT_EXEC


@pytest.mark.parametrize("gmem_flags", [0, u.GUEST_MEMFD_FLAG_MMAP, MMAP_SHARED])
@pytest.mark.parametrize("map_type", [mman.MAP_SHARED, mman.MAP_PRIVATE, mman.MAP_SHARED_VALIDATE])
def test_guest_memfd_cannot_be_mapped_executable(backend: Kvm, gmem_flags: int, map_type: int) -> None:
    """guest_memfd lives on a noexec mount (virt/kvm/guest_memfd.c kvm_gmem_init: MNT_NOEXEC), so
    do_mmap refuses PROT_EXEC with EPERM (mm/mmap.c: ``if (path_noexec(...)) { if (vm_flags &
    VM_EXEC) return -EPERM; ...}``) before the file's own mmap (ENODEV/EINVAL) is asked."""
    require_cap(backend, u.KVM_CAP_GUEST_MEMFD)
    with backend.create_vm() as vm:
        if gmem_flags & ~vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS):
            pytest.skip(f"host lacks guest_memfd flags {gmem_flags:#x}")
        with vm.create_guest_memfd(2 * PAGE, gmem_flags) as g:
            with raises_errno(errno.EPERM):
                backend.mmap(PAGE, RWX, map_type, g)
            if gmem_flags & u.GUEST_MEMFD_FLAG_INIT_SHARED:  # nothing changed: still maps RW
                with backend.mmap(PAGE, RW, mman.MAP_SHARED, g) as m:
                    m.write(0, b"\x01")
                    assert m.read(0, 1) == b"\x01"


def test_guest_memfd_mapping_cannot_become_executable(backend: Kvm) -> None:
    """do_mmap clears VM_MAYEXEC on a noexec file, so mprotect(PROT_EXEC) is EACCES
    (mm/mprotect.c do_mprotect_pkey: a VM_EXEC without VM_MAYEXEC) and the old protection stays."""
    require_cap(backend, u.KVM_CAP_GUEST_MEMFD)
    with backend.create_vm() as vm:
        if MMAP_SHARED & ~vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS):
            pytest.skip("host lacks GUEST_MEMFD_FLAG_MMAP|INIT_SHARED")
        with vm.create_guest_memfd(2 * PAGE, MMAP_SHARED) as g, \
                backend.mmap(2 * PAGE, mman.PROT_READ, mman.MAP_SHARED, g) as m:
            with raises_errno(errno.EACCES):
                m.mprotect(0, PAGE, RWX)
            with pytest.raises(GuestAccessFault):
                m.write(0, b"x")  # still read-only
            m.mprotect(0, PAGE, RW)  # what it may have is still granted
            m.write(0, b"x")
            assert m.read(0, 1) == b"x"


@pytest.mark.parametrize("seal", [fa.F_SEAL_WRITE, fa.F_SEAL_FUTURE_WRITE])
def test_write_sealed_memfd_maps_shared_read_only(backend: Kvm, seal: int) -> None:
    """mm/memfd.c check_write_seal: a write-sealed memfd refuses a shared writable mapping (EPERM)
    and a shared read-only one loses VM_MAYWRITE (mprotect to write: EACCES); a private mapping is
    copy-on-write and unaffected."""
    f = backend.memfd_create(2 * PAGE, fa.MFD_CLOEXEC | fa.MFD_ALLOW_SEALING)
    try:
        f.write(b"\x5a", 0)
        f.fcntl(fa.F_ADD_SEALS, seal)
        with raises_errno(errno.EPERM):
            backend.mmap(PAGE, RW, mman.MAP_SHARED, f)
        with backend.mmap(PAGE, mman.PROT_READ, mman.MAP_SHARED, f) as ro:
            with raises_errno(errno.EACCES):
                ro.mprotect(0, PAGE, RW)
            assert ro.read(0, 1) == b"\x5a"
        with backend.mmap(PAGE, RW, mman.MAP_PRIVATE, f) as cow:
            cow.write(0, b"\x01")
        assert f.read(1, 0) == b"\x5a"  # the file is untouched
    finally:
        f.close()


@pytest.mark.parametrize("shared", [True, False])
def test_collapse_needs_a_whole_huge_page_in_the_mapping(backend: Kvm, shared: bool) -> None:
    """mm/huge_memory.c __thp_vma_allowable_orders: outside a fault, an order is allowed only when
    thp_vma_suitable_order finds a PMD-aligned 2 MiB range inside the VMA; none is, so
    MADV_COLLAPSE on a two-page mapping is EINVAL, anonymous private memory included."""
    flags = (mman.MAP_SHARED if shared else mman.MAP_PRIVATE) | mman.MAP_ANONYMOUS
    with backend.mmap(2 * PAGE, RW, flags) as m:
        m.write(0, b"\x33")
        with raises_errno(errno.EINVAL):
            m.madvise(0, 2 * PAGE, mman.MADV_COLLAPSE)
        assert m.read(0, 1) == b"\x33"


def test_raw_ioctls_nobody_handles(backend: Kvm) -> None:
    """Neither a guest_memfd nor a memfd has an ioctl handler for KVM numbers (ENOTTY); the vCPU
    register ioctls exist on a vCPU only (/dev/kvm: EINVAL, VM: ENOTTY); a KVM number with a known
    nr but another size is no ioctl at all; KVM_GET_REGS into NULL is EFAULT (kvm_vcpu_ioctl
    copies the registers out last)."""
    wrong_size = u._iow(0x49, 8)
    with backend.create_vm() as vm, vm.create_guest_memfd(2 * PAGE, 0) as g:
        f = backend.memfd_create(PAGE)
        vcpu = vm.create_vcpu(0)
        try:
            for obj in (g, f):
                for req in (u.KVM_GET_REGS, wrong_size, u.KVM_CHECK_EXTENSION):
                    with raises_errno(errno.ENOTTY):
                        obj.ioctl(req, 0 if req != wrong_size else bytes(8))
            with raises_errno(errno.EINVAL):
                backend.ioctl(u.KVM_GET_REGS, 0)
            with raises_errno(errno.ENOTTY):
                vm.ioctl(u.KVM_GET_REGS, 0)
            for obj, err in ((backend, errno.EINVAL), (vm, errno.ENOTTY), (vcpu, errno.EINVAL)):
                with raises_errno(err):
                    obj.ioctl(wrong_size, bytes(8))
            with raises_errno(errno.EFAULT):
                vcpu.ioctl(u.KVM_GET_REGS, 0)
            assert vm.check_extension(u.KVM_CAP_USER_MEMORY)  # the fds still work
        finally:
            vcpu.close()
            f.close()


@pytest.mark.parametrize("flags", [mman.MAP_SHARED, mman.MAP_PRIVATE])
def test_dontfork_leaves_a_hole_in_the_child(backend: Kvm, flags: int) -> None:
    """mm/madvise.c: MADV_DONTFORK sets VM_DONTCOPY, which dup_mmap skips, so the child has nothing
    mapped there (SIGSEGV) while the parent keeps it; MADV_DOFORK clears it again."""
    with backend.mmap(3 * PAGE, RW, flags | mman.MAP_ANONYMOUS) as m:
        m.fill(0, 3 * PAGE, 0x11)
        m.madvise(PAGE, PAGE, mman.MADV_DONTFORK)
        with backend.fork() as child:
            assert child.read(m, 0, 1) == b"\x11" and child.read(m, 2 * PAGE, 1) == b"\x11"
            for offset, length in ((PAGE, 1), (PAGE - 1, 2)):
                with pytest.raises(GuestAccessFault) as info:
                    child.read(m, offset, length)
                assert info.value.signal == "SIGSEGV"
        assert m.read(PAGE, 1) == b"\x11"
        m.madvise(0, 3 * PAGE, mman.MADV_DOFORK)
        with backend.fork() as child:
            assert child.read(m, PAGE - 1, 2) == b"\x11\x11"
