"""v7 (seed 001): MFD_INACCESSIBLE, F_SEAL_AUTO_ALLOCATE, memfile_notifier, the private memslot and
KVM_MEMORY_ENCRYPT_{UN,}REG_REGION — each rule and errno of the posting, on the model."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Program, Verify, Write
from guestmem.model.designs import attach
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.memfile import (
    SHMEM_BACKING_STORE,
    memfd_create,
    memfile_get_pfn,
    memfile_put_pfn,
    memfile_register_notifier,
    memfile_unregister_notifier,
)
from guestmem.model.designs.restricted import memfd_restricted
from guestmem.model.mm.shmem import F_SEAL_WRITE

PS = u.PAGE_SIZE
HUGE = u.HPAGE_2M
GPA = 1 << 32
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def errno_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    with pytest.raises(KvmError) as ei:
        fn(*args, **kwargs)
    return ei.value.errno or 0


@pytest.fixture
def kvm() -> Iterator[Any]:
    k = guestmem.open("model")
    yield k
    k.close()


class Recorder:
    """A memfile notifier that notes each call and how many pages of its range were still there."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.calls: list[tuple[int, int, int]] = []

    def invalidate(self, start: int, end: int) -> None:
        self.calls.append((start, end, self.file.cache.allocated_count(start, end)))


# --- memfd_create(MFD_INACCESSIBLE) -----------------------------------------------------------------------

def test_memfd_create_flag_rules(kvm: Any) -> None:
    assert errno_of(memfd_create, kvm, "x", 0x100) == errno.EINVAL
    assert errno_of(memfd_create, kvm, "x", hu.MFD_INACCESSIBLE | hu.MFD_ALLOW_SEALING) == errno.EINVAL
    assert errno_of(memfd_create, kvm, "x", hu.MFD_INACCESSIBLE | hu.MFD_HUGETLB) == errno.EOPNOTSUPP
    assert errno_of(memfd_create, kvm, "x" * 250, hu.MFD_INACCESSIBLE) == errno.EINVAL
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE | hu.MFD_CLOEXEC)
    assert kvm.process.fget(f.fd) is f and f.inaccessible


def test_inaccessible_memfd_refuses_read_write_mmap_and_seals(kvm: Any) -> None:
    f = memfd_create(kvm, "priv", hu.MFD_INACCESSIBLE)
    f.truncate(4 * PS)
    assert errno_of(f.read, 1, 0) == errno.EPERM
    assert f.read(1, 4 * PS) == b""  # at EOF shmem returns before the check
    assert errno_of(f.write, b"x", 0) == errno.EPERM
    assert errno_of(f.mmap) == errno.EPERM
    assert errno_of(f.add_seals, F_SEAL_WRITE) == errno.EPERM
    assert kvm.pool.allocated == 0


def test_inaccessible_size_is_set_once_and_page_aligned(kvm: Any) -> None:
    f = memfd_create(kvm, "priv", hu.MFD_INACCESSIBLE)
    assert errno_of(f.truncate, PS + 1) == errno.EINVAL
    assert errno_of(f.truncate, -1) == errno.EINVAL
    f.truncate(2 * PS)
    assert errno_of(f.truncate, 4 * PS) == errno.EPERM
    assert errno_of(f.truncate, 0) == errno.EPERM
    assert f.stat()[0] == 2 * PS


def test_inaccessible_hole_punch_must_be_page_aligned(kvm: Any) -> None:
    f = memfd_create(kvm, "priv", hu.MFD_INACCESSIBLE)
    f.truncate(4 * PS)
    f.allocate(0, 2 * PS)
    assert errno_of(f.punch_hole, 1, PS) == errno.EINVAL
    assert errno_of(f.punch_hole, 0, PS + 1) == errno.EINVAL
    assert f.cache.nr_pages == 2
    f.punch_hole(0, PS)
    assert f.cache.nr_pages == 1


def test_ordinary_memfd_stays_accessible(kvm: Any) -> None:
    f = memfd_create(kvm, "shared", hu.MFD_ALLOW_SEALING)
    f.truncate(4 * PS)
    assert f.write(b"hello", PS) == 5
    assert f.read(5, PS) == b"hello"
    m = f.mmap()
    assert m.read(PS, 5) == b"hello"


# --- F_SEAL_AUTO_ALLOCATE --------------------------------------------------------------------------------

def test_auto_allocate_seal_forbids_allocation_on_access(kvm: Any) -> None:
    f = memfd_create(kvm, "shared", hu.MFD_ALLOW_SEALING)
    f.truncate(4 * PS)
    f.add_seals(hu.F_SEAL_AUTO_ALLOCATE)
    assert errno_of(f.write, b"a", 0) == errno.ENOENT
    m = f.mmap()
    with pytest.raises(GuestAccessFault):
        m.read(0, 1)
    with pytest.raises(GuestAccessFault):
        m.write(PS, b"x")
    assert kvm.pool.allocated == 0
    f.allocate(0, 2 * PS)  # only an explicit fallocate allocates
    m.write(0, b"hi")
    assert f.read(2, 0) == b"hi"
    assert f.write(b"y" * (3 * PS), 0) == 2 * PS  # stops short at the hole
    assert kvm.pool.allocated == 2


def test_without_the_seal_a_stray_access_allocates(kvm: Any) -> None:
    f = memfd_create(kvm, "shared", hu.MFD_ALLOW_SEALING)
    f.truncate(4 * PS)
    f.mmap().read(3 * PS, 1)
    assert kvm.pool.allocated == 1


# --- memfile_notifier ---------------------------------------------------------------------------------------

def test_register_notifier_rules(kvm: Any) -> None:
    f = memfd_create(kvm, "x", hu.MFD_ALLOW_SEALING)
    f.truncate(HUGE)
    rec = Recorder(f)
    restricted = memfd_restricted(kvm)
    assert errno_of(memfile_register_notifier, restricted, hu.KVM_MEMFILE_FLAGS, rec) == errno.EOPNOTSUPP
    assert errno_of(memfile_register_notifier, f, 0x8, rec) == errno.EINVAL
    assert memfile_register_notifier(f, hu.KVM_MEMFILE_FLAGS, rec) is SHMEM_BACKING_STORE
    # KVM's flags now hold for the file: inaccessible, unmovable, unreclaimable.
    assert f.inaccessible and f.shmem.unmovable and f.shmem.unevictable
    assert errno_of(f.mmap) == errno.EPERM
    assert errno_of(memfile_register_notifier, f, hu.MEMFILE_F_UNMOVABLE, Recorder(f)) == errno.EINVAL
    memfile_register_notifier(f, hu.KVM_MEMFILE_FLAGS, Recorder(f))  # same flags: fine
    f.allocate(0, PS)
    assert errno_of(f.shmem.migrate, 0) == errno.EINVAL


def test_notifier_is_called_per_folio_before_the_folio_goes(kvm: Any) -> None:
    f = memfd_create(kvm, "priv", hu.MFD_INACCESSIBLE, folio_order=9)
    f.truncate(2 * HUGE)
    f.allocate(0, 2 * HUGE)
    rec = Recorder(f)
    memfile_register_notifier(f, hu.KVM_MEMFILE_FLAGS, rec)
    f.punch_hole(0, HUGE)
    assert rec.calls == [(0, 512, 512)]  # one call for the whole 2 MiB folio, its pages still there
    rec.calls.clear()
    f.punch_hole(HUGE + 8 * PS, 2 * PS)  # inside the second folio: split first, then per 4 KiB folio
    assert rec.calls == [(520, 521, 1), (521, 522, 1)]
    memfile_unregister_notifier(f, rec)
    f.punch_hole(HUGE, PS)
    assert len(rec.calls) == 2


def test_get_pfn_and_put_pfn(kvm: Any) -> None:
    f = memfd_create(kvm, "priv", hu.MFD_INACCESSIBLE, folio_order=9)
    f.truncate(HUGE)
    pfn, order = memfile_get_pfn(f, 5)
    assert order == 9 and f.cache.lookup(5) == (pfn, 9)
    assert f.cache.get_ref(5) == 1
    memfile_put_pfn(f, pfn)
    assert f.cache.get_ref(5) == 0
    with pytest.raises(ValueError):
        memfile_put_pfn(f, pfn + 4096)
    assert errno_of(memfile_get_pfn, memfd_restricted(kvm), 0) == errno.EOPNOTSUPP  # no backing store


# --- the KVM side -------------------------------------------------------------------------------------

def _vm_and_files(kvm: Any, vm_type: int = u.KVM_X86_SW_PROTECTED_VM, size: int = 2 * HUGE) -> tuple:
    vm = kvm.create_vm(vm_type)
    front = attach(vm, hu.DESIGN_V7)
    priv = memfd_create(kvm, "priv", hu.MFD_INACCESSIBLE, folio_order=9)
    priv.truncate(size)
    shared = memfd_create(kvm, "shared", hu.MFD_ALLOW_SEALING)
    shared.truncate(size)
    m = shared.mmap(align=HUGE)
    return vm, front, priv, shared, m


def test_private_memslot_rules(kvm: Any) -> None:
    vm, front, priv, shared, m = _vm_and_files(kvm)
    size = 2 * HUGE
    reg = front.set_user_memory_region
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA, size, m.addr, 999, 0) == errno.EINVAL  # fget fails
    restricted = memfd_restricted(kvm)
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA, size, m.addr, restricted.fd, 0) == errno.EOPNOTSUPP
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA, size, m.addr, priv.fd, 1) == errno.EINVAL
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA + 1, size, m.addr, priv.fd, 0) == errno.EINVAL
    reg(1, hu.KVM_MEM_PRIVATE, GPA, size, m.addr, priv.fd, 0)
    # A private memslot is immutable.
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA + size, size, m.addr, priv.fd, 0) == errno.EINVAL
    assert errno_of(reg, 2, hu.KVM_MEM_PRIVATE, GPA, size, m.addr, priv.fd, 0) == errno.EEXIST
    assert len(priv.node.notifiers) == 1
    reg(1, hu.KVM_MEM_PRIVATE, GPA, 0, m.addr, priv.fd, 0)  # delete: the notifier goes with the slot
    assert priv.node.notifiers == []
    plain = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    assert errno_of(attach(plain, hu.DESIGN_V7).set_user_memory_region, 1, hu.KVM_MEM_PRIVATE, GPA, size,
                    m.addr, priv.fd, 0) == errno.EINVAL  # KVM_MEM_PRIVATE needs a VM with private memory


def test_reg_region_rules(kvm: Any) -> None:
    vm, front, *_ = _vm_and_files(kvm)
    assert errno_of(front.memory_encrypt_reg_region, GPA, 0) == errno.EINVAL
    assert errno_of(front.memory_encrypt_reg_region, GPA + 1, PS) == errno.EINVAL
    assert errno_of(front.memory_encrypt_unreg_region, GPA, PS + 1) == errno.EINVAL
    assert errno_of(front.memory_encrypt_reg_region, (1 << 64) - PS, 2 * PS) == errno.EINVAL
    plain = attach(kvm.create_vm(u.KVM_X86_DEFAULT_VM), hu.DESIGN_V7)
    assert errno_of(plain.memory_encrypt_reg_region, GPA, PS) == errno.ENOTTY
    front.memory_encrypt_reg_region(GPA, PS)
    assert vm.mem_is_private(GPA // PS) and not vm.mem_is_private(GPA // PS + 1)
    front.memory_encrypt_unreg_region(GPA, PS)
    assert not vm.mem_is_private(GPA // PS)
    assert kvm.stats["conversions"] == 2


def test_guest_runs_on_the_private_fd_and_reg_region_zaps_even_without_change(kvm: Any) -> None:
    vm, front, priv, shared, m = _vm_and_files(kvm)
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 2 * HUGE, m.addr, priv.fd, 0)
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, 2 * HUGE, 0x77), Verify(GPA, 2 * HUGE, 0x77)]))
    assert isinstance(vcpu.run(), ExitHalt)
    assert vm.mmu.count()["2M"] == 2 and priv.cache.nr_pages == 1024
    vm.check_invariants()
    zaps, conversions = vm.mmu.stats["zaps"], kvm.stats["conversions"]
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)  # nothing changes, but v7 zaps anyway
    assert vm.mmu.stats["zaps"] > zaps and kvm.stats["conversions"] == conversions
    assert vm.mmu.count()["private_pages"] == 0


def test_the_memslot_keeps_the_file_alive_after_close(kvm: Any) -> None:
    vm, front, priv, shared, m = _vm_and_files(kvm)
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 2 * HUGE, m.addr, priv.fd, 0)
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, PS, 0x11)]))
    vcpu.run()
    priv.close()  # userspace drops its fd: the memslot's reference keeps the memory
    vcpu.load(Program([Verify(GPA, PS, 0x11)]))
    assert isinstance(vcpu.run(), ExitHalt)
    assert not priv.released
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 0, m.addr, -1, 0)
    assert priv.released and kvm.pool.allocated == 0
    vm.check_invariants()


def test_punching_the_private_fd_zaps_before_freeing(kvm: Any) -> None:
    vm, front, priv, shared, m = _vm_and_files(kvm)
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 2 * HUGE, m.addr, priv.fd, 0)
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, 2 * HUGE, 0x22)]))
    vcpu.run()
    priv.punch_hole(0, HUGE)
    assert kvm.stats["invalidations"] == 1 and kvm.stats["stale_pages"] == 0
    assert vm.mmu.count()["private_pages"] == 512
    vm.check_invariants()
    vcpu.load(Program([Verify(GPA, HUGE, 0), Verify(GPA + HUGE, HUGE, 0x22)]))
    assert isinstance(vcpu.run(), ExitHalt)  # refaulted as a fresh, zeroed page
