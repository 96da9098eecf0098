"""Regressions for what the fuzzer found once it learned the file and mm calls (both backends).

Each test is one finding, shrunk: the order in which ``mprotect``, ``mbind``, ``set_mempolicy``,
``mmap`` and ``sendfile`` apply the integer rule and the kernel's checks, ``mmap``'s offset checks
(anonymous memory has no file position to check).
"""

from __future__ import annotations

import errno

import pytest

from guestmem import mman
from guestmem.api import Kvm

from .support import raises_errno

PS = 4096


def test_mprotect_of_zero_length_succeeds_before_prot_is_checked(backend: Kvm) -> None:
    # do_mprotect_pkey: `if (!len) return 0;` comes before arch_validate_prot.
    m = backend.mmap_anonymous(4 * PS)
    m.mprotect(0, 0, 0x8)
    m.write(0, b"still writable")
    with raises_errno(errno.EINVAL):
        m.mprotect(1, 0, 0x8)  # the start is checked first
    with raises_errno(errno.EINVAL):
        m.mprotect(0, PS, 0x8)
    with raises_errno(errno.ENOMEM):
        m.mprotect(PS, (1 << 64) - PS, mman.PROT_READ)  # end <= start: ENOMEM, not EINVAL


def test_mbind_converts_every_argument_before_any_refusal(backend: Kvm) -> None:
    m = backend.mmap_anonymous(PS)
    with pytest.raises(OverflowError):  # flags is an unsigned int; mode 7 would be EINVAL
        m.mbind(0, PS, 7, 1, 64, 1 << 40)
    with pytest.raises(TypeError):
        m.mbind(0, PS, 7, 1, "64", 0)


def test_set_mempolicy_converts_maxnode_before_the_mode_is_refused(backend: Kvm) -> None:
    with pytest.raises(TypeError):
        backend.set_mempolicy(7, 1, "4096")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        backend.set_mempolicy(mman.MPOL_BIND | mman.MPOL_F_STATIC_NODES, None, 1 << 64)


def test_mmap_integer_rule_comes_before_closed_kvm(backend: Kvm) -> None:
    with pytest.raises(OverflowError):
        backend.mmap(PS, -(1 << 70), mman.MAP_SHARED, None, 0)
    backend.close()
    with pytest.raises(TypeError):
        backend.mmap(PS, 3, mman.MAP_SHARED, None, None)  # type: ignore[arg-type]
    with raises_errno(errno.EBADF):
        backend.mmap(PS, 3, mman.MAP_SHARED, None, 0)


def test_anonymous_mmap_ignores_a_negative_offset(backend: Kvm) -> None:
    # The offset of an anonymous mapping is no file position: file_mmap_ok is not asked, and
    # x86-64's pgoff (the unsigned offset >> 12) plus the length cannot wrap.
    for flags in (mman.MAP_PRIVATE | mman.MAP_ANONYMOUS, mman.MAP_SHARED | mman.MAP_ANONYMOUS):
        m = backend.mmap(PS, 3, flags, None, -PS)
        m.write(0, b"x")
        assert m.read(0, 1) == b"x"
        m.close()


def test_file_mmap_checks_zero_length_before_the_offset(backend: Kvm) -> None:
    f = backend.memfd_create(PS)
    with raises_errno(errno.EINVAL):
        backend.mmap(0, 3, mman.MAP_SHARED, f, -PS)  # do_mmap: !len first
    with raises_errno(errno.EOVERFLOW):
        backend.mmap(PS, 3, mman.MAP_SHARED, f, -PS)  # file_mmap_ok
    with raises_errno(errno.EOVERFLOW):
        backend.mmap(PS, 3, mman.MAP_SHARED, f, (1 << 63) - PS)


def test_sendfile_converts_offset_before_count(backend: Kvm) -> None:
    a, b = backend.memfd_create(PS), backend.memfd_create(PS)
    with pytest.raises(OverflowError):
        a.sendfile(b, -(1 << 63) - 1, [0])  # type: ignore[arg-type]


def test_range_past_2_64_relative_to_a_mapping_is_unmapped_memory(backend: Kvm) -> None:
    # Found by the differential fuzzer: the kernel sees mapping.addr + offset, which does not wrap,
    # so a range "wrapping" relative to the mapping is memory outside it (ENOMEM; EFAULT for
    # mbind), not the EINVAL of `start + len < start`.
    m = backend.mmap_anonymous(4 * PS)
    with raises_errno(errno.ENOMEM):
        m.discard(-PS, 3 * PS)
    with raises_errno(errno.ENOMEM):
        m.madvise((1 << 64) - PS, PS, mman.MADV_DONTNEED)
    with raises_errno(errno.EFAULT):
        m.mbind(-PS, 3 * PS, mman.MPOL_BIND, 1, 64, 0)
    with raises_errno(errno.EINVAL):
        m.discard(0, (1 << 64) - 1)  # PAGE_ALIGN(len) is 0: madvise's own EINVAL
    m.mbind(0, (1 << 64) - 1, mman.MPOL_BIND, 1, 64, 0)  # do_mbind: end == start, nothing to do


def test_mmap_through_a_dup_after_the_original_fd_is_closed(backend: Kvm) -> None:
    """guestmem fuzz (seed 15): a dup keeps the guest_memfd's struct file open after the fd it was
    created with is closed, so mmap through the dup's fd reaches the file's own checks
    (MAP_PRIVATE: EINVAL; MAP_SHARED maps), not EBADF."""
    import guestmem.uapi as u

    from .support import require_cap

    require_cap(backend, u.KVM_CAP_GUEST_MEMFD)
    with backend.create_vm(u.KVM_X86_DEFAULT_VM) as vm:
        flags = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) & u.GUEST_MEMFD_FLAG_MMAP
        if not flags:
            pytest.skip("host lacks GUEST_MEMFD_FLAG_MMAP for DEFAULT VMs")
        size = 3 * u.PAGE_SIZE
        g = vm.create_guest_memfd(size, flags)
        d = g.dup()
        g.close()
        with raises_errno(errno.EINVAL):
            backend.mmap(size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE, d.fd, 0)
        m = backend.mmap(size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED, d.fd, 0)
        m.close()
        d.close()
