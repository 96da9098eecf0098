"""Port of upstream ``tools/testing/selftests/kvm/x86/private_mem_conversions_test.c`` (per-VM memory
attributes with a separate shared backing, i.e. without in-place conversion).

A KVM_X86_SW_PROTECTED_VM gets one guest_memfd (flags 0) split over ``nr_memslots`` memslots
from slot 10 at GPA 4 GiB, with anonymous memory as each slot's shared side (userspace_addr).
Each vCPU owns a 2 MiB-aligned chunk and works on its first 2 MiB + 4 KiB.  The guest converts
memory with KVM_HC_MAP_GPA_RANGE; the host loop (one thread per vCPU) converts with
KVM_SET_MEMORY_ATTRIBUTES and, when asked, fallocate()s the guest_memfd (PUNCH_HOLE when going
shared, allocate when going private).  At every ``Sync`` the host checks that it still sees the
*shared* data -- private writes never show through -- and may write a new pattern.

Phases, as upstream's ``guest_code``: explicit conversion without and with fallocate; the
punch-hole test (after PUNCH_HOLE the guest reads zeros from private memory), once with the whole
chunk faulted in and once with only the target range; after the VM is freed, fallocate on the
guest_memfd still works.

The guest tells the host what to do through the hypercall's ``attrs`` argument, as upstream does
(KVM passes ``attrs`` through unchecked): the real ``KVM_MAP_GPA_RANGE_ENCRYPTED`` bit selects
private/shared, and two test-private bits ask for fallocate and for "punch only, don't touch
attributes" (upstream's MAP_GPA_DO_FALLOCATE and missing MAP_GPA_SET_ATTRIBUTES).

Upstream's test options ``-n nr_vcpus -m nr_memslots`` become parameters.  Hosts without
KVM_X86_SW_PROTECTED_VM (or MEMORY_ATTRIBUTES / EXIT_HYPERCALL for MAP_GPA_RANGE) skip.

The in-place series changes the test for per-guest_memfd attributes (``in_place``): the
guest_memfd is created MMAP|INIT_SHARED and is the slots' only memory (the host's view is its
mmap), conversions go through the guest_memfd (``KVM_SET_MEMORY_ATTRIBUTES2``), and a host check
of memory the guest made private expects SIGBUS instead of the old shared data; as in the
series' v7, the guest re-writes its initial pattern after each iteration's punch, because the
punch now also clears the shared memory.  The series' ``private_mem_conversions_test.sh`` runs the
test over every backing source type; ``test_mem_conversions_backing`` does that on the model:
anonymous memory, anonymous memory in 2 MiB folios (THP), a memfd (shmem), and in place over
the guest_memfd in 4 KiB and in 2 MiB folios.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHypercall, GuestMemfd, Kvm, Mapping, Vm
from guestmem.errors import GuestAccessFault
from guestmem.guest.ops import MapGpaRange, Verify, Write

from .support import (
    PAGE,
    SZ_2M,
    SZ_4G,
    GuestScript,
    check,
    drive,
    require_cap,
    require_map_gpa_range_exit,
    require_vm_type,
    run_concurrently,
)

BASE_DATA_SLOT = 10
BASE_DATA_GPA = SZ_4G
PER_CPU_DATA_SIZE = SZ_2M + PAGE
PER_CPU_SIZE = -(-PER_CPU_DATA_SIZE // SZ_2M) * SZ_2M  # aligned up to 2 MiB

TEST_RANGES = [(0, PAGE), (0, SZ_2M), (PAGE, PAGE), (PAGE, SZ_2M), (SZ_2M, PAGE)]

MAP_PRIVATE = u.KVM_MAP_GPA_RANGE_ENCRYPTED
MAP_SHARED = u.KVM_MAP_GPA_RANGE_DECRYPTED
DO_FALLOCATE = 1 << 8  # test-private
NO_SET_ATTRIBUTES = 1 << 9  # test-private: punch-hole test "maps" shared by punching only

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


class ConversionHost:
    """The VMM side: one VM, its guest_memfd, and the host's view of the slots' shared memory:
    a separate backing (per-VM attributes), or the guest_memfd's own mmap (``in_place``)."""

    def __init__(self, vm: Vm, gmem: GuestMemfd, backing: Mapping, check_each: bool,
                 in_place: bool = False) -> None:
        self.vm = vm
        self.check_each = check_each  # False with several vCPU threads: see support.drive
        self.gmem = gmem
        self.backing = backing
        self.in_place = in_place

    def handle_hypercall(self, ex: ExitHypercall) -> None:
        assert ex.nr == u.KVM_HC_MAP_GPA_RANGE, f"wanted MAP_GPA_RANGE, got hypercall {ex.nr}"
        gpa, size = ex.gpa, ex.npages * PAGE
        shared = not ex.to_private
        if ex.attrs & DO_FALLOCATE:
            offset = gpa - BASE_DATA_GPA  # the slots bind the file contiguously from offset 0
            if shared:
                self.gmem.punch_hole(offset, size)
            else:
                self.gmem.allocate(offset, size)
            if self.check_each:
                check(self.vm)
        if not ex.attrs & NO_SET_ATTRIBUTES:
            if self.in_place:  # the series' vm_mem_set_memory_attributes: through the guest_memfd
                self.gmem.set_memory_attributes2(gpa - BASE_DATA_GPA, size, 0 if shared else PRIVATE)
            else:
                self.vm.set_memory_attributes(gpa, size, 0 if shared else PRIVATE)
        ex.ret = 0

    def sees(self, gpa: int, size: int, pattern: int, then_write: int | None = None,
             private: bool = False) -> Callable[[], None]:
        """A sync action: the host's (shared) view of [gpa, gpa+size) holds ``pattern``; then
        optionally the host writes ``then_write`` there.  For a range the guest made ``private``,
        in place, every page of the host's view is SIGBUS instead (the series' SYNC_PRIVATE)."""

        def action() -> None:
            offset = gpa - BASE_DATA_GPA
            if private and self.in_place:
                for page in range(offset, offset + size, PAGE):
                    with pytest.raises(GuestAccessFault):
                        self.backing.read(page, 1)
                return
            data = self.backing.read(offset, size)
            if data != bytes([pattern]) * size:
                bad = next(i for i, b in enumerate(data) if b != pattern)
                raise AssertionError(
                    f"host expected {pattern:#04x} at gpa {gpa + bad:#x}, got {data[bad]:#04x}")
            if then_write is not None:
                self.backing.fill(offset, size, then_write)

        return action


def explicit_conversion(s: GuestScript, host: ConversionHost, base: int, do_fallocate: bool) -> None:
    """upstream guest_test_explicit_conversion()."""
    def_p, init_p = 0xAA, 0xCC
    p1, p2, p3, p4 = 0x11, 0x22, 0x33, 0x44
    falloc = DO_FALLOCATE if do_fallocate else 0
    end = base + PER_CPU_DATA_SIZE

    # Memory is shared by default.
    s(Write(base, PER_CPU_DATA_SIZE, def_p), Verify(base, PER_CPU_DATA_SIZE, def_p))
    s.sync(host.sees(base, PER_CPU_DATA_SIZE, def_p, then_write=init_p))
    s(Verify(base, PER_CPU_DATA_SIZE, init_p))

    for offset, size in TEST_RANGES:
        gpa = base + offset
        npages = size // PAGE
        # Pattern one marks the test range apart from the rest (initial pattern).
        s(Write(gpa, size, p1))
        # Convert to private and write pattern two; the host keeps seeing the shared data.
        s(MapGpaRange(gpa, npages, MAP_PRIVATE | falloc))
        if size > PAGE:
            s(Write(gpa, PAGE, p2))
        else:
            s(Write(gpa, size, p2))
            s.sync(host.sees(gpa, size, p1, private=True))
            s(Verify(gpa, size, p2))
            if gpa > base:
                s(Verify(base, gpa - base, init_p))
            if gpa + size < end:
                s(Verify(gpa + size, end - (gpa + size), init_p))
            # Odd pages back to shared, to exercise holes in private ranges.
            for j in range(0, size, PAGE):
                if (j // PAGE) & 1:
                    s(MapGpaRange(gpa + j, 1, MAP_SHARED | falloc))
                    s.sync(host.sees(gpa + j, PAGE, p1, then_write=p3))
                    s(Verify(gpa + j, PAGE, p3))
                else:
                    s.sync(host.sees(gpa + j, PAGE, p1, private=True))
        # Everything back to shared; pattern three from the guest, four from the host.
        s(MapGpaRange(gpa, npages, MAP_SHARED | falloc))
        s(Write(gpa, size, p3))
        s.sync(host.sees(gpa, size, p3, then_write=p4))
        s(Verify(gpa, size, p4))
        # Reset to the initial pattern, and free all private memory (PUNCH_HOLE) for a clean slate.
        s(Write(gpa, size, init_p))
        s(MapGpaRange(base, PER_CPU_DATA_SIZE // PAGE, MAP_SHARED | DO_FALLOCATE))
        if host.in_place:  # the punch cleared the shared memory too (the series' v7 reset)
            s(Write(base, PER_CPU_DATA_SIZE, init_p))


def punch_hole(s: GuestScript, base: int, precise: bool) -> None:
    """upstream guest_test_punch_hole(): PUNCH_HOLE frees private memory; the next fault zeroes it."""
    init_p = 0xCC
    punch = MAP_SHARED | DO_FALLOCATE | NO_SET_ATTRIBUTES
    s(MapGpaRange(base, PER_CPU_DATA_SIZE // PAGE, MAP_PRIVATE))
    for offset, size in TEST_RANGES:
        gpa = base + offset
        s(MapGpaRange(base, PER_CPU_DATA_SIZE // PAGE, punch))  # free everything first
        if precise:
            s(Write(gpa, size, init_p), Verify(gpa, size, init_p))
        else:
            s(Write(base, PER_CPU_DATA_SIZE, init_p), Verify(base, PER_CPU_DATA_SIZE, init_p))
        s(MapGpaRange(gpa, size // PAGE, punch))
        s(Verify(gpa, size, 0))


PHASES: dict[str, Callable[[GuestScript, ConversionHost, int], None]] = {
    "conversion": lambda s, h, b: explicit_conversion(s, h, b, do_fallocate=False),
    "conversion_fallocate": lambda s, h, b: explicit_conversion(s, h, b, do_fallocate=True),
    "punch_hole": lambda s, h, b: punch_hole(s, b, precise=False),
    "punch_hole_precise": lambda s, h, b: punch_hole(s, b, precise=True),
}
ALL_PHASES = list(PHASES)  # upstream guest_code() order


Backing = Callable[[Kvm, Vm, int], tuple[GuestMemfd, Mapping, bool]]


def separate_backing(kvm: Kvm, vm: Vm, size: int) -> tuple[GuestMemfd, Mapping, bool]:
    """upstream's layout: a plain guest_memfd for the private side, anonymous memory beside it."""
    return vm.create_guest_memfd(size, 0), kvm.mmap_anonymous(size), False


def run_mem_conversions(kvm: Kvm, nr_vcpus: int, nr_memslots: int, phases: list[str],
                        backing_of: Backing = separate_backing) -> None:
    """upstream test_mem_conversions()."""
    memfd_size = PER_CPU_SIZE * nr_vcpus
    slot_size = memfd_size // nr_memslots
    assert slot_size * nr_memslots == memfd_size and slot_size % PAGE == 0, (
        f"the memfd size ({memfd_size:#x}) must divide cleanly into {nr_memslots} memslots")

    vm = require_vm_type(kvm, u.KVM_X86_SW_PROTECTED_VM)
    require_map_gpa_range_exit(kvm)
    with vm:
        gmem, backing, in_place = backing_of(kvm, vm, memfd_size)
        if not in_place:
            require_cap(vm, u.KVM_CAP_MEMORY_ATTRIBUTES, PRIVATE)
        require_cap(vm, u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
        host = ConversionHost(vm, gmem, backing, check_each=nr_vcpus == 1, in_place=in_place)
        for i in range(nr_memslots):
            vm.set_user_memory_region2(BASE_DATA_SLOT + i, u.KVM_MEM_GUEST_MEMFD,
                                       BASE_DATA_GPA + slot_size * i, slot_size, backing.addr + slot_size * i,
                                       guest_memfd=host.gmem, guest_memfd_offset=slot_size * i)
            check(vm)

        workers = []
        vcpus = [vm.create_vcpu(i) for i in range(nr_vcpus)]
        for i, vcpu in enumerate(vcpus):
            base = BASE_DATA_GPA + i * PER_CPU_SIZE
            script = GuestScript()
            for phase in phases:
                PHASES[phase](script, host, base)
            workers.append(functools.partial(drive, vm, vcpu, script, host.handle_hypercall,
                                             check_each=host.check_each))
        run_concurrently(workers)
        check(vm)
        for vcpu in vcpus:
            vcpu.close()

    # The guest_memfd holds a reference to its VM, so allocating and freeing still works after
    # the VM fd is closed.
    check(kvm)
    host.gmem.fallocate(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE, 0, memfd_size)
    host.gmem.fallocate(u.FALLOC_FL_KEEP_SIZE, 0, memfd_size)
    backing.close()
    host.gmem.close()
    check(kvm)


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_mem_conversions_phase(backend: Kvm, phase: str) -> None:
    """One phase of upstream's guest_code on its own (1 vCPU, 1 memslot), in a fresh VM."""
    run_mem_conversions(backend, 1, 1, [phase])


@pytest.mark.parametrize(("nr_vcpus", "nr_memslots"), [
    pytest.param(1, 1, id="1vcpu-1slot"),
    pytest.param(1, 2, id="1vcpu-2slots"),
    pytest.param(2, 1, id="2vcpus-1slot"),
    pytest.param(2, 4, id="2vcpus-4slots"),
    pytest.param(4, 2, id="4vcpus-2slots"),
])
def test_mem_conversions(backend: Kvm, nr_vcpus: int, nr_memslots: int) -> None:
    """upstream's whole guest_code (both conversion runs, both punch-hole runs) on every vCPU, one
    host thread per vCPU, the guest_memfd split over several memslots (slots of 2 MiB cut through
    a vCPU's 2 MiB + 4 KiB working range)."""
    if (getattr(getattr(backend, "options", None), "cpu", "ops") == "x86" and nr_vcpus * nr_memslots > 2
            and not os.environ.get("GUESTMEM_X86_FULL")):
        # Suite time: the x86 vCPU runs each variant at engine speed (tens of seconds for the
        # larger ones); the 1- and 2-vCPU single-slot and 2-slot runs already cover its
        # concurrent shootdowns and cross-slot faults.
        pytest.skip("model-x86 runs the smaller variants only; GUESTMEM_X86_FULL=1 runs this one")
    run_mem_conversions(backend, nr_vcpus, nr_memslots, ALL_PHASES)


# --- the series' private_mem_conversions_test.sh: every backing source type (model) -----------------


def in_place_backing(kvm: Kvm, vm: Vm, size: int) -> tuple[GuestMemfd, Mapping, bool]:
    """The in-place series: one guest_memfd, MMAP|INIT_SHARED, that is also the host's memory."""
    gmem = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    return gmem, gmem.mmap(size), True


def shmem_backing(kvm: Kvm, vm: Vm, size: int) -> tuple[GuestMemfd, Mapping, bool]:
    """VM_MEM_SRC_SHMEM: the shared side is a memfd mapped MAP_SHARED (the model's process mmap,
    2 MiB-aligned like the guest range)."""
    memfd = kvm.memfd_create(size)  # type: ignore[attr-defined]
    mapping = kvm.process.mmap(memfd, size, 0, align=SZ_2M)  # type: ignore[attr-defined]
    memfd.close()
    return vm.create_guest_memfd(size, 0), mapping, False


BACKINGS: dict[str, tuple[dict[str, object], Backing]] = {
    "anonymous": ({}, separate_backing),
    "anonymous_thp": ({"anon_folio_order": 9}, separate_backing),
    "shmem": ({}, shmem_backing),
    "in_place": ({"attributes": "gmem"}, in_place_backing),
    "in_place_2m_folios": ({"attributes": "gmem", "gmem_folio_order": 9}, in_place_backing),
}


@pytest.mark.parametrize(("nr_vcpus", "nr_memslots"), [
    pytest.param(1, 1, id="1vcpu-1slot"),
    pytest.param(2, 4, id="2vcpus-4slots"),
])
@pytest.mark.parametrize("src", list(BACKINGS))
def test_mem_conversions_backing(src: str, nr_vcpus: int, nr_memslots: int) -> None:
    """private_mem_conversions_test.c over each backing source type, as the series' .sh runs it,
    on the model: per-VM attributes over anonymous memory (4 KiB and 2 MiB folios) and a memfd,
    and in place (per-guest_memfd attributes, the host's view is the guest_memfd's mmap and
    private memory is SIGBUS to it) in 4 KiB and in 2 MiB guest_memfd folios."""
    options, backing_of = BACKINGS[src]
    with guestmem.open("model", **options) as kvm:  # type: ignore[arg-type]
        run_mem_conversions(kvm, nr_vcpus, nr_memslots, ALL_PHASES, backing_of)
