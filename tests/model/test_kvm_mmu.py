"""The model's MMU: lpage MIXED tracking, mapping levels, and the invalidation retry protocol."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
import guestmem.uapi as u
from guestmem.guest.ops import Program, Verify, Write
from guestmem.model.kvm import fault as fault_mod
from guestmem.model.kvm import vcpu as vcpu_mod
from guestmem.model.kvm.guest_memfd import GmemFile

PS = u.PAGE_SIZE
GPA = 1 << 32
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def _vm(size: int, order: int = 9):
    kvm = guestmem.open("model", gmem_folio_order=order, anon_folio_order=order)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(size, 0)
    shared = kvm.mmap_anonymous(size + (2 << 20))
    # Align the shared side to 2 MiB in the host address space, as a VMM does for THP.
    addr = (shared.addr + (2 << 20) - 1) & ~((2 << 20) - 1)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, addr, gmem, 0)
    vm.keep_alive = shared  # the mapping must outlive this helper, as it would on the kernel backend
    return kvm, vm, gmem


def _direct_mixed(vm, slot, order: int) -> set[int]:
    """Hugepage indices wholly inside ``slot`` whose attributes are not uniform."""
    size = 1 << order
    out = set()
    for hp in range((slot.base_gfn + size - 1) >> order, slot.end_gfn >> order):
        s = hp << order
        if vm.attributes.distinct(s, s + size) > 1:
            out.add(hp)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 1024), st.booleans()), min_size=1,
                max_size=12))
def test_lpage_mixed_tracking_matches_attributes(updates):
    kvm, vm, _ = _vm(8 << 20)
    slot = vm.memslots[0].get(1)
    base = GPA // PS
    for start, n, private in updates:
        n = min(n, 2048 - start)
        vm.set_memory_attributes((base + start) * PS, n * PS, PRIVATE if private else 0)
        tracked = {hp for s, e, v in slot.lpage_mixed[9].items() if v for hp in range(s, e)}
        assert tracked == _direct_mixed(vm, slot, 9)
        vm.check_invariants()


def test_private_hugepage_mapping_follows_attributes():
    kvm, vm, gmem = _vm(4 << 20)
    vm.set_memory_attributes(GPA, 4 << 20, PRIVATE)
    vcpu = vm.create_vcpu(0)
    assert vcpu.pre_fault_memory(GPA, 4 << 20) == 0
    vm.check_invariants()
    assert vm.mmu.count()["2M"] == 2
    # Converting one page back to shared splits the mapping: that 2M region is MIXED now.
    vm.set_memory_attributes(GPA + PS, PS, 0)
    vm.check_invariants()
    assert vcpu.pre_fault_memory(GPA, 4 << 20) == 0
    counts = vm.mmu.count()
    assert counts["2M"] == 1 and counts["4K"] == 512
    # Converting it back makes the region uniform: a hugepage again.
    vm.set_memory_attributes(GPA + PS, PS, PRIVATE)
    assert vcpu.pre_fault_memory(GPA, 4 << 20) == 0
    assert vm.mmu.count()["2M"] == 2
    vm.check_invariants()


def test_default_folio_order_maps_4k_only():
    kvm, vm, gmem = _vm(4 << 20, order=0)
    vm.set_memory_attributes(GPA, 4 << 20, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.pre_fault_memory(GPA, 4 << 20)
    assert vm.mmu.count() == {"4K": 1024, "2M": 0, "1G": 0, "private_pages": 1024, "shared_pages": 0}


def test_fault_racing_an_invalidation_retries_instead_of_installing_stale(monkeypatch):
    """A hole punch lands between get_pfn and SPTE install: the fault must retry."""
    kvm, vm, gmem = _vm(2 << 20, order=0)
    vm.set_memory_attributes(GPA, 2 << 20, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, PS, 0x5A), Verify(GPA, PS, 0x5A)]))
    real = GmemFile.get_pfn_range
    raced = []

    def racing_get_pfn(self, slot, gfn, end):
        runs = real(self, slot, gfn, end)
        if not raced:
            raced.append(True)
            t = threading.Thread(target=gmem.punch_hole, args=(0, 2 << 20))
            t.start()
            t.join()
        return runs

    monkeypatch.setattr(GmemFile, "get_pfn_range", racing_get_pfn)
    ex = vcpu.run()
    assert ex.name == "halt", ex
    assert raced and vm.mmu.stats["retries"] >= 1
    vm.check_invariants()


def test_lock_order_violation_is_caught():
    from guestmem.sync import LockOrderError

    kvm, vm, gmem = _vm(2 << 20, order=0)
    with vm.mmu_lock(), pytest.raises(LockOrderError), vm.slots_lock():
        pass


def test_fault_path_uses_runs_not_pages():
    kvm = guestmem.open("model")
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    size = 256 << 20
    gmem = vm.create_guest_memfd(size, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gmem, 0)
    vm.set_memory_attributes(GPA, size, PRIVATE)
    calls = []
    real = fault_mod.page_fault
    monkey = pytest.MonkeyPatch()
    monkey.setattr(vcpu_mod, "page_fault", lambda *a, **k: calls.append(a) or real(*a, **k))
    try:
        vcpu = vm.create_vcpu(0)
        assert vcpu.pre_fault_memory(GPA, size) == 0
    finally:
        monkey.undo()
    assert 1 <= len(calls) <= 2  # one run covers the whole uniform range
    assert len(vm.mmu.sptes[0]) == 1  # and lands as one merged SPTE run
    vm.check_invariants()


def test_pre_fault_stops_at_an_unmapped_hva_and_reports_the_rest() -> None:
    """KVM_PRE_FAULT_MEMORY maps what it can and returns the bytes left; it fails only when not
    even the first page can be mapped (upstream kvm_vcpu_pre_fault_memory; found by the fuzzer)."""
    import errno

    from guestmem.errors import KvmError

    kvm = guestmem.open("model")
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    shared = kvm.mmap_anonymous(3 * PS)  # the slot is bigger than its host mapping
    vm.set_user_memory_region2(0, 0, GPA, 14 * PS, shared.addr, None, 0)
    vcpu = vm.create_vcpu(0)
    assert vcpu.pre_fault_memory(GPA, 12 * PS) == 9 * PS
    with pytest.raises(KvmError) as info:
        vcpu.pre_fault_memory(GPA + 4 * PS, PS)
    assert info.value.errno == errno.EFAULT and info.value.operation == "KVM_PRE_FAULT_MEMORY"
    vm.check_invariants()
