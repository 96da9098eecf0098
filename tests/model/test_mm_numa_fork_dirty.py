"""Model-only checks of issue 11 §1b's machinery, where the kernel backend cannot look inside:
NUMA placement by pfn range, interleaving, frame accounting across private mappings, fork and
exit, and dirty logging's 4 KiB-only rule on a slot that was mapped huge."""

from __future__ import annotations

import pytest

import guestmem
import guestmem.uapi as u
from guestmem import mman
from guestmem.guest.ops import Program, Write
from guestmem.model.options import ModelOptions

PAGE = u.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
SZ_2M = u.HPAGE_2M


def test_numa_nodes_option_bounds() -> None:
    for bad in (0, 65):
        with pytest.raises(ValueError):
            ModelOptions.from_kwargs(numa_nodes=bad)
    with pytest.raises(TypeError):
        ModelOptions.from_kwargs(numa_nodes="2")


def test_node_is_the_frame_range() -> None:
    kvm = guestmem.open("model", numa_nodes=4)
    pool = kvm.pool
    assert kvm.numa_nodes() == [0, 1, 2, 3]
    assert [pool.node_of(n * pool.node_pages) for n in range(4)] == [0, 1, 2, 3]
    assert pool.node_of(pool.node_pages - 1) == 0
    kvm.close()


def test_interleave_alternates_nodes_and_default_is_local() -> None:
    kvm = guestmem.open("model", numa_nodes=2)
    vm = kvm.create_vm()
    gmem = vm.create_guest_memfd(8 * PAGE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    mem = kvm.mmap(8 * PAGE, RW, mman.MAP_SHARED, gmem)
    mem.mbind(0, 4 * PAGE, mman.MPOL_INTERLEAVE, 0b11, 64)
    mem.fill(0, 8 * PAGE, 1)
    nodes = mem.page_nodes(0, 8)
    assert sorted(nodes[:4]) == [0, 0, 1, 1] and nodes[0] != nodes[1]
    assert nodes[4:] == [0, 0, 0, 0]  # no policy: the local node
    kvm.set_mempolicy(mman.MPOL_PREFERRED, 0b10, 64)
    anon = kvm.mmap(PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    anon.fill(0, PAGE, 1)
    assert anon.page_nodes(0, 1) == [1]
    kvm.set_mempolicy(mman.MPOL_DEFAULT)
    vm.check_invariants()
    kvm.close()


def test_private_mappings_fork_and_exit_conserve_frames() -> None:
    kvm = guestmem.open("model")
    vm = kvm.create_vm()
    before = kvm.pool.allocated
    f = kvm.memfd_create(4 * PAGE)
    shared = kvm.mmap(4 * PAGE, RW, mman.MAP_SHARED, f)
    private = kvm.mmap(4 * PAGE, RW, mman.MAP_PRIVATE, f)
    anon = kvm.mmap(4 * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    shared.fill(0, 4 * PAGE, 1)
    private.fill(0, 2 * PAGE, 2)
    anon.fill(0, 4 * PAGE, 3)
    assert kvm.pool.allocated - before == 4 + 2 + 4
    child = kvm.fork()
    assert kvm.pool.allocated - before == 2 * (2 + 4) + 4  # the child's own copies
    child.write(private, 2 * PAGE, b"x")  # a new copy, in the child only
    assert kvm.pool.allocated - before == 2 * (2 + 4) + 4 + 1
    vm.check_invariants()
    child.exit()
    assert kvm.pool.allocated - before == 4 + 2 + 4
    for m in (shared, private, anon):
        m.close()
    f.close()
    vm.check_invariants()
    assert kvm.pool.allocated == before
    kvm.close()


def test_dirty_logging_maps_small_and_write_protects() -> None:
    """A slot mapped with a 2 MiB SPTE: enabling logging drops it, writes then map 4 KiB pages
    one at a time, and KVM_GET_DIRTY_LOG write-protects what it reports."""
    kvm = guestmem.open("model", anon_folio_order=9)
    vm = kvm.create_vm()
    reserve = kvm.mmap(2 * SZ_2M, mman.PROT_NONE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    off = -(-reserve.addr // SZ_2M) * SZ_2M - reserve.addr
    mem = reserve.mmap_fixed(off, SZ_2M, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    gpa = 1 << 32
    vm.set_user_memory_region(1, 0, gpa, SZ_2M, mem.addr)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(gpa, SZ_2M, 1)]))
    vcpu.run()
    assert vm.mmu.count()["2M"] == 1
    vm.set_user_memory_region(1, u.KVM_MEM_LOG_DIRTY_PAGES, gpa, SZ_2M, mem.addr)
    assert vm.mmu.count()["2M"] == 0
    vcpu.load(Program([Write(gpa + 3 * PAGE, 8, 1), Write(gpa + 5 * PAGE, 8, 1)]))
    vcpu.run()
    counts = vm.mmu.count()
    assert counts["2M"] == 0 and counts["4K"] == 2
    assert int.from_bytes(vm.get_dirty_log(1), "little") == (1 << 3) | (1 << 5)
    assert all(not sp.writable for _, _, sp in vm.mmu.sptes[0].items())
    vm.check_invariants()
    kvm.close()


def test_private_shmem_mapping_uses_the_file_policy() -> None:
    """mbind on a MAP_PRIVATE memfd mapping sets the file's shared policy (shmem_set_policy), so
    a shared mapping sees it, and the private copies are allocated by it."""
    kvm = guestmem.open("model", numa_nodes=2)
    f = kvm.memfd_create(2 * PAGE)
    shared = kvm.mmap(2 * PAGE, RW, mman.MAP_SHARED, f)
    private = kvm.mmap(2 * PAGE, RW, mman.MAP_PRIVATE, f)
    private.mbind(0, 2 * PAGE, mman.MPOL_BIND, 0b10, 64)
    assert shared.get_mempolicy(0) == (mman.MPOL_BIND, 0b10)
    private.fill(0, 2 * PAGE, 1)
    assert private.page_nodes(0, 2) == [1, 1]
    kvm.close()


def test_invariant_8_catches_an_unlogged_writable_spte() -> None:
    """Break the rule on purpose: a writable SPTE over a page the log calls clean is reported."""
    from dataclasses import replace

    from guestmem.model.kvm.invariants import InvariantError

    kvm = guestmem.open("model")
    vm = kvm.create_vm()
    mem = kvm.mmap(4 * PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    gpa = 1 << 32
    vm.set_user_memory_region(1, u.KVM_MEM_LOG_DIRTY_PAGES, gpa, 4 * PAGE, mem.addr)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(gpa, 8, 1)]))
    vcpu.run()
    vm.check_invariants()
    vm.get_dirty_log(1)
    vm.check_invariants()
    sptes = vm.mmu.sptes[0]
    (s, e, sp), = [x for x in sptes.items() if x[2] is not None]
    sptes.set(s, e, replace(sp, writable=True))
    with pytest.raises(InvariantError, match="invariant 8"):
        vm.check_invariants()
    kvm.close()


def test_mbind_strict_refuses_misplaced_pages_and_changes_nothing() -> None:
    """MPOL_MF_STRICT without MOVE: a page already on another node is EIO before any policy is
    set (do_mbind: queue_pages_range fails first); with the pages in place it succeeds."""
    kvm = guestmem.open("model", numa_nodes=2)
    vm = kvm.create_vm()
    gmem = vm.create_guest_memfd(2 * PAGE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    mem = kvm.mmap(2 * PAGE, RW, mman.MAP_SHARED, gmem)
    mem.fill(0, 2 * PAGE, 1)
    assert mem.page_nodes(0, 2) == [0, 0]
    with pytest.raises(guestmem.KvmError) as exc:
        mem.mbind(0, 2 * PAGE, mman.MPOL_BIND, 0b10, 64, mman.MPOL_MF_STRICT)
    assert exc.value.errno == 5  # EIO
    assert mem.get_mempolicy(0) == (mman.MPOL_DEFAULT, 0)
    mem.mbind(0, 2 * PAGE, mman.MPOL_BIND, 0b01, 64, mman.MPOL_MF_STRICT)
    assert mem.get_mempolicy(0) == (mman.MPOL_BIND, 0b01)
    # guest_memfd pages cannot migrate: MOVE sets the policy, the pages stay; STRICT says EIO.
    mem.mbind(0, 2 * PAGE, mman.MPOL_BIND, 0b10, 64, mman.MPOL_MF_MOVE)
    assert mem.page_nodes(0, 2) == [0, 0] and mem.get_mempolicy(0) == (mman.MPOL_BIND, 0b10)
    with pytest.raises(guestmem.KvmError) as exc:
        mem.mbind(0, 2 * PAGE, mman.MPOL_BIND, 0b10, 64, mman.MPOL_MF_MOVE | mman.MPOL_MF_STRICT)
    assert exc.value.errno == 5
    kvm.close()


def test_mbind_move_migrates_shmem_and_private_pages() -> None:
    """MPOL_MF_MOVE moves mapped shmem pages (every mapping and a guest keep seeing the same
    bytes) and a private mapping's copies; a pinned page cannot move (STRICT: EIO)."""
    kvm = guestmem.open("model", numa_nodes=2)
    vm = kvm.create_vm()
    f = kvm.memfd_create(4 * PAGE)
    shared = kvm.mmap(4 * PAGE, RW, mman.MAP_SHARED, f)
    other = kvm.mmap(4 * PAGE, RW, mman.MAP_SHARED, f)
    shared.write(0, b"abcd" * (PAGE // 2))
    other.read(0, 1)
    gpa = 1 << 32
    vm.set_user_memory_region(1, 0, gpa, 4 * PAGE, shared.addr)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(gpa + PAGE, 4, 0x33)]))
    vcpu.run()
    assert shared.page_nodes(0, 2) == [0, 0]
    shared.mbind(0, 2 * PAGE, mman.MPOL_BIND, 0b10, 64, mman.MPOL_MF_MOVE)
    assert shared.page_nodes(0, 2) == [1, 1] and other.page_nodes(0, 1) == [1]
    assert other.read(0, 8) == b"abcdabcd" and other.read(PAGE, 4) == b"\x33" * 4
    vm.check_invariants()
    private = kvm.mmap(2 * PAGE, RW, mman.MAP_PRIVATE, f)
    private.write(0, b"mine")
    with private.pin(0, PAGE):
        with pytest.raises(guestmem.KvmError) as exc:
            private.mbind(0, PAGE, mman.MPOL_BIND, 0b01, 64, mman.MPOL_MF_MOVE | mman.MPOL_MF_STRICT)
        assert exc.value.errno == 5
    private.mbind(0, PAGE, mman.MPOL_BIND, 0b01, 64, mman.MPOL_MF_MOVE | mman.MPOL_MF_STRICT)
    assert private.page_nodes(0, 1) == [0] and private.read(0, 4) == b"mine"
    vm.check_invariants()
    kvm.close()
