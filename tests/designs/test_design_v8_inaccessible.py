"""v8 (seed 002): memfd_create(MFD_INACCESSIBLE) as a shim over tmpfs, its rules and errnos, the
inaccessible_notifier that runs after fallocate, get_pfn/put_pfn, and what the late notifier costs."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt
from guestmem.errors import KvmError
from guestmem.guest.ops import Program, Verify, Write
from guestmem.model.designs import attach
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.inaccessible import (
    inaccessible_get_pfn,
    inaccessible_put_pfn,
    inaccessible_register_notifier,
    memfd_create,
)
from guestmem.model.designs.restricted import memfd_restricted

PS = u.PAGE_SIZE
HUGE = u.HPAGE_2M
GPA = 1 << 32
KEEP, PUNCH = u.FALLOC_FL_KEEP_SIZE, u.FALLOC_FL_PUNCH_HOLE


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
    """An inaccessible notifier noting each call and how many pages of the range were still there."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.calls: list[tuple[int, int, int]] = []

    def invalidate(self, start: int, end: int) -> None:
        self.calls.append((start, end, self.file.cache.allocated_count(start, end)))


def test_memfd_create_rules(kvm: Any) -> None:
    assert errno_of(memfd_create, kvm, "x", hu.MFD_INACCESSIBLE | hu.MFD_ALLOW_SEALING) == errno.EINVAL
    assert errno_of(memfd_create, kvm, "x", hu.MFD_INACCESSIBLE | hu.MFD_HUGETLB) == errno.EINVAL
    assert errno_of(memfd_create, kvm, "x", hu.MFD_INACCESSIBLE | 0x40) == errno.EINVAL
    assert errno_of(memfd_create, kvm, "x", hu.MFD_CLOEXEC) == errno.EINVAL  # not an inaccessible memfd
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE | hu.MFD_CLOEXEC)
    assert kvm.process.fget(f.fd) is f and f.file_magic() == hu.INACCESSIBLE_MAGIC


def test_the_shim_has_only_release_and_fallocate(kvm: Any) -> None:
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE)
    f.truncate(HUGE)
    assert errno_of(f.read, 8) == errno.EINVAL  # read(2): no read handler
    assert errno_of(f.read, 8, 0) == errno.ESPIPE  # pread(2): not FMODE_PREAD
    assert errno_of(f.write, b"x") == errno.EINVAL
    assert errno_of(f.write, b"x", 0) == errno.ESPIPE
    assert errno_of(f.mmap) == errno.ENODEV
    assert f.stat()[0] == HUGE
    f.allocate(0, PS)
    assert f.shmem.flags() == {"unevictable": True, "unmovable": True}
    assert errno_of(f.shmem.migrate, 0) == errno.EINVAL


def test_size_is_settable_once_and_page_aligned(kvm: Any) -> None:
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE)
    assert errno_of(f.truncate, -PS) == errno.EINVAL
    assert errno_of(f.truncate, PS - 1) == errno.EINVAL
    f.truncate(2 * PS)
    assert errno_of(f.truncate, 4 * PS) == errno.EPERM  # no resize
    assert errno_of(f.truncate, PS) == errno.EPERM
    assert f.size == 2 * PS


def test_notifier_runs_after_fallocate_for_every_mode(kvm: Any) -> None:
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE)
    f.truncate(4 * PS)
    rec = Recorder(f)
    inaccessible_register_notifier(f, rec)
    assert errno_of(f.fallocate, KEEP | PUNCH, 1, PS) == errno.EINVAL  # unaligned punch: refused early
    assert errno_of(f.fallocate, PUNCH, 0, PS) == errno.EOPNOTSUPP  # the VFS refuses it first
    assert rec.calls == []
    f.allocate(0, 2 * PS)
    assert rec.calls == [(0, 2, 2)]  # allocation is notified too
    f.punch_hole(0, PS)
    assert rec.calls[-1] == (0, 1, 0)  # the page was already gone when KVM heard
    assert errno_of(f.fallocate, KEEP | u.FALLOC_FL_ZERO_RANGE, PS, PS) == errno.EOPNOTSUPP
    assert rec.calls[-1] == (1, 2, 1)  # notified although the memfd refused


def test_get_pfn_and_put_pfn(kvm: Any) -> None:
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE, folio_order=9)
    f.truncate(HUGE)
    pfn, order = inaccessible_get_pfn(f, 7)
    assert order == 9 and f.cache.get_ref(7) == 1 and f.cache.is_uptodate(7)
    inaccessible_put_pfn(f, pfn)
    assert f.cache.get_ref(7) == 0
    # Past i_size the page still comes (SGP_WRITE does not stop at EOF), as an order-0 page.
    pfn2, order2 = inaccessible_get_pfn(f, 600)
    assert order2 == 0 and f.cache.lookup(600) == (pfn2, 0)


def _guest_with_private_ram(kvm: Any, design: str, file: Any) -> tuple[Any, Any]:
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    shared = kvm.memfd_create(2 * HUGE)
    m = kvm.process.mmap(shared, 2 * HUGE, 0, align=HUGE)
    front = attach(vm, design)
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 2 * HUGE, m.addr, file.fd, 0)
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, 2 * HUGE, 0x33)]))
    assert isinstance(vcpu.run(), ExitHalt)
    return vm, vcpu


def test_kvm_takes_only_an_inaccessible_memfd(kvm: Any) -> None:
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    front = attach(vm, hu.DESIGN_V8)
    plain = kvm.memfd_create(HUGE)
    for fd in (plain.fd, memfd_restricted(kvm).fd):
        err = errno_of(front.set_user_memory_region, 1, hu.KVM_MEM_PRIVATE, GPA, HUGE, 0, fd, 0)
        assert err == errno.EINVAL
    assert len(vm.memslots[0]) == 0


def test_pages_are_freed_while_still_mapped_until_the_notifier_runs(kvm: Any) -> None:
    f = memfd_create(kvm, "x", hu.MFD_INACCESSIBLE, folio_order=9)
    f.truncate(2 * HUGE)
    vm, vcpu = _guest_with_private_ram(kvm, hu.DESIGN_V8, f)
    f.punch_hole(0, HUGE)
    assert kvm.stats["stale_pages"] == 512  # a whole 2 MiB mapping outlived its pages
    assert vm.mmu.count()["private_pages"] == 512  # ...until the late notifier zapped it
    vm.check_invariants()
    vcpu.load(Program([Verify(GPA, HUGE, 0), Verify(GPA + HUGE, HUGE, 0x33)]))
    assert isinstance(vcpu.run(), ExitHalt)


def test_v9_closes_the_window(kvm: Any) -> None:
    f = memfd_restricted(kvm, folio_order=9)
    f.truncate(2 * HUGE)
    vm, _ = _guest_with_private_ram(kvm, hu.DESIGN_V9, f)
    f.punch_hole(0, HUGE)
    assert kvm.stats["stale_pages"] == 0 and kvm.stats["invalidations"] == 1
    vm.check_invariants()
