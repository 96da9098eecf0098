"""In-place conversion: chosen by capability (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES), one copy of
memory, attributes set on the guest_memfd, nothing to discard, and the ordering that makes it work
with DMA: an IOMMU that pins shared pages must let go before they go private (else EAGAIN)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vmm_helpers import GPA, PAGE, E, MachineFactory, MiB, hypercall, run_program

import guestmem
import guestmem.uapi as u
from guestmem.api import Kvm
from guestmem.errors import GuestAccessFault
from guestmem.guest.ops import MapGpaRange, Sync, Verify, Write
from guestmem.vmm import Strategy


def _open(**options: object) -> Kvm:
    try:
        return guestmem.open("model", attributes="gmem", **options)
    except ValueError as exc:  # an older model without in-place conversion
        pytest.skip(f"the model lacks per-guest_memfd attributes: {exc}")


@pytest.fixture(params=["v5", "v8"])
def gmem_model(request: pytest.FixtureRequest) -> Iterator[Kvm]:
    kvm = _open(inplace_revision=request.param)
    yield kvm
    kvm.close()


def test_capability_picks_inplace(gmem_model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(gmem_model, flavour="sw-protected")
    assert m.caps.gmem_attributes & u.KVM_MEMORY_ATTRIBUTE_PRIVATE and not m.caps.vm_attributes
    assert m.strategy is Strategy.INPLACE


def test_one_copy_and_contents_in_place(gmem_model: Kvm, make_machine: MachineFactory) -> None:
    """The host loads data into shared memory, the guest converts it and reads it as private (the
    same pages), and the host can no longer touch it."""
    m = make_machine(gmem_model, flavour="sw-protected", slack=0)
    size = 2 * MiB
    m.host_fill(GPA, size, 0x4B)
    contents_kept = bool(m.caps.content_modes & u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE) or \
        not m.caps.content_modes
    run_program(m, [MapGpaRange(GPA, size // PAGE, E),
                    *([Verify(GPA, size, 0x4B)] if contents_kept else []),
                    Write(GPA, size, 0x22), Verify(GPA, size, 0x22)])
    with pytest.raises(GuestAccessFault):
        m.host_read(GPA, 1)
    stats = m.converter.stats
    assert stats["shared_discards"] == 0 and stats["private_punches"] == 0
    res = m.accounting.measure()
    assert res.double == 0 and res.frames == size // PAGE and m.accounting.bound_ok


def test_coordinated_iommu_unmaps_before_private(gmem_model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(gmem_model, flavour="sw-protected", iommu="coordinated")
    ex = hypercall(GPA, 512, E | u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M)
    m.converter.handle_map_gpa_range(ex, 0, None)
    assert ex.ret == 0, "the pins went before the conversion, so no EAGAIN"
    assert m.iommu is not None and m.iommu.mapped(GPA, 2 * MiB) == 0


def test_legacy_iommu_pins_make_private_fail(gmem_model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(gmem_model, flavour="sw-protected", iommu="legacy")
    ex = hypercall(GPA, 16, E)
    out = m.converter.handle_map_gpa_range(ex, 0, None)
    assert ex.ret == -u.KVM_EINVAL and out.error is not None and "EAGAIN" in out.error
    assert not m.tracker.is_private(GPA // PAGE), "a failed conversion changes nothing"


def test_failed_conversion_gives_the_listener_its_mappings_back(gmem_model: Kvm,
                                                                make_machine: MachineFactory) -> None:
    """The coordinated IOMMU lets go before to-private; when the conversion then fails (a pin
    held by someone else: EAGAIN), the range is still shared and is mapped again."""
    m = make_machine(gmem_model, flavour="sw-protected", iommu="coordinated")
    assert m.iommu is not None
    with m.regions[0].shared.pin(0, PAGE):  # a foreign pin, e.g. an O_DIRECT read in flight
        ex = hypercall(GPA, 16, E)
        out = m.converter.handle_map_gpa_range(ex, 0, None)
    assert ex.ret == -u.KVM_EINVAL and out.error is not None and "EAGAIN" in out.error
    assert m.iommu.mapped(GPA, 16 * PAGE) == 16 * PAGE
    m.iommu.dma_write(GPA, b"still shared")


def test_bounce_buffer_in_place(gmem_model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(gmem_model, flavour="sw-protected")
    buf = 64 * 1024
    seen: list[bytes] = []

    def device(_v: int) -> None:
        seen.append(m.host_read(GPA, buf))
        m.host_fill(GPA, buf, 0xE1)

    run_program(m, [MapGpaRange(GPA, 2 * MiB // PAGE, E), MapGpaRange(GPA, buf // PAGE, 0),
                    Write(GPA, buf, 0xD0, "shared"), Sync(1), Verify(GPA, buf, 0xE1, "shared")], device)
    assert seen == [bytes([0xD0]) * buf]
    assert m.accounting.measure().double == 0
