"""Conversion listeners: called in the order DMA needs (before a range goes private, after it
becomes shared), only for pages whose state changes; the simulated IOMMU maps only shared memory
and refuses DMA to anything else."""

from __future__ import annotations

import pytest
from vmm_helpers import GPA, PAGE, MachineFactory, MiB

from guestmem.api import Kvm
from guestmem.vmm import IommuFault, Machine
from guestmem.vmm.listeners import ListenerHost


class Recorder:
    """A listener that records each call with the state the VMM had at that moment."""

    name = "recorder"

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.calls: list[tuple[str, int, int, bool]] = []

    def attach(self, host: ListenerHost) -> None:
        self.calls.append(("attach", 0, sum(n for _, n in host.shared_runs()), False))

    def before_to_private(self, gpa: int, size: int) -> None:
        self.calls.append(("before_to_private", gpa, size, self.m.tracker.is_private(gpa // PAGE)))

    def after_to_shared(self, gpa: int, size: int) -> None:
        self.calls.append(("after_to_shared", gpa, size, self.m.tracker.is_private(gpa // PAGE)))

    def mapped(self, gpa: int, size: int) -> int:
        return 0

    def discard_blocker(self) -> str | None:
        return None

    def detach(self) -> None:
        pass

    def stats(self) -> dict[str, int | str]:
        return {}


def test_listener_order_and_granularity(backend: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(backend, flavour="sw-protected")
    rec = Recorder(m)
    m.converter.add_listener(rec, m.converter)
    assert rec.calls == [("attach", 0, 8 * MiB, False)]  # replay: everything is shared
    assert m.convert(GPA, 2 * MiB, True).ok
    assert m.convert(GPA + PAGE, PAGE, False).ok
    assert m.convert(GPA, 4 * PAGE, True).ok  # mixed: only the one shared page changes
    assert m.convert(GPA, 2 * MiB, True).ok  # nothing changes: nobody is told
    assert rec.calls[1:] == [
        ("before_to_private", GPA, 2 * MiB, False),  # still shared when the listener lets go
        ("after_to_shared", GPA + PAGE, PAGE, False),  # already shared when it maps
        ("before_to_private", GPA + PAGE, PAGE, False),
    ]


def test_iommu_maps_only_shared_pages(backend: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(backend, flavour="sw-protected", iommu="coordinated")
    iommu = m.iommu
    assert iommu is not None
    assert iommu.mapped(GPA, 8 * MiB) == 8 * MiB
    iommu.dma_fill(GPA, 2 * MiB, 0xD0)
    assert m.convert(GPA, 2 * MiB, True).ok
    assert iommu.mapped(GPA, 8 * MiB) == 6 * MiB
    with pytest.raises(IommuFault):
        iommu.dma_write(GPA + MiB, b"x" * 16)  # private now: the device must not reach it
    assert m.convert(GPA + MiB, 64 * 1024, False).ok
    iommu.dma_write(GPA + MiB, b"y" * 16)  # shared again: mapped again
    assert iommu.dma_read(GPA + MiB, 16) == b"y" * 16
    stats = iommu.stats()
    assert stats["dma_faults"] == 1 and stats["unmap_calls"] >= 1 and stats["peak_mapped_pages"] == 2048


def test_legacy_iommu_blocks_discard_not_conversion(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected", iommu="legacy")
    assert m.iommu is not None and m.iommu.mapped(GPA, 8 * MiB) == 8 * MiB
    assert m.convert(GPA, 2 * MiB, True).ok
    assert m.iommu.mapped(GPA, 2 * MiB) == 2 * MiB  # it cannot follow; so the shared copy stays
    assert m.converter.stats["shared_discards"] == 0 and m.converter.stats["shared_discards_skipped"] == 1
