"""The discard policy: the other side of a conversion is dropped when it may be, kept when it
must be, and the accounting says what that costs -- including breaking the stated bound."""

from __future__ import annotations

import pytest
from vmm_helpers import GPA, PAGE, E, MachineFactory, MiB, run_program

from guestmem.api import Kvm
from guestmem.guest.ops import MapGpaRange, Program, Sync, Verify, Write
from guestmem.vmm import DiscardPolicy, Machine
from guestmem.vmm.trace import INVALIDATION

RANGE = (GPA, 2 * MiB)


def shared_resident(m: Machine, gpa: int, size: int) -> int:
    rr = m.accounting.region_residency(m.regions[0])
    s, e = gpa // PAGE, (gpa + size) // PAGE
    return sum(max(0, min(b, e) - max(a, s)) for a, b in rr.shared)


def test_to_private_drops_the_shared_copy(backend: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(backend, flavour="sw-protected")
    m.host_fill(*RANGE, 0x77)  # the shared side holds data
    assert shared_resident(m, *RANGE) == 512
    assert m.convert(*RANGE, True).ok
    assert shared_resident(m, *RANGE) == 0
    assert m.converter.stats["shared_discards"] == 1
    assert m.host_read(GPA, 16) == bytes(16), "MADV_REMOVE'd pages read as zero"


def test_no_discard_keeps_both_copies_and_breaks_the_bound(model: Kvm, make_machine: MachineFactory) -> None:
    """AMDSEV#250 in miniature: without discard the guest's memory is held twice, and the VMM
    says so instead of letting it pass."""
    m = make_machine(model, flavour="sw-protected", slack=0,
                     policy=DiscardPolicy(discard_shared=False, discard_private=False))
    size = 8 * MiB
    run_program(m, [Write(GPA, size, 0x11), MapGpaRange(GPA, size // PAGE, E), Write(GPA, size, 0x22),
                    Sync(1)], lambda _v: None)
    assert m.host_read(GPA, 4) == bytes([0x11]) * 4  # the stale shared copy is still there
    res = m.accounting.measure()
    assert res.double == size // PAGE and res.frames == 2 * size // PAGE
    assert not m.accounting.bound_ok
    assert "double-backed" in m.accounting.violations[0].describe()


@pytest.mark.parametrize("config, reason", [
    ({"policy": DiscardPolicy(shared_backing="hugetlb")}, "hugetlb"),
    ({"policy": DiscardPolicy(shared_backing="prealloc")}, "preallocated"),
    ({"iommu": "legacy"}, "legacy IOMMU"),
    ({"policy": DiscardPolicy(discard_shared=False)}, "discard_shared = false"),
])
def test_when_discard_must_not_happen(model: Kvm, make_machine: MachineFactory, config: dict, reason: str
                                      ) -> None:
    m = make_machine(model, flavour="sw-protected", **config)
    m.host_fill(*RANGE, 0x77)
    assert m.convert(*RANGE, True).ok
    assert m.host_read(GPA, 16) == bytes([0x77]) * 16, "the shared copy must stay"
    skipped = [e for e in m.trace.events() if e.cat == INVALIDATION and e.name == "shared discard skipped"]
    assert skipped and reason in skipped[0].args["reason"]


def test_pinned_pages_defer_the_discard(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected")
    m.host_fill(*RANGE, 0x77)
    with m.dma_pin(GPA, 4 * PAGE):
        assert m.convert(*RANGE, True).ok
        assert shared_resident(m, *RANGE) == 4, "DMA in flight: the pinned pages stay, the rest goes"
        assert m.host_read(GPA, 4) == bytes([0x77]) * 4
        assert m.converter.stats["shared_discards_deferred"] == 1
    assert shared_resident(m, *RANGE) == 0, "dropped once the pin went"
    assert m.host_read(GPA, 4) == bytes(4)


def test_to_shared_punches_the_private_copy(backend: Kvm, make_machine: MachineFactory) -> None:
    """Round trip private -> shared -> private: with the punch the guest's old private data is gone
    (it reads zeros), without it the old copy comes back."""
    ops = [MapGpaRange(GPA, 16, E), Write(GPA, 16 * PAGE, 0x5A), MapGpaRange(GPA, 16, 0),
           MapGpaRange(GPA, 16, E)]
    m = make_machine(backend, flavour="sw-protected")
    run_program(m, [*ops, Verify(GPA, 16 * PAGE, 0)])
    assert m.converter.stats["private_punches"] == 1
    kept = make_machine(backend, flavour="sw-protected", policy=DiscardPolicy(discard_private=False))
    run_program(kept, [*ops, Verify(GPA, 16 * PAGE, 0x5A)])


def test_balloon_discard_frees_both_sides(backend: Kvm, make_machine: MachineFactory) -> None:
    """Free-page reporting: the host takes pages back without converting them; the guest then
    finds zeros.  Runs on private memory where the backend has it, on shared memory otherwise."""
    try:
        m = make_machine(backend, flavour="sw-protected")
    except pytest.skip.Exception:
        m = make_machine(backend, flavour="default")
    freed: list[int] = []

    def host(_v: int) -> None:
        before = m.accounting.measure().frames
        assert m.discard(GPA, 2 * MiB).ok
        freed.append(before - m.accounting.measure().frames)

    run_program(m, [Write(GPA, 2 * MiB, 0x66), Sync(1), Verify(GPA, 2 * MiB, 0)], host)
    assert freed == [512]
    assert m.converter.stats["balloon_bytes"] == 2 * MiB


def test_frames_are_one_copy_with_discard(model: Kvm, make_machine: MachineFactory) -> None:
    """With discard on, converting everything to private and touching it costs one copy."""
    m = make_machine(model, flavour="sw-protected", slack=0)
    size = 8 * MiB
    run_program(m, [Write(GPA, size, 0x11), MapGpaRange(GPA, size // PAGE, E), Write(GPA, size, 0x22)])
    assert m.accounting.measure().frames == size // PAGE
    assert m.accounting.bound_ok
    assert m.accounting.frames_peak() == (size // PAGE, "backend")


def test_pre_fault_host_conversion_maps_without_exits(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected", prefault="private")
    m.create_vcpus(1)
    assert m.convert(GPA, 4 * MiB, True).ok
    m.load({0: Program([Write(GPA, 4 * MiB, 0x33), Verify(GPA, 4 * MiB, 0x33)])})
    result = m.run(timeout_s=120)
    assert result.ok and result.exits == {"halt": 1}, "pre-faulted private memory needs no exits"
