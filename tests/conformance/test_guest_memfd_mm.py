"""Host memory management on guest_memfd, memfd and anonymous memory (issue 11 §1b).

``mmap`` with every protection and mapping type, ``mprotect``, ``madvise``, NUMA policy
(``mbind``/``get_mempolicy``/``move_pages``/``set_mempolicy``) and ``fork``, on both backends
with one body each.  Ports of upstream 7.2 ``guest_memfd_test.c``: :func:`test_mbind`,
:func:`test_numa_allocation`, :func:`test_collapse` and :func:`test_mmap_cow` keep upstream's
assertions.  A host access C would take SIGSEGV/SIGBUS on is a ``GuestAccessFault`` here.

The model runs the NUMA tests with two nodes (``ModelOptions.numa_nodes``); on a one-node host
the kernel backend skips what needs two, saying so.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import guestmem
import guestmem.uapi as u
from guestmem import mman
from guestmem.api import Kvm, Mapping, Vm
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Verify, Write

from .support import (
    GMEM_GPA,
    PAGE,
    SZ_2M,
    GuestScript,
    check,
    drive,
    raises_errno,
    require_cap,
    require_vm_type,
)

MMAP = u.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = u.GUEST_MEMFD_FLAG_INIT_SHARED
RW = mman.PROT_READ | mman.PROT_WRITE
GMEM_SIZE = PAGE * 4  # upstream's gmem_test size


@pytest.fixture
def numa_backend(backend: Kvm) -> Iterator[Kvm]:
    """The ``backend`` fixture, except that the model is opened with two NUMA nodes."""
    if backend.backend != "model":
        yield backend
        return
    kvm = guestmem.open("model", numa_nodes=2)
    try:
        yield kvm
    finally:
        kvm.close()


def _gmem_vm(kvm: Kvm, flags: int) -> Vm:
    """A DEFAULT VM whose guest_memfds take ``flags`` (skip naming what the host lacks)."""
    require_cap(kvm, u.KVM_CAP_GUEST_MEMFD_FLAGS)
    vm = require_vm_type(kvm, u.KVM_X86_DEFAULT_VM)
    supported = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
    if flags & ~supported:
        vm.close()
        pytest.skip(f"host lacks guest_memfd flags {flags & ~supported:#x} on a DEFAULT VM")
    return vm


def _require_nodes(kvm: Kvm, n: int) -> None:
    """upstream ``is_multi_numa_node_system``: skip unless ``n`` nodes have memory."""
    nodes = kvm.numa_nodes()
    if len(nodes) < n:
        pytest.skip(f"host has {len(nodes)} NUMA node(s) with memory ({nodes}); the test needs {n}")


def _mappings(kvm: Kvm, vm: Vm, kind: str, prot: int, size: int = 2 * PAGE) -> Mapping:
    """A MAP_SHARED mapping of ``kind``: anonymous memory, a memfd, or a shared guest_memfd."""
    if kind == "anon":
        return kvm.mmap(size, prot, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    if kind == "memfd":
        return kvm.mmap(size, prot, mman.MAP_SHARED, kvm.memfd_create(size))
    return kvm.mmap(size, prot, mman.MAP_SHARED, vm.create_guest_memfd(size, MMAP | INIT_SHARED))


KINDS = ["anon", "memfd", "gmem"]


# --- protections -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_mapping_refuses_writes(backend: Kvm, kind: str) -> None:
    """PROT_READ: loads work, a store is SIGSEGV at the first byte and stores nothing."""
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        rw = _mappings(backend, vm, kind, RW) if kind == "anon" else None
        m = _mappings(backend, vm, kind, mman.PROT_READ)
        assert m.read(0, 2 * PAGE) == bytes(2 * PAGE)
        with pytest.raises(GuestAccessFault) as exc:
            m.write(PAGE + 5, b"xyz")
        assert exc.value.signal == "SIGSEGV" and exc.value.offset == PAGE + 5
        assert m.read(PAGE, PAGE) == bytes(PAGE)
        with pytest.raises(GuestAccessFault):
            m.fill(0, 1, 0xFF)
        m.close()
        if rw is not None:
            rw.close()
        check(vm)


@pytest.mark.parametrize("kind", KINDS)
def test_prot_none_refuses_every_access(backend: Kvm, kind: str) -> None:
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        m = _mappings(backend, vm, kind, mman.PROT_NONE)
        for access in (lambda: m.read(0, 1), lambda: m.write(PAGE, b"a"), lambda: m.fill(0, PAGE, 1)):
            with pytest.raises(GuestAccessFault) as exc:
                access()
            assert exc.value.signal == "SIGSEGV"
        m.close()


@pytest.mark.parametrize("kind", KINDS)
def test_mprotect_changes_access_and_keeps_contents(backend: Kvm, kind: str) -> None:
    """RW -> READ on the second page -> RW again; a store stops at the read-only page after
    storing the bytes before it (as a CPU loop would); contents survive every change."""
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        m = _mappings(backend, vm, kind, RW)
        m.fill(0, 2 * PAGE, 0x11)
        m.mprotect(PAGE, PAGE, mman.PROT_READ)
        with pytest.raises(GuestAccessFault) as exc:
            m.write(PAGE - 4, b"\x22" * 8)
        assert exc.value.signal == "SIGSEGV" and exc.value.offset == PAGE
        assert m.read(PAGE - 4, 8) == b"\x22" * 4 + b"\x11" * 4
        m.mprotect(0, 2 * PAGE, mman.PROT_NONE)
        with pytest.raises(GuestAccessFault):
            m.read(0, 1)
        m.mprotect(0, 2 * PAGE, RW)
        m.write(PAGE, b"\x33")
        assert m.read(PAGE - 1, 2) == b"\x22\x33"
        m.close()


def test_mprotect_hostile(backend: Kvm) -> None:
    """EINVAL for an unaligned start or unknown bits, ENOMEM past the mapping, 0 does nothing;
    a refused call changes no protection."""
    m = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    with raises_errno(errno.EINVAL):
        m.mprotect(1, PAGE, mman.PROT_READ)
    with raises_errno(errno.EINVAL):
        m.mprotect(0, PAGE, 0x10)
    with raises_errno(errno.ENOMEM):
        m.mprotect(0, 3 * PAGE, mman.PROT_READ)
    m.mprotect(0, 0, mman.PROT_NONE)
    m.write(0, b"still writable")
    with pytest.raises(TypeError):
        m.mprotect(0, PAGE, "r")  # type: ignore[arg-type]
    m.close()
    with raises_errno(errno.EBADF):
        m.mprotect(0, PAGE, mman.PROT_READ)


# --- mmap flags and offsets ------------------------------------------------------------------------------


def test_mmap_cow(backend: Kvm) -> None:
    """upstream test_mmap_cow: MAP_PRIVATE of a guest_memfd fails (with or without INIT_SHARED)."""
    with _gmem_vm(backend, MMAP) as vm:
        for flags in (MMAP, MMAP | INIT_SHARED):
            supported = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
            if flags & ~supported:
                continue
            gmem = vm.create_guest_memfd(GMEM_SIZE, flags)
            with raises_errno(errno.EINVAL):
                backend.mmap(GMEM_SIZE, RW, mman.MAP_PRIVATE, gmem)
            gmem.close()


def test_mmap_private_memfd_is_copy_on_write(backend: Kvm) -> None:
    """A MAP_PRIVATE memfd mapping reads the file until it writes a page; its writes stay its
    own; MADV_DONTNEED drops them (it sees the file again); MADV_REMOVE is EACCES."""
    f = backend.memfd_create(2 * PAGE)
    shared = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED, f)
    private = backend.mmap(2 * PAGE, RW, mman.MAP_PRIVATE, f)
    shared.write(0, b"file")
    assert private.read(0, 4) == b"file"
    private.write(0, b"mine")
    assert shared.read(0, 4) == b"file" and private.read(0, 4) == b"mine"
    shared.write(0, b"FILE")
    assert private.read(0, 4) == b"mine"  # a copied page no longer follows the file
    shared.write(PAGE, b"next")
    assert private.read(PAGE, 4) == b"next"  # an uncopied one does
    with raises_errno(errno.EACCES):
        private.madvise(0, PAGE, mman.MADV_REMOVE)
    assert private.read(0, 4) == b"mine"
    private.madvise(0, PAGE, mman.MADV_DONTNEED)
    assert private.read(0, 4) == b"FILE"
    private.close()
    shared.close()
    f.close()


def test_mmap_private_anonymous(backend: Kvm) -> None:
    """Private anonymous memory: zero-filled, DONTNEED zeroes it again, REMOVE is EINVAL."""
    m = backend.mmap(2 * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    assert m.read(0, 2 * PAGE) == bytes(2 * PAGE)
    m.fill(0, 2 * PAGE, 0x5A)
    with raises_errno(errno.EINVAL):
        m.madvise(0, PAGE, mman.MADV_REMOVE)
    assert m.read(0, 1) == b"\x5a"
    m.madvise(0, PAGE, mman.MADV_DONTNEED)
    assert m.read(0, PAGE) == bytes(PAGE) and m.read(PAGE, 1) == b"\x5a"
    m.close()


def test_mmap_file_offset(backend: Kvm) -> None:
    """A mapping at a file offset sees the file from there; past the file's end is SIGBUS."""
    f = backend.memfd_create(2 * PAGE)
    whole = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED, f)
    whole.fill(PAGE, PAGE, 0x77)
    tail = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED, f, PAGE)
    assert tail.read(0, PAGE) == b"\x77" * PAGE
    with pytest.raises(GuestAccessFault) as exc:
        tail.read(PAGE, 1)
    assert exc.value.signal == "SIGBUS" and exc.value.offset == PAGE
    tail.close()
    whole.close()
    f.close()


def test_mmap_hostile(backend: Kvm) -> None:
    """The kernel's order: unaligned offset EINVAL, closed fd EBADF, length 0 EINVAL, no mapping
    type EINVAL, unknown flags under MAP_SHARED_VALIDATE EOPNOTSUPP, guest_memfd without MMAP
    ENODEV; MAP_FIXED only through Mapping.mmap_fixed; wrong types are TypeError."""
    f = backend.memfd_create(PAGE)
    with raises_errno(errno.EINVAL):
        backend.mmap(PAGE, RW, mman.MAP_SHARED, f, 1)
    with raises_errno(errno.EINVAL):
        backend.mmap(0, RW, mman.MAP_SHARED, f)
    with raises_errno(errno.EINVAL):
        backend.mmap(PAGE, RW, 0, f)
    with raises_errno(errno.EINVAL):
        backend.mmap(PAGE, RW, mman.MAP_SHARED_VALIDATE | mman.MAP_ANONYMOUS)
    with raises_errno(errno.EOPNOTSUPP):
        backend.mmap(PAGE, RW, mman.MAP_SHARED_VALIDATE | mman.MAP_SYNC, f)
    with pytest.raises(ValueError):
        backend.mmap(PAGE, RW, mman.MAP_SHARED | mman.MAP_FIXED, f)
    with pytest.raises(TypeError):
        backend.mmap(PAGE, RW, mman.MAP_SHARED, "fd")  # type: ignore[arg-type]
    f.close()
    with raises_errno(errno.EBADF):
        backend.mmap(PAGE, RW, mman.MAP_SHARED, f)
    with _gmem_vm(backend, MMAP) as vm:
        gmem = vm.create_guest_memfd(PAGE, 0)
        with raises_errno(errno.ENODEV):
            backend.mmap(PAGE, RW, mman.MAP_SHARED, gmem)
        gmem.close()


def test_mmap_fixed_inside_a_reservation(backend: Kvm) -> None:
    """Reserve PROT_NONE, map a memfd MAP_FIXED in the middle: the reservation's range reaches
    it; its unmap leaves a hole (SIGSEGV); unmapping the reservation takes it along."""
    f = backend.memfd_create(PAGE)
    res = backend.mmap(4 * PAGE, mman.PROT_NONE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    with raises_errno(errno.EINVAL):
        res.mmap_fixed(1, PAGE, RW, mman.MAP_SHARED, f)
    with pytest.raises(ValueError):
        res.mmap_fixed(3 * PAGE, 2 * PAGE, RW, mman.MAP_SHARED, f)
    inner = res.mmap_fixed(PAGE, PAGE, RW, mman.MAP_SHARED, f)
    assert inner.addr == res.addr + PAGE
    res.write(PAGE + 1, b"via reservation")
    assert inner.read(1, 15) == b"via reservation"
    with pytest.raises(GuestAccessFault) as exc:
        res.read(0, 1)
    assert exc.value.signal == "SIGSEGV"
    inner.close()
    with pytest.raises(GuestAccessFault) as exc:
        res.read(PAGE, 1)
    assert exc.value.signal == "SIGSEGV"
    again = res.mmap_fixed(PAGE, PAGE, mman.PROT_READ, mman.MAP_SHARED, f)
    assert res.read(PAGE + 1, 3) == b"via"
    res.close()
    with raises_errno(errno.EBADF):
        again.read(0, 1)
    f.close()


# --- madvise ---------------------------------------------------------------------------------------------


def test_madvise_dontneed_shared_keeps_contents(backend: Kvm) -> None:
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        for kind in KINDS:
            m = _mappings(backend, vm, kind, RW)
            m.fill(0, 2 * PAGE, 0x42)
            m.madvise(0, 2 * PAGE, mman.MADV_DONTNEED)
            assert m.read(0, 2 * PAGE) == b"\x42" * 2 * PAGE, kind
            m.madvise(0, 2 * PAGE, mman.MADV_REMOVE)
            assert m.read(0, 2 * PAGE) == bytes(2 * PAGE), kind
            m.close()
        check(vm)


def test_madvise_populate(backend: Kvm) -> None:
    """POPULATE_READ/WRITE fault pages in: fine on a shared guest_memfd; EFAULT where a CPU
    access would SIGBUS (no INIT_SHARED); EINVAL where the protection forbids the access."""
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        gmem = vm.create_guest_memfd(GMEM_SIZE, MMAP | INIT_SHARED)
        m = backend.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)
        m.madvise(0, GMEM_SIZE, mman.MADV_POPULATE_WRITE)
        m.madvise(0, GMEM_SIZE, mman.MADV_POPULATE_READ)
        assert m.page_nodes(0, 4) == [backend.numa_nodes()[0]] * 4
        ro = backend.mmap(GMEM_SIZE, mman.PROT_READ, mman.MAP_SHARED, gmem)
        with raises_errno(errno.EINVAL):
            ro.madvise(0, PAGE, mman.MADV_POPULATE_WRITE)
        ro.madvise(0, PAGE, mman.MADV_POPULATE_READ)
        none = backend.mmap(GMEM_SIZE, mman.PROT_NONE, mman.MAP_SHARED, gmem)
        with raises_errno(errno.EINVAL):
            none.madvise(0, PAGE, mman.MADV_POPULATE_READ)
        private = vm.create_guest_memfd(GMEM_SIZE, MMAP)
        pm = backend.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, private)
        for advice in (mman.MADV_POPULATE_READ, mman.MADV_POPULATE_WRITE):
            with raises_errno(errno.EFAULT):
                pm.madvise(0, PAGE, advice)
        assert pm.page_nodes(0, 1) == [-errno.ENOENT]
        for x in (m, ro, none, pm):
            x.close()
        check(vm)


def test_madvise_hostile(backend: Kvm) -> None:
    m = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    m.fill(0, 2 * PAGE, 0x99)
    with raises_errno(errno.EINVAL):
        m.madvise(1, PAGE, mman.MADV_REMOVE)
    with raises_errno(errno.EINVAL):
        m.madvise(0, PAGE, 12345)
    with raises_errno(errno.ENOMEM):
        m.madvise(0, 3 * PAGE, mman.MADV_REMOVE)
    m.madvise(0, 0, mman.MADV_REMOVE)
    assert m.read(0, 2 * PAGE) == b"\x99" * 2 * PAGE  # nothing was removed
    m.close()
    with raises_errno(errno.EBADF):
        m.madvise(0, PAGE, mman.MADV_DONTNEED)


@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED], ids=["mmap", "mmap-init-shared"])
def test_collapse(backend: Kvm, flags: int) -> None:
    """upstream test_collapse: map a PMD-sized guest_memfd at a PMD-aligned address inside a
    PROT_NONE reservation (MAP_FIXED), read every page, MADV_HUGEPAGE is fine, MADV_COLLAPSE is
    EINVAL (no huge mapping past shared ranges), MADV_DONTNEED and a re-read are fine.
    upstream runs it with INIT_SHARED only (the reads need it); without, the madvise calls
    must answer the same."""
    pmd = SZ_2M
    with _gmem_vm(backend, flags) as vm:
        gmem = vm.create_guest_memfd(pmd, flags)
        reserved = backend.mmap(pmd * 2, mman.PROT_NONE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
        aligned = -(-reserved.addr // pmd) * pmd
        mem = reserved.mmap_fixed(aligned - reserved.addr, pmd, RW, mman.MAP_SHARED, gmem, 0)
        assert mem.addr % pmd == 0, "Userspace address must be aligned to PMD size."
        if flags & INIT_SHARED:
            for i in range(0, pmd, PAGE):
                mem.read(i, 1)
        mem.madvise(0, pmd, mman.MADV_HUGEPAGE)
        with raises_errno(errno.EINVAL):
            mem.madvise(0, pmd, mman.MADV_COLLAPSE)
        mem.madvise(0, pmd, mman.MADV_DONTNEED)
        if flags & INIT_SHARED:
            assert mem.read(0, 1) == b"\x00"
        reserved.close()
        gmem.close()
        check(vm)


# --- NUMA -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED], ids=["mmap", "mmap-init-shared"])
def test_mbind(numa_backend: Kvm, flags: int) -> None:
    """upstream test_mbind, with upstream's assertions.  Upstream returns early on a one-node
    host; its assertions only name node 0, so here it runs on any host with CONFIG_NUMA."""
    kvm = numa_backend
    nodemask_0 = 1
    maxnode = 64
    with _gmem_vm(kvm, flags) as vm:
        gmem = vm.create_guest_memfd(GMEM_SIZE, flags)
        mem = kvm.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)

        mem.mbind(0, PAGE * 2, mman.MPOL_INTERLEAVE, nodemask_0, maxnode, 0)
        assert mem.get_mempolicy(0, mman.MPOL_F_ADDR) == (mman.MPOL_INTERLEAVE, nodemask_0)

        mem.mbind(PAGE * 2, PAGE * 2, mman.MPOL_BIND, nodemask_0, maxnode, 0)
        assert mem.get_mempolicy(PAGE * 2, mman.MPOL_F_ADDR) == (mman.MPOL_BIND, nodemask_0)

        mem.mbind(0, GMEM_SIZE, mman.MPOL_DEFAULT, None, 0, 0)
        assert mem.get_mempolicy(0, mman.MPOL_F_ADDR) == (mman.MPOL_DEFAULT, 0)

        with raises_errno(errno.EINVAL):
            mem.mbind(0, PAGE, 999, nodemask_0, maxnode, 0)
        mem.close()
        gmem.close()


def test_mbind_hostile(numa_backend: Kvm) -> None:
    """Each refusal with the kernel's errno, and the policy left as it was."""
    kvm = numa_backend
    with _gmem_vm(kvm, MMAP | INIT_SHARED) as vm:
        gmem = vm.create_guest_memfd(GMEM_SIZE, MMAP | INIT_SHARED)
        mem = kvm.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)
        mem.mbind(0, GMEM_SIZE, mman.MPOL_BIND, 1, 64)
        bad = [
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_MAX, 1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, -1, 1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND | mman.MPOL_F_STATIC_NODES
                                             | mman.MPOL_F_RELATIVE_NODES, 1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_INTERLEAVE | mman.MPOL_F_NUMA_BALANCING,
                                             1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND, 1, PAGE * 8 + 2)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND, 1 << 2000, 4096)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND, 1, 64, 1 << 5)),
            (errno.EINVAL, lambda: mem.mbind(1, PAGE, mman.MPOL_BIND, 1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_DEFAULT, 1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND, 0, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND, None, 0)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_LOCAL, 1, 64)),
            (errno.EINVAL, lambda: mem.mbind(0, PAGE, mman.MPOL_BIND, 1 << 1000, 1024)),  # offline
            (errno.EFAULT, lambda: mem.mbind(0, GMEM_SIZE + PAGE, mman.MPOL_INTERLEAVE, 1, 64)),
        ]
        for err, call in bad:
            with raises_errno(err):
                call()
            assert mem.get_mempolicy(0) == (mman.MPOL_BIND, 1)
        mem.mbind(0, 0, mman.MPOL_INTERLEAVE, 1, 64)  # empty: nothing
        assert mem.get_mempolicy(0) == (mman.MPOL_BIND, 1)
        with raises_errno(errno.EINVAL):
            mem.get_mempolicy(0, mman.MPOL_F_ADDR | mman.MPOL_F_MEMS_ALLOWED)
        with raises_errno(errno.EINVAL):
            mem.get_mempolicy(0, 1 << 7)
        with raises_errno(errno.EFAULT):
            mem.get_mempolicy(GMEM_SIZE)
        mem.mbind(0, PAGE, mman.MPOL_PREFERRED, None, 0)  # empty PREFERRED means local
        assert mem.get_mempolicy(0) == (mman.MPOL_LOCAL, 0)
        mem.close()
        with raises_errno(errno.EBADF):
            mem.mbind(0, PAGE, mman.MPOL_BIND, 1, 64)


def test_get_mempolicy_node(numa_backend: Kvm) -> None:
    """MPOL_F_NODE|MPOL_F_ADDR faults the page in and names its node; where the fault would
    SIGBUS (no INIT_SHARED) it is EFAULT."""
    kvm = numa_backend
    with _gmem_vm(kvm, MMAP | INIT_SHARED) as vm:
        node0 = kvm.numa_nodes()[0]
        gmem = vm.create_guest_memfd(GMEM_SIZE, MMAP | INIT_SHARED)
        mem = kvm.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)
        assert mem.page_nodes(0, 1) == [-errno.ENOENT]
        mem.mbind(0, PAGE, mman.MPOL_BIND, 1 << node0, 64)
        assert mem.get_mempolicy(0, mman.MPOL_F_NODE | mman.MPOL_F_ADDR) == (node0, 1 << node0)
        assert mem.page_nodes(0, 1) == [node0]
        mem.mbind(0, PAGE, mman.MPOL_BIND, 1 << node0, 64, mman.MPOL_MF_STRICT)  # in place: fine
        private = vm.create_guest_memfd(GMEM_SIZE, MMAP)
        pm = kvm.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, private)
        with raises_errno(errno.EFAULT):
            pm.get_mempolicy(0, mman.MPOL_F_NODE | mman.MPOL_F_ADDR)
        mem.close()
        pm.close()


def test_numa_allocation(numa_backend: Kvm) -> None:
    """upstream test_numa_allocation, with upstream's assertions: a policy set after a page is
    allocated does not move it; one set before places it; after a punch the new policy wins."""
    kvm = numa_backend
    _require_nodes(kvm, 2)
    node0_mask, node1_mask, maxnode = 1, 2, 8
    with _gmem_vm(kvm, MMAP | INIT_SHARED) as vm:
        gmem = vm.create_guest_memfd(GMEM_SIZE, MMAP | INIT_SHARED)
        mem = kvm.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)

        mem.fill(0, PAGE, 0xAA)
        mem.mbind(0, PAGE, mman.MPOL_BIND, node0_mask, maxnode, 0)
        gmem.punch_hole(0, PAGE)

        mem.mbind(0, PAGE * 2, mman.MPOL_BIND, node1_mask, maxnode, 0)
        mem.mbind(PAGE * 2, PAGE * 2, mman.MPOL_BIND, node0_mask, maxnode, 0)
        mem.fill(0, GMEM_SIZE, 0xAA)
        assert mem.page_nodes(0, 4) == [1, 1, 0, 0]

        gmem.punch_hole(0, GMEM_SIZE)
        mem.mbind(0, PAGE * 2, mman.MPOL_BIND, node0_mask, maxnode, 0)
        mem.mbind(PAGE * 2, PAGE * 2, mman.MPOL_BIND, node1_mask, maxnode, 0)
        mem.fill(0, GMEM_SIZE, 0xAA)
        assert mem.page_nodes(0, 4) == [0, 0, 1, 1]
        mem.close()
        gmem.close()
        check(vm)


def test_set_mempolicy(numa_backend: Kvm) -> None:
    """The task policy places pages whose file has no policy; the file's policy wins over it.
    Hostile modes are EINVAL and change nothing."""
    kvm = numa_backend
    with raises_errno(errno.EINVAL):
        kvm.set_mempolicy(999, 1, 64)
    with raises_errno(errno.EINVAL):
        kvm.set_mempolicy(mman.MPOL_BIND, 0, 64)
    with raises_errno(errno.EINVAL):
        kvm.set_mempolicy(mman.MPOL_DEFAULT, 1, 64)
    _require_nodes(kvm, 2)
    try:
        kvm.set_mempolicy(mman.MPOL_BIND, 2, 64)
        m = kvm.mmap(2 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
        m.mbind(PAGE, PAGE, mman.MPOL_BIND, 1, 64)
        m.fill(0, 2 * PAGE, 1)
        assert m.page_nodes(0, 2) == [1, 0]
        m.close()
    finally:
        kvm.set_mempolicy(mman.MPOL_DEFAULT, None, 0)


# --- fork ---------------------------------------------------------------------------------------


def test_fork_shares_map_shared_and_copies_map_private(backend: Kvm) -> None:
    f = backend.memfd_create(PAGE)
    shared = backend.mmap(PAGE, RW, mman.MAP_SHARED, f)
    private = backend.mmap(PAGE, RW, mman.MAP_PRIVATE, f)
    anon = backend.mmap(PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    shared.write(0, b"before")
    private.write(0, b"parent")
    anon.write(0, b"anon-p")
    with backend.fork() as child:
        late = backend.mmap(PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
        assert child.read(shared, 0, 6) == b"before"
        assert child.read(private, 0, 6) == b"parent" and child.read(anon, 0, 6) == b"anon-p"
        child.write(shared, 0, b"child!")
        assert shared.read(0, 6) == b"child!"
        child.write(private, 0, b"c-priv")
        child.write(anon, 0, b"anon-c")
        assert private.read(0, 6) == b"parent" and anon.read(0, 6) == b"anon-p"
        private.write(0, b"p-late")
        assert child.read(private, 0, 6) == b"c-priv"
        with pytest.raises(GuestAccessFault):
            child.read(late, 0, 1)
        with pytest.raises(TypeError):
            child.read(b"not a mapping", 0, 1)  # type: ignore[arg-type]
        late.close()
    with pytest.raises(KvmError):
        child.read(shared, 0, 1)
    assert shared.read(0, 6) == b"child!"
    for m in (shared, private, anon):
        m.close()
    f.close()


def test_fork_child_faults_like_the_parent(backend: Kvm) -> None:
    """Protections and SIGBUS carry into the child: it gets the same clean errors."""
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        ro = backend.mmap(PAGE, mman.PROT_READ, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
        private = vm.create_guest_memfd(GMEM_SIZE, MMAP)
        pm = backend.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, private)
        with backend.fork() as child:
            with pytest.raises(GuestAccessFault) as exc:
                child.write(ro, 0, b"x")
            assert exc.value.signal == "SIGSEGV"
            with pytest.raises(GuestAccessFault) as exc:
                child.read(pm, 0, 1)
            assert exc.value.signal == "SIGBUS"
            assert child.read(ro, 0, 4) == bytes(4)
        ro.close()
        pm.close()


def test_fork_child_writes_guest_sees(backend: Kvm) -> None:
    """A forked child writes through its copy of a shared guest_memfd mapping; the guest (a
    GMEM_ONLY slot) reads it and writes back; the parent and the child both see the guest's."""
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        gmem = vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)
        mem = backend.mmap(PAGE, RW, mman.MAP_SHARED, gmem)
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GMEM_GPA, PAGE, mem.addr,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        with backend.fork() as child:
            child.fill(mem, 0, PAGE, 0xAB)
            vcpu = vm.create_vcpu(0)
            drive(vm, vcpu, GuestScript()(Verify(GMEM_GPA, PAGE, 0xAB), Write(GMEM_GPA, PAGE, 0xCD)))
            assert mem.read(0, PAGE) == b"\xcd" * PAGE
            assert child.read(mem, 0, PAGE) == b"\xcd" * PAGE
            vcpu.close()
        check(vm)
        mem.close()
        gmem.close()


# --- what the guest sees of host mappings --------------------------------------------------------


def test_guest_writes_through_a_private_mapping(backend: Kvm) -> None:
    """A memslot over a MAP_PRIVATE memfd mapping: the guest reads the file, its write makes a
    private copy (the file and shared mappings keep theirs), a page it never wrote still
    follows the file."""
    vm = require_vm_type(backend, u.KVM_X86_DEFAULT_VM)
    f = backend.memfd_create(4 * PAGE)
    shared = backend.mmap(4 * PAGE, RW, mman.MAP_SHARED, f)
    private = backend.mmap(4 * PAGE, RW, mman.MAP_PRIVATE, f)
    shared.fill(0, 4 * PAGE, 0x07)
    vm.set_user_memory_region(10, 0, GMEM_GPA, 4 * PAGE, private.addr)
    vcpu = vm.create_vcpu(0)
    drive(vm, vcpu, GuestScript()(Verify(GMEM_GPA, 8, 0x07), Write(GMEM_GPA, 8, 0x09),
                                  Verify(GMEM_GPA + PAGE, 8, 0x07)))
    assert shared.read(0, 1) == b"\x07" and private.read(0, 1) == b"\x09"
    shared.fill(PAGE, PAGE, 0x08)
    drive(vm, vcpu, GuestScript()(Verify(GMEM_GPA + PAGE, 8, 0x08), Verify(GMEM_GPA, 8, 0x09)))
    check(vm)
    vcpu.close()
    vm.close()
    private.close()
    shared.close()
    f.close()


@pytest.mark.parametrize("prot,access", [(mman.PROT_READ, "write"), (mman.PROT_NONE, "read")])
def test_guest_access_the_host_protection_forbids(backend: Kvm, request: pytest.FixtureRequest,
                                                  prot: int, access: str) -> None:
    """upstream 7.2: hva_to_pfn cannot get the page (GUP refuses the access), so
    kvm_handle_error_pfn makes KVM_RUN fail with EFAULT.  A read of a PROT_READ page works.
    mprotect after the guest mapped the page must take effect (MMU notifier)."""
    if backend.backend == "kernel":
        request.applymarker(pytest.mark.xfail(
            strict=False, reason="this host runs guests in KVM's instruction emulator, which turns "
                                 "a failed guest-memory access into an MMIO exit instead of EFAULT"))
    vm = require_vm_type(backend, u.KVM_X86_DEFAULT_VM)
    mem = backend.mmap(4 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    vm.set_user_memory_region(10, 0, GMEM_GPA, 4 * PAGE, mem.addr)
    vcpu = vm.create_vcpu(0)
    drive(vm, vcpu, GuestScript()(Write(GMEM_GPA, 8, 1)))  # mapped writable first
    mem.mprotect(0, 4 * PAGE, prot)
    if prot & mman.PROT_READ:
        drive(vm, vcpu, GuestScript()(Verify(GMEM_GPA, 8, 1)))
    op = Write(GMEM_GPA, 8, 2) if access == "write" else Verify(GMEM_GPA, 8, 1)
    with raises_errno(errno.EFAULT):
        drive(vm, vcpu, GuestScript()(op))
    mem.mprotect(0, 4 * PAGE, RW)
    assert mem.read(0, 8) == b"\x01" * 8
    vcpu.close()
    vm.close()
    mem.close()


def test_pin_of_a_prot_none_page_faults(backend: Kvm) -> None:
    """A pin takes the pages as a read would: PROT_NONE is SIGSEGV at the first such page."""
    m = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    m.mprotect(PAGE, PAGE, mman.PROT_NONE)
    with m.pin(0, PAGE):
        pass
    with pytest.raises(GuestAccessFault) as exc, m.pin(0, 2 * PAGE):
        pass
    assert exc.value.signal == "SIGSEGV" and exc.value.offset == PAGE
    m.close()


def test_mbind_on_private_mappings(numa_backend: Kvm) -> None:
    """A MAP_PRIVATE memfd mapping's mbind sets the file's shared policy (shmem's set_policy
    serves every mapping), so a shared mapping of the file reports it; private anonymous
    memory keeps a policy per range of the mapping."""
    kvm = numa_backend
    node0 = 1 << kvm.numa_nodes()[0]
    f = kvm.memfd_create(2 * PAGE)
    shared = kvm.mmap(2 * PAGE, RW, mman.MAP_SHARED, f)
    private = kvm.mmap(2 * PAGE, RW, mman.MAP_PRIVATE, f)
    private.mbind(0, 2 * PAGE, mman.MPOL_BIND, node0, 64)
    assert shared.get_mempolicy(0) == private.get_mempolicy(PAGE) == (mman.MPOL_BIND, node0)
    anon = kvm.mmap(2 * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    anon.mbind(0, PAGE, mman.MPOL_INTERLEAVE, node0, 64)
    assert anon.get_mempolicy(0) == (mman.MPOL_INTERLEAVE, node0)
    assert anon.get_mempolicy(PAGE) == (mman.MPOL_DEFAULT, 0)
    for m in (shared, private, anon):
        m.close()
    f.close()


def test_wrong_types_raise_before_anything_changes(backend: Kvm) -> None:
    """Every new call takes its integers by the C rule: a non-integer is TypeError, a negative
    nodemask OverflowError, and the mapping, its protection and its policy stay as they were."""
    m = backend.mmap(2 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    m.write(0, b"kept")
    calls = [
        (TypeError, lambda: backend.mmap("4096")),  # type: ignore[arg-type]
        (TypeError, lambda: backend.mmap(PAGE, 1.0)),  # type: ignore[arg-type]
        (TypeError, lambda: backend.mmap(PAGE, RW, None)),  # type: ignore[arg-type]
        (TypeError, lambda: m.mprotect(0, PAGE, None)),  # type: ignore[arg-type]
        (TypeError, lambda: m.madvise(0, PAGE, "MADV_REMOVE")),  # type: ignore[arg-type]
        (TypeError, lambda: m.madvise(0.0, PAGE, mman.MADV_REMOVE)),  # type: ignore[arg-type]
        (TypeError, lambda: m.mbind(0, PAGE, mman.MPOL_BIND, "1", 64)),  # type: ignore[arg-type]
        (OverflowError, lambda: m.mbind(0, PAGE, mman.MPOL_BIND, -1, 64)),
        (TypeError, lambda: m.mbind(0, PAGE, 2.0, 1, 64)),  # type: ignore[arg-type]
        (TypeError, lambda: m.get_mempolicy("0")),  # type: ignore[arg-type]
        (TypeError, lambda: m.page_nodes(0, None)),  # type: ignore[arg-type]
        (TypeError, lambda: m.mmap_fixed("0", PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)),  # type: ignore[arg-type]
        (TypeError, lambda: backend.set_mempolicy("bind")),  # type: ignore[arg-type]
    ]
    for exc, call in calls:
        with pytest.raises(exc):
            call()
    assert m.read(0, 4) == b"kept"
    m.write(PAGE, b"w")
    assert m.get_mempolicy(0) == (mman.MPOL_DEFAULT, 0)
    m.close()


def test_page_nodes_sees_this_mappings_ptes(backend: Kvm) -> None:
    """move_pages walks the process's page tables: a page is reported only where this mapping
    faulted it in; another mapping of the same file, MADV_DONTNEED, an fallocate'd page never
    touched, and a hole punch all read -ENOENT.  (Checked against the kernel.)"""
    with _gmem_vm(backend, MMAP | INIT_SHARED) as vm:
        node0 = backend.numa_nodes()[0]
        gmem = vm.create_guest_memfd(GMEM_SIZE, MMAP | INIT_SHARED)
        a = backend.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)
        b = backend.mmap(GMEM_SIZE, RW, mman.MAP_SHARED, gmem)
        a.fill(0, 2 * PAGE, 1)
        assert a.page_nodes(0, 4) == [node0, node0, -errno.ENOENT, -errno.ENOENT]
        assert b.page_nodes(0, 4) == [-errno.ENOENT] * 4
        a.madvise(0, PAGE, mman.MADV_DONTNEED)
        assert a.page_nodes(0, 2) == [-errno.ENOENT, node0]
        gmem.allocate(3 * PAGE, PAGE)
        assert a.page_nodes(3 * PAGE, 1) == [-errno.ENOENT]
        b.read(PAGE, 1)
        gmem.punch_hole(PAGE, PAGE)
        assert b.page_nodes(0, 2) == [-errno.ENOENT] * 2
        assert a.page_nodes(GMEM_SIZE, 1) == [-errno.EFAULT]
        f = backend.memfd_create(2 * PAGE)
        p = backend.mmap(2 * PAGE, RW, mman.MAP_PRIVATE, f)
        p.read(0, 1)
        p.write(PAGE, b"x")
        assert p.page_nodes(0, 2) == [node0, node0]
        p.madvise(0, 2 * PAGE, mman.MADV_DONTNEED)
        assert p.page_nodes(0, 2) == [-errno.ENOENT] * 2
        for m in (a, b, p):
            m.close()
        f.close()
        gmem.close()
