"""The race kit: small named configurations, 2-3 threads each, on the flavours they apply to.

Each race builds a fresh model (``guestmem.open("model", ...)``) with the state set up
sequentially, then hands the explorer a few thread bodies that race on one or two pages, and a
postcondition checked once every thread is done.  Names are ``RACE:FLAVOUR`` (``sw`` =
KVM_X86_SW_PROTECTED_VM, ``snp``, ``tdx``; ``sw-gmem`` = in-place conversion, per-guest_memfd
attributes, RFC v5 content modes with invariant 7 checked at run time).  ``small`` races are
explored exhaustively up to 2 preemptions by the tests; the others with PCT.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import guestmem
from guestmem import uapi as u
from guestmem.api import ExitHalt, ExitMemoryFault
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest import Accept, Halt, Program, Write
from guestmem.sync import schedule_point

PS = u.PAGE_SIZE
GPA = 1 << 32
NPAGES = 4
P = 1  # the page the threads race on
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
VM_TYPES = {"sw": u.KVM_X86_SW_PROTECTED_VM, "snp": u.KVM_X86_SNP_VM, "tdx": u.KVM_X86_TDX_VM}


@dataclass
class World:
    """One freshly built configuration: the model objects, the thread bodies, the postcondition."""

    kvm: Any
    vm: Any
    threads: dict[str, Callable[[], object]]
    post: Callable[[World, dict[str, object]], str | None] = lambda w, r: None
    gmem: Any = None
    mapping: Any = None
    notes: dict[str, object] = field(default_factory=dict)

    def close(self) -> None:
        try:
            self.kvm.close()
        except Exception:  # a half-torn-down model after a finding; the pool goes anyway
            pass


@dataclass(frozen=True)
class Race:
    name: str
    flavour: str
    summary: str
    build: Callable[[str], World]
    small: bool = True
    # Violations the unmutated model shows here (message substrings): real findings, recorded in
    # docs and xfailed in the tests.  With a mutant applied they are skipped, so the search
    # reports the mutant's own violation.
    known: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}:{self.flavour}"


# --- building blocks ----------------------------------------------------------------------------

def _outcome(fn: Callable[[], object]) -> Callable[[], object]:
    """Run a host call or a vCPU; return what it did as a short string (errors are outcomes)."""
    def body() -> object:
        try:
            res = fn()
        except KvmError as e:
            return f"error {errno.errorcode.get(e.errno or 0, e.errno)}"
        except GuestAccessFault:
            return "SIGBUS"
        if isinstance(res, ExitHalt):
            return "halt"
        if isinstance(res, ExitMemoryFault):
            return f"memory-fault {errno.errorcode.get(res.errno, res.errno)}"
        return "ok" if res is None else type(res).__name__
    return body


def per_vm(flavour: str, *, private: bool = True, prefault: bool = True, folio_order: int = 0,
           npages: int = NPAGES) -> World:
    """A VM with per-VM attributes: one guest_memfd slot (shared backing from anonymous memory),
    every page private (or shared), page P pre-faulted so a stale SPTE has something to be."""
    kvm = guestmem.open("model", pool_bytes=1 << 32, gmem_folio_order=folio_order)
    vm = kvm.create_vm(VM_TYPES[flavour])
    size = npages * PS
    gmem = vm.create_guest_memfd(size, 0)
    if folio_order:
        # Shared memory aligned like the guest range, so hugepages are allowed at all.
        shared = kvm.process.mmap(kvm.memfd_create(size), size, 0, align=PS << folio_order)
    else:
        shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, shared.addr, gmem, 0)
    if private:
        vm.set_memory_attributes(GPA, size, PRIVATE)
    if flavour != "sw":
        vm.launch_finalize()
    vcpu = vm.create_vcpu(0)
    if prefault:
        vcpu.pre_fault_memory(GPA + P * PS, PS)
    return World(kvm, vm, {}, gmem=gmem, mapping=shared, notes={"vcpu": vcpu})


def in_place(*, shared: bool = True, folio_order: int = 0, npages: int = NPAGES, prefault: bool = True
             ) -> World:
    """An SW_PROTECTED VM with in-place conversion: a mmap-able guest_memfd (INIT_SHARED) that is
    the guest's only memory, page P written by the host and pre-faulted."""
    kvm = guestmem.open("model", pool_bytes=1 << 32, attributes="gmem", inplace_revision="v5",
                        check_content_modes=True, gmem_folio_order=folio_order)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    size = npages * PS
    flags = u.GUEST_MEMFD_FLAG_MMAP | (u.GUEST_MEMFD_FLAG_INIT_SHARED if shared else 0)
    gmem = vm.create_guest_memfd(size, flags)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gmem, 0)
    m = gmem.mmap(size)
    if shared:
        m.fill(P * PS, PS, 0x11)
    vcpu = vm.create_vcpu(0)
    if prefault:
        vcpu.pre_fault_memory(GPA + P * PS, PS)
    return World(kvm, vm, {}, gmem=gmem, mapping=m, notes={"vcpu": vcpu})


def vcpu_write(w: World, first: int = P, n: int = 2, pattern: int = 0xAA) -> Callable[[], object]:
    """The guest writes ``n`` pages from ``first``; a confidential guest accepts (PVALIDATE /
    TDG.MEM.PAGE.ACCEPT) them first, as it must before touching private memory (a no-op on sw)."""
    vcpu = w.notes["vcpu"]
    vcpu.load(Program([Accept(GPA + first * PS, n * PS), Write(GPA + first * PS, n * PS, pattern), Halt()]))
    return _outcome(vcpu.run)


# --- the races ------------------------------------------------------------------------------------

def _fault_vs_attr(flavour: str) -> World:
    w = per_vm(flavour)
    w.threads = {"vcpu": vcpu_write(w),
                 "convert": _outcome(lambda: w.vm.set_memory_attributes(GPA + P * PS, 2 * PS, 0))}
    return w


def _fault_vs_inplace(flavour: str) -> World:
    w = in_place()
    gmem = w.gmem
    w.threads = {"vcpu": vcpu_write(w, n=1),
                 "convert": _outcome(lambda: gmem.set_memory_attributes2(
                     P * PS, PS, PRIVATE, u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE))}

    def post(w: World, results: dict[str, object]) -> str | None:
        # No lost write under PRESERVE: a write the guest completed is what the page holds now,
        # whichever side of the conversion it landed on.
        if results["vcpu"] != "halt":
            return None
        inode = w.gmem.inode
        (_s, _e, pfn, _o), = [r for r in inode.cache.lookup_range(P, P + 1)]
        page = w.vm.arch.guest_read(w.kvm.pool, pfn, 0, PS, inode.is_private(P))
        if (page != 0xAA).any():
            return f"lost write: the guest's completed write is gone after PRESERVE ({results})"
        return None
    w.post = post
    return w


def _fault_vs_punch(flavour: str) -> World:
    w = per_vm(flavour)
    w.threads = {"vcpu": vcpu_write(w),
                 "punch": _outcome(lambda: w.gmem.punch_hole(P * PS, 2 * PS))}
    return w


def _fault_vs_close(flavour: str) -> World:
    w = per_vm(flavour)
    w.threads = {"vcpu": vcpu_write(w), "close": _outcome(w.gmem.close)}
    return w


def _run_vs_slot_delete(flavour: str) -> World:
    w = per_vm(flavour)
    w.threads = {"vcpu": vcpu_write(w),
                 "delete": _outcome(lambda: w.vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 0,
                                                                         w.mapping.addr, w.gmem, 0))}
    return w


def _convert_vs_pin(flavour: str) -> World:
    w = in_place(prefault=False)

    def pin() -> object:
        with w.mapping.pin(P * PS, PS):
            w.notes["pinned"] = True
            schedule_point("host: holding the pin")
        return "ok"

    def post(w: World, results: dict[str, object]) -> str | None:
        # EAGAIN exactly when a pin is held: a refused conversion must have seen a pin.
        if results["convert"] == "error EAGAIN" and not w.notes.get("pinned"):
            return "EAGAIN without any pin having been taken"
        return None
    w.threads = {"pin": _outcome(pin),
                 "convert": _outcome(lambda: w.gmem.set_memory_attributes2(P * PS, PS, PRIVATE, 0))}
    w.post = post
    return w


def _convert_vs_host_access(flavour: str) -> World:
    w = in_place(prefault=False)
    w.threads = {"host": _outcome(lambda: w.mapping.fill(P * PS, PS, 0x22)),
                 "convert": _outcome(lambda: w.gmem.set_memory_attributes2(P * PS, PS, PRIVATE, 0))}
    return w


def _overlapping_conversions(flavour: str) -> World:
    if flavour == "sw-gmem":
        w = in_place(prefault=True)
        g = w.gmem
        w.threads = {"convert-a": _outcome(lambda: g.set_memory_attributes2(0, 3 * PS, PRIVATE, 0)),
                     "convert-b": _outcome(lambda: g.set_memory_attributes2(2 * PS, 2 * PS, 0, 0)),
                     "vcpu": vcpu_write(w, first=2, n=1)}

        def attrs(w: World) -> tuple[int, ...]:
            return tuple(w.gmem.inode.attributes.get(i) for i in range(NPAGES))
        a_then_b, b_then_a = (PRIVATE, PRIVATE, 0, 0), (PRIVATE, PRIVATE, PRIVATE, 0)
    else:
        w = per_vm(flavour, private=False)
        vm = w.vm
        w.threads = {"convert-a": _outcome(lambda: vm.set_memory_attributes(GPA, 3 * PS, PRIVATE)),
                     "convert-b": _outcome(lambda: vm.set_memory_attributes(GPA + 2 * PS, 2 * PS, 0)),
                     "vcpu": vcpu_write(w, first=2, n=1)}

        def attrs(w: World) -> tuple[int, ...]:
            return tuple(w.vm.attributes.get(GPA // PS + i) for i in range(NPAGES))
        a_then_b, b_then_a = (PRIVATE, PRIVATE, 0, 0), (PRIVATE, PRIVATE, PRIVATE, 0)

    def post(w: World, results: dict[str, object]) -> str | None:
        got = attrs(w)
        if got not in (a_then_b, b_then_a):
            return f"attributes {got} are neither serial order's result"
        return None
    w.post = post
    return w


def _prefault_vs_convert(flavour: str) -> World:
    w = per_vm(flavour, prefault=False)
    vcpu = w.notes["vcpu"]
    w.threads = {"prefault": _outcome(lambda: vcpu.pre_fault_memory(GPA + P * PS, 2 * PS)),
                 "convert": _outcome(lambda: w.vm.set_memory_attributes(GPA + P * PS, 2 * PS, 0))}
    return w


def _memfail_vs_fault(flavour: str) -> World:
    w = per_vm(flavour)
    w.threads = {"vcpu": vcpu_write(w), "memfail": _outcome(lambda: w.gmem.memory_failure(P * PS))}
    return w


def _storm(flavour: str) -> World:
    """Four threads: two vCPUs on overlapping pages, a conversion to shared and a hole punch."""
    w = per_vm(flavour)
    other = w.vm.create_vcpu(1)
    other.load(Program([Accept(GPA + 2 * PS, 2 * PS), Write(GPA + 2 * PS, 2 * PS, 0xBB), Halt()]))
    w.threads = {"vcpu0": vcpu_write(w), "vcpu1": _outcome(other.run),
                 "convert": _outcome(lambda: w.vm.set_memory_attributes(GPA + P * PS, 2 * PS, 0)),
                 "punch": _outcome(lambda: w.gmem.punch_hole(2 * PS, 2 * PS))}
    return w


HUGE = 512


def _hugepage_vs_fault(flavour: str) -> World:
    if flavour == "sw-gmem":
        w = in_place(shared=False, folio_order=9, npages=HUGE, prefault=False)
        w.notes["vcpu"].pre_fault_memory(GPA, PS)  # the 2 MiB folio exists and is mapped huge
        g = w.gmem

        def convert() -> object:
            g.set_memory_attributes2(7 * PS, PS, 0, 0)  # split the 2 MiB folio
            g.set_memory_attributes2(7 * PS, PS, PRIVATE, 0)  # and merge it back
            return "ok"
    else:
        w = per_vm(flavour, folio_order=9, npages=HUGE, prefault=False)
        vm = w.vm

        def convert() -> object:
            vm.set_memory_attributes(GPA + 7 * PS, PS, 0)  # the 2 MiB range becomes MIXED
            vm.set_memory_attributes(GPA + 7 * PS, PS, PRIVATE)  # and uniform again
            return "ok"
    vcpu = w.notes["vcpu"]
    vcpu.load(Program([Write(GPA, PS, 0xAA), Write(GPA + 8 * PS, PS, 0xBB), Halt()]))
    w.threads = {"vcpu": _outcome(vcpu.run), "convert": _outcome(convert)}
    return w


# A race's ``known`` lists violations already recorded as model findings (docs/explore.md), which
# --skip-known steps over; the five the explorer found in the model are fixed, so none is listed.


def _hugepage_alloc_vs_convert(flavour: str) -> World:
    """As hugepage-vs-fault, but nothing is allocated before the conversion: the first fault
    allocates the 2 MiB folio after the attributes became mixed."""
    w = in_place(shared=False, folio_order=9, npages=HUGE, prefault=False)
    g = w.gmem
    vcpu = w.notes["vcpu"]
    vcpu.load(Program([Write(GPA, PS, 0xAA), Halt()]))
    w.threads = {"vcpu": _outcome(vcpu.run),
                 "convert": _outcome(lambda: g.set_memory_attributes2(7 * PS, PS, 0, 0))}
    return w


def _races() -> list[Race]:
    out: list[Race] = []

    def add(name: str, flavours: tuple[str, ...], summary: str, build: Callable[[str], World],
            small: bool = True, known: tuple[str, ...] = ()) -> None:
        for fl in flavours:
            out.append(Race(name, fl, summary, build, small, known))

    per_vm_flavours = ("sw", "snp", "tdx")
    add("fault-vs-attr", per_vm_flavours, "vCPU fault vs KVM_SET_MEMORY_ATTRIBUTES (private->shared)",
        _fault_vs_attr)
    add("fault-vs-inplace", ("sw-gmem",), "vCPU write vs in-place conversion to private with PRESERVE",
        _fault_vs_inplace)
    add("fault-vs-punch", per_vm_flavours, "vCPU fault vs guest_memfd hole punch",
        _fault_vs_punch)
    add("fault-vs-close", per_vm_flavours, "vCPU fault vs the last close of the guest_memfd",
        _fault_vs_close)
    add("run-vs-slot-delete", per_vm_flavours, "a vCPU inside KVM_RUN vs deleting its memslot",
        _run_vs_slot_delete)
    add("convert-vs-pin", ("sw-gmem",), "in-place conversion to private vs a host GUP pin",
        _convert_vs_pin)
    add("convert-vs-host-access", ("sw-gmem",), "in-place conversion to private vs host mmap writes",
        _convert_vs_host_access)
    add("overlapping-conversions", ("sw", "sw-gmem"), "two overlapping conversions and a vCPU write",
        _overlapping_conversions, small=False)
    add("prefault-vs-convert", ("sw",), "KVM_PRE_FAULT_MEMORY vs a conversion to shared",
        _prefault_vs_convert)
    add("memfail-vs-fault", per_vm_flavours, "memory failure on a guest_memfd page vs a vCPU fault",
        _memfail_vs_fault)
    huge = "2 MiB folio split/merge (MIXED) vs a vCPU fault"
    add("hugepage-vs-fault", ("sw",), huge, _hugepage_vs_fault, small=False)
    add("hugepage-vs-fault", ("sw-gmem",), huge, _hugepage_vs_fault, small=False)
    add("storm", per_vm_flavours, "two vCPUs vs a conversion vs a hole punch (4 threads, PCT)", _storm,
        small=False)
    add("hugepage-alloc-vs-convert", ("sw-gmem",), "first fault allocating a 2 MiB folio vs a conversion "
        "inside it", _hugepage_alloc_vs_convert)
    return out


RACES: list[Race] = _races()
BY_ID: dict[str, Race] = {r.id: r for r in RACES}


def select(names: list[str]) -> list[Race]:
    """Races by id (``fault-vs-punch:sw``) or by name (every flavour); none = the whole kit."""
    if not names:
        return list(RACES)
    out: list[Race] = []
    for n in names:
        hits = [BY_ID[n]] if n in BY_ID else [r for r in RACES if r.name == n]
        if not hits:
            raise KeyError(n)
        out.extend(h for h in hits if h not in out)
    return out
