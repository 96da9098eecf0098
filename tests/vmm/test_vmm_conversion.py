"""The conversion manager on real backends: how MAP_GPA_RANGE and memory-fault exits are answered,
what a conversion does to memory (checked through the guest and the host, not just bookkeeping),
and which requests are refused.  Tests that need private memory skip on a backend without it,
naming the capability."""

from __future__ import annotations

import pytest
from vmm_helpers import GPA, PAGE, PRIVATE_FLAG, SZ_1G, SZ_2M, E, MachineFactory, MiB, hypercall, run_program

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitMemoryFault, Kvm
from guestmem.guest.ops import Accept, MapGpaRange, Sync, Verify, Write
from guestmem.vmm import RegionSpec, Strategy

EHWPOISON = 133  # Linux; Python's errno module does not name it


@pytest.mark.parametrize("args, ret", [
    pytest.param((GPA, 1, E | 0x100), -u.KVM_EINVAL, id="unknown-attr-bit"),
    pytest.param((GPA, 512, E | SZ_2M | SZ_1G), -u.KVM_EINVAL, id="both-size-bits"),
    pytest.param((GPA + PAGE, 512, E | SZ_2M), -u.KVM_EINVAL, id="2M-request-unaligned-gpa"),
    pytest.param((GPA, 513, E | SZ_2M), -u.KVM_EINVAL, id="2M-request-odd-size"),
    pytest.param((GPA, 0, E), -u.KVM_EINVAL, id="npages-0"),
    pytest.param((0xC000_0000, 1, E), -u.KVM_EINVAL, id="private-mmio-hole"),
    pytest.param((GPA, 1, E, 11), -u.KVM_ENOSYS, id="other-hypercall"),
    pytest.param((0xC000_0000, 262144, 0), 0, id="shared-mmio-hole-ignored"),
    pytest.param((GPA, 512, E | SZ_2M), 0, id="2M-request-aligned"),
    pytest.param((GPA + PAGE, 3, E), 0, id="4K-request"),
])
def test_map_gpa_range_answers(backend: Kvm, make_machine: MachineFactory, args: tuple[int, ...],
                               ret: int) -> None:
    m = make_machine(backend, flavour="sw-protected")
    ex = hypercall(*args)
    before = list(m.tracker.kind_runs(GPA // PAGE, (GPA + 8 * MiB) // PAGE))
    out = m.converter.handle_map_gpa_range(ex, 0, None)
    assert ex.ret == ret and out.ret == ret
    after = list(m.tracker.kind_runs(GPA // PAGE, (GPA + 8 * MiB) // PAGE))
    if ret or not ex.to_private or m.layout.region_at(ex.gpa) is None:
        assert after == before, "a refused or hole-only request changed nothing"
    else:
        first, last = ex.gpa // PAGE, ex.gpa // PAGE + ex.npages
        assert all(m.tracker.is_private(g) for g in (first, last - 1))
        assert not m.tracker.is_private(last)


def test_private_pages_hide_host_writes(backend: Kvm, make_machine: MachineFactory) -> None:
    """A request crossing two memslots converts both: after it, what the host writes to the shared
    side is not what the guest reads (it reads its own private data)."""
    regions = (RegionSpec("a", GPA, 2 * MiB), RegionSpec("b", GPA + 2 * MiB, 2 * MiB))
    m = make_machine(backend, regions=regions, flavour="sw-protected")
    span = (GPA + MiB, 2 * MiB)  # crosses from region a into region b

    def host(_value: int) -> None:
        m.host_fill(*span, 0xEE)

    run_program(m, [MapGpaRange(span[0], span[1] // PAGE, E), Write(*span, 0x5A), Sync(1),
                    Verify(*span, 0x5A)], host)
    assert m.converter.stats["conversions"] == 1
    assert m.tracker.is_private((GPA + MiB) // PAGE) and m.tracker.is_private((GPA + 3 * MiB - 1) // PAGE)


def test_memory_fault_exits(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected")
    ok = m.converter.handle_memory_fault(ExitMemoryFault(GPA + 5 * PAGE, PAGE, PRIVATE_FLAG), 0, None)
    assert ok.ok and m.tracker.is_private(GPA // PAGE + 5) and not m.tracker.is_private(GPA // PAGE + 6)
    back = m.converter.handle_memory_fault(ExitMemoryFault(GPA + 5 * PAGE, PAGE, 0), 0, None)
    assert back.ok and not m.tracker.is_private(GPA // PAGE + 5)
    for bad in (ExitMemoryFault(GPA, PAGE, 1 << 0),  # a flag nobody defined
                ExitMemoryFault(GPA, PAGE, PRIVATE_FLAG, EHWPOISON),
                ExitMemoryFault(0xC000_0000, PAGE, PRIVATE_FLAG)):
        out = m.converter.handle_memory_fault(bad, 0, None)
        assert not out.ok and out.error


def test_lazy_accept_by_touch_on_snp(model: Kvm, make_machine: MachineFactory) -> None:
    """Where the hardware tags private accesses, touching shared memory as private is a memory-fault
    exit; the VMM converts each page and the guest goes on."""
    m = make_machine(model, flavour="snp")
    run_program(m, [Accept(GPA, 16 * PAGE), Write(GPA, 16 * PAGE, 0x11, "private"),
                    Verify(GPA, 16 * PAGE, 0x11, "private")])
    assert m.converter.stats["memory_faults"] == 16
    assert all(m.tracker.is_private(GPA // PAGE + i) for i in range(16))


def test_shared_only_vm_refuses_private(backend: Kvm, make_machine: MachineFactory) -> None:
    """A VM without private memory (guest_memfd MMAP|INIT_SHARED RAM where available): to-shared is
    already true, to-private is an error to the guest; host and guest see the same memory.

    (The requests are handed to the manager directly: on this host's kernel a guest's vmcall never
    completes, although KVM_CAP_EXIT_HYPERCALL says MAP_GPA_RANGE exits.)"""
    m = make_machine(backend, flavour="default")
    assert m.strategy in (Strategy.SHARED_ONLY, Strategy.ANONYMOUS)
    shared, private = hypercall(GPA, 16, 0), hypercall(GPA, 16, E)
    m.converter.handle_map_gpa_range(shared, 0, None)
    m.converter.handle_map_gpa_range(private, 0, None)
    assert (shared.ret, private.ret) == (0, -u.KVM_EINVAL)
    seen: list[bytes] = []

    def host(_value: int) -> None:
        seen.append(m.host_read(GPA, 64 * 1024))
        m.host_fill(GPA, 64 * 1024, 0x4D)

    run_program(m, [Write(GPA, 64 * 1024, 0x3C), Sync(1), Verify(GPA, 64 * 1024, 0x4D)], host)
    assert seen == [bytes([0x3C]) * 64 * 1024]


def test_prefault_after_conversion(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected", prefault="private")
    m.create_vcpus(1)
    assert m.convert(GPA, 2 * MiB, True).ok
    assert m.converter.stats["prefaulted_bytes"] == 2 * MiB
    assert m.introspection is not None
    levels = m.introspection.mapping_levels(m.vm, GPA // PAGE, (GPA + 2 * MiB) // PAGE)
    assert levels is not None and sum(e - s for s, e, _, private in levels if private) == 512


def test_prefault_unsupported_is_tolerated(make_machine: MachineFactory) -> None:
    kvm = guestmem.open("model", tdp_mmu=False)  # a shadow-paging host: KVM_PRE_FAULT_MEMORY is EOPNOTSUPP
    try:
        m = make_machine(kvm, flavour="sw-protected", prefault="private")
        m.create_vcpus(1)
        assert m.convert(GPA, 2 * MiB, True).ok
        assert m.converter.stats["prefaulted_bytes"] == 0
    finally:
        m.close()
        kvm.close()
