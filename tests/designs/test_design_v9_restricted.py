"""v9 (seed 000): memfd_restricted(), restrictedmem_notifier's invalidate_start/end around fallocate,
restrictedmem_get_page, the restricted memslot, and the reply's per-folio invalidation option."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt
from guestmem.errors import KvmError
from guestmem.guest.ops import Accept, Program, Verify, Write
from guestmem.model.designs import attach
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.directmap import DirectMapRmp
from guestmem.model.designs.inaccessible import memfd_create as memfd_create_v8
from guestmem.model.designs.restricted import (
    file_is_restrictedmem,
    memfd_restricted,
    restrictedmem_get_page,
    restrictedmem_put_page,
    restrictedmem_register_notifier,
)

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
    """A restrictedmem notifier noting each call and how many pages of the range were still there."""

    def __init__(self, file: Any, vm: Any = None) -> None:
        self.file, self.vm = file, vm
        self.calls: list[tuple[Any, ...]] = []

    def invalidate_start(self, start: int, end: int) -> None:
        busy = self.vm.mmu.in_progress if self.vm is not None else None
        self.calls.append(("start", start, end, self.file.cache.allocated_count(start, end), busy))

    def invalidate_end(self, start: int, end: int) -> None:
        self.calls.append(("end", start, end, self.file.cache.allocated_count(start, end)))

    def invalidate_folio(self, index: int, order: int) -> None:
        present = self.file.cache.allocated_count(index, index + (1 << order))
        self.calls.append(("folio", index, order, present))


def test_memfd_restricted_flags_must_be_zero(kvm: Any) -> None:
    assert errno_of(memfd_restricted, kvm, 1) == errno.EINVAL
    f = memfd_restricted(kvm, 0)
    assert kvm.process.fget(f.fd) is f and file_is_restrictedmem(f)
    assert f.file_magic() == hu.RESTRICTEDMEM_MAGIC
    assert not file_is_restrictedmem(memfd_create_v8(kvm, "x", hu.MFD_INACCESSIBLE))
    with pytest.raises(ValueError):
        memfd_restricted(kvm, 0, invalidation="page")  # type: ignore[arg-type]


def test_no_read_write_mmap_and_size_once(kvm: Any) -> None:
    f = memfd_restricted(kvm)
    assert errno_of(f.read, 1) == errno.EINVAL
    assert errno_of(f.write, b"x", 0) == errno.ESPIPE
    assert errno_of(f.mmap) == errno.ENODEV
    assert errno_of(f.truncate, 100) == errno.EINVAL
    f.truncate(HUGE)
    assert errno_of(f.truncate, 2 * HUGE) == errno.EPERM
    f.allocate(0, PS)
    assert f.shmem.unevictable and errno_of(f.shmem.migrate, 0) == errno.EINVAL


def test_start_before_and_end_after_every_fallocate(kvm: Any) -> None:
    f = memfd_restricted(kvm)
    f.truncate(4 * PS)
    rec = Recorder(f)
    restrictedmem_register_notifier(f, rec)
    assert errno_of(f.fallocate, KEEP | PUNCH, 0, 3) == errno.EINVAL
    assert rec.calls == []
    f.allocate(0, 2 * PS)
    assert rec.calls == [("start", 0, 2, 0, None), ("end", 0, 2, 2)]
    rec.calls.clear()
    f.punch_hole(0, PS)
    assert rec.calls == [("start", 0, 1, 1, None), ("end", 0, 1, 0)]  # KVM hears before the page goes
    rec.calls.clear()
    assert errno_of(f.fallocate, KEEP | u.FALLOC_FL_ZERO_RANGE, 0, PS) == errno.EOPNOTSUPP
    assert [c[0] for c in rec.calls] == ["start", "end"]  # paired even when the memfd refuses


def test_reply_option_invalidates_per_folio_with_its_order(kvm: Any) -> None:
    f = memfd_restricted(kvm, 0, folio_order=9, invalidation="folio")
    f.truncate(2 * HUGE)
    rec = Recorder(f)
    restrictedmem_register_notifier(f, rec)
    f.allocate(0, 2 * HUGE)
    assert [c[0] for c in rec.calls] == ["start", "end"]  # allocation: as in v9
    rec.calls.clear()
    f.punch_hole(0, HUGE)
    assert rec.calls == [("folio", 0, 9, 512)]  # one call, with the order, before the folio goes
    rec.calls.clear()
    f.punch_hole(HUGE + 4 * PS, 2 * PS)  # a partial punch splits the folio first
    assert rec.calls == [("folio", 516, 0, 1), ("folio", 517, 0, 1)]


def test_get_page(kvm: Any) -> None:
    f = memfd_restricted(kvm, folio_order=9)
    f.truncate(HUGE)
    pfn, order = restrictedmem_get_page(f, 3)
    assert order == 9 and f.cache.get_ref(3) == 1
    restrictedmem_put_page(f, pfn)
    assert f.cache.get_ref(3) == 0


def _snp_guest(kvm: Any, f: Any) -> tuple[Any, Any, Any]:
    vm = kvm.create_vm(u.KVM_X86_SNP_VM)
    shared = kvm.memfd_create(2 * HUGE)
    m = kvm.process.mmap(shared, 2 * HUGE, 0, align=HUGE)
    front = attach(vm, hu.DESIGN_V9)
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 2 * HUGE, m.addr,
                                 restricted_fd=f.fd, restricted_offset=0)
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)
    vm.launch_finalize()
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Accept(GPA, 2 * HUGE), Write(GPA, 2 * HUGE, 0x44, "private")]))
    assert isinstance(vcpu.run(), ExitHalt)
    return vm, front, vcpu


def test_restricted_memslot_takes_only_a_restricted_fd(kvm: Any) -> None:
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    front = attach(vm, hu.DESIGN_V9)
    v8 = memfd_create_v8(kvm, "x", hu.MFD_INACCESSIBLE)
    reg = front.set_user_memory_region
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA, HUGE, 0, restricted_fd=v8.fd) == errno.EINVAL
    f = memfd_restricted(kvm)
    f.truncate(HUGE)
    f.close()
    assert errno_of(reg, 1, hu.KVM_MEM_PRIVATE, GPA, HUGE, 0, restricted_fd=f.fd) == errno.EINVAL


def test_memslot_is_not_bounded_by_the_file_size(kvm: Any) -> None:
    # Unlike guest_memfd's bind, v9 never checked offset + size against i_size: a fault past the end
    # of the file allocates there (shmem_getpage with SGP_WRITE).
    f = memfd_restricted(kvm)
    f.truncate(HUGE)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    front = attach(vm, hu.DESIGN_V9)
    front.set_user_memory_region(1, hu.KVM_MEM_PRIVATE, GPA, 2 * HUGE, 0, restricted_fd=f.fd)
    front.memory_encrypt_reg_region(GPA, 2 * HUGE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA + HUGE + PS, PS, 0x9), Verify(GPA + HUGE + PS, PS, 0x9)]))
    assert isinstance(vcpu.run(), ExitHalt)
    assert f.cache.is_allocated(513) and f.size == HUGE


def test_faults_are_held_off_between_start_and_end(kvm: Any) -> None:
    f = memfd_restricted(kvm, folio_order=9)
    f.truncate(2 * HUGE)
    vm, _, _ = _snp_guest(kvm, f)
    rec = Recorder(f, vm)
    restrictedmem_register_notifier(f, rec)  # after KVM's: sees KVM's invalidation in progress
    f.punch_hole(0, HUGE)
    assert rec.calls[0] == ("start", 0, 512, 512, 1)
    assert vm.mmu.in_progress == 0 and vm.mmu.retry(vm.mmu.seq, GPA // PS, GPA // PS + 1) is False
    vm.check_invariants()


@pytest.mark.parametrize("invalidation, restores", [("range", 0), ("folio", 1)])
def test_direct_map_restore_needs_the_folio_order(invalidation: str, restores: int) -> None:
    kvm = guestmem.open("model")
    kvm.rmp = DirectMapRmp()
    f = memfd_restricted(kvm, 0, folio_order=9, invalidation=invalidation)  # type: ignore[arg-type]
    f.truncate(2 * HUGE)
    vm, _, vcpu = _snp_guest(kvm, f)
    assert kvm.rmp.directmap_splits == 2 and kvm.rmp.split_regions() == 2
    f.punch_hole(0, HUGE)  # a whole 2 MiB folio goes
    assert kvm.rmp.owned(0, 1 << 30) is not None  # the other folio is still the guest's
    assert kvm.rmp.directmap_restores == restores
    assert kvm.rmp.split_regions() == 2 - restores
    vm.check_invariants()
    vcpu.load(Program([Verify(GPA + HUGE, HUGE, 0x44, "private")]))
    assert isinstance(vcpu.run(), ExitHalt)
