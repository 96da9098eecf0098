"""Port of upstream ``tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c`` (per-VM memory
attributes, i.e. without in-place conversion), plus one extra case from the fault-path table
(spec section 3: a private access whose guest_memfd has been closed).

Upstream's guest reads ``EXITS_TEST_GPA`` in an endless loop while the host deletes the slot from
another thread.  ``test_private_access_memslot_deleted_while_running`` does that: the vCPU thread
is inside one ``KVM_RUN`` (its guest has announced itself through a shared page and is reading
the private page over and over) when the main thread deletes the slot.  The exit is upstream's:
``KVM_RUN`` fails with EFAULT and ``KVM_EXIT_MEMORY_FAULT {flags = PRIVATE, gpa =
EXITS_TEST_GPA, size = PAGE_SIZE}``.  ``test_private_access_memslot_deleted`` does the same at a
known point (between runs), deterministically, and adds the re-creation of the slot.  With
per-guest_memfd attributes (the in-place series) a gfn without a slot has no private attribute,
so the same race ends in ``KVM_EXIT_MMIO`` (an 8-byte read at EXITS_TEST_GPA), as the series'
version of the test expects; the model runs that too.

These need a KVM_X86_SW_PROTECTED_VM and KVM_SET_MEMORY_ATTRIBUTES(PRIVATE); hosts without them
skip, naming what they lack.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

import guestmem
import guestmem.uapi as u
from guestmem.api import (
    Exit,
    ExitHalt,
    ExitMemoryFault,
    ExitMmio,
    ExitSync,
    GuestMemfd,
    Kvm,
    Mapping,
    Vcpu,
    Vm,
)
from guestmem.guest.ops import Program, Sync, Verify, Write

from .support import HANG_TIMEOUT, PAGE, check, require_cap, require_vm_type

EXITS_TEST_GPA = 0xC0000000
EXITS_TEST_NPAGES = 1
EXITS_TEST_SIZE = EXITS_TEST_NPAGES * PAGE
EXITS_TEST_SLOT = 10

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def protected_vm(kvm: Kvm) -> Vm:
    vm = require_vm_type(kvm, u.KVM_X86_SW_PROTECTED_VM)
    require_cap(vm, u.KVM_CAP_MEMORY_ATTRIBUTES, PRIVATE)
    return vm


def run_checked(vm: Vm, vcpu: Vcpu) -> Exit:
    ex = vcpu.run()
    check(vm)
    return ex


def assert_private_memory_fault(ex: Exit) -> None:
    assert isinstance(ex, ExitMemoryFault), f"expected KVM_EXIT_MEMORY_FAULT, got {ex!r}"
    assert ex.errno == errno.EFAULT
    assert ex.flags == u.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert ex.private
    assert ex.gpa == EXITS_TEST_GPA
    assert ex.size == EXITS_TEST_SIZE


def read_sync_read() -> Program:
    """Read the test page (private, so zero on first use), hand over to the host, read it again."""
    return Program([Verify(EXITS_TEST_GPA, 8, 0), Sync(1), Verify(EXITS_TEST_GPA, 8, 0)])


def add_gmem_slot(vm: Vm, backing: Mapping) -> GuestMemfd:
    """upstream vm_userspace_mem_region_add(..., KVM_MEM_GUEST_MEMFD): a fresh guest_memfd plus
    anonymous memory for the shared side.  The caller keeps the guest_memfd open: the binding does
    not hold a reference, closing the file would unbind it."""
    gmem = vm.create_guest_memfd(EXITS_TEST_SIZE, 0)
    vm.set_user_memory_region2(EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, EXITS_TEST_SIZE,
                               backing.addr, guest_memfd=gmem, guest_memfd_offset=0)
    check(vm)
    return gmem


def test_private_access_memslot_deleted(backend: Kvm) -> None:
    """A private read after the slot is deleted: memory-fault exit (PRIVATE, gpa, PAGE_SIZE), not MMIO.

    Extra: a VMM that re-creates the slot and re-runs gets the read through.
    """
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        gmem = add_gmem_slot(vm, backing)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)  # access the page privately
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(read_sync_read())
        assert isinstance(run_checked(vm, vcpu), ExitSync)

        vm.set_user_memory_region2(EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, 0, 0,
                                   guest_memfd=-1)
        check(vm)
        assert_private_memory_fault(run_checked(vm, vcpu))
        # Still no slot: the same exit again.
        assert_private_memory_fault(run_checked(vm, vcpu))

        gmem.close()
        gmem = add_gmem_slot(vm, backing)
        ex = run_checked(vm, vcpu)
        assert isinstance(ex, ExitHalt), f"expected the guest to halt, got {ex!r}"
        vcpu.close()
        gmem.close()


def test_private_access_memslot_not_private(backend: Kvm) -> None:
    """A private access to a slot without KVM_MEM_GUEST_MEMFD: memory-fault exit (PRIVATE, gpa,
    PAGE_SIZE).  Extra: converting the page back to shared lets the read through (zeros from the
    anonymous backing)."""
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        vm.set_user_memory_region2(EXITS_TEST_SLOT, 0, EXITS_TEST_GPA, EXITS_TEST_SIZE, backing.addr)
        check(vm)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([Verify(EXITS_TEST_GPA, 8, 0)]))
        assert_private_memory_fault(run_checked(vm, vcpu))

        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, 0)
        check(vm)
        assert isinstance(run_checked(vm, vcpu), ExitHalt)
        vcpu.close()


def test_private_access_guest_memfd_closed(backend: Kvm) -> None:
    """Extra (spec 2.5/3): closing the last reference to the guest_memfd unbinds it from the slot
    (zapping its mappings) but leaves the slot in place; a private access then gets the same
    memory-fault exit with EFAULT."""
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        gmem = add_gmem_slot(vm, backing)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(read_sync_read())
        assert isinstance(run_checked(vm, vcpu), ExitSync)  # the page is mapped now

        gmem.close()
        check(vm)
        assert_private_memory_fault(run_checked(vm, vcpu))

        # The slot is still there: deleting it succeeds (deleting an absent slot is EINVAL).
        vm.set_user_memory_region2(EXITS_TEST_SLOT, 0, EXITS_TEST_GPA, 0, 0)
        check(vm)
        vcpu.close()


# --- the deletion racing a vCPU inside KVM_RUN ------------------------------------------------------

ANNOUNCE_GPA = EXITS_TEST_GPA + (1 << 30)  # a shared page in its own slot, away from the test slot
ANNOUNCE_SLOT = EXITS_TEST_SLOT + 1
ANNOUNCED = 0x5A
# upstream's guest reads forever; this one reads this many times per KVM_RUN (about a second of
# guest time on each backend), far more than the host needs to notice the announcement and
# delete the slot; should a run end first anyway, the vCPU thread enters the guest again.
READS = {"model": 200_000, "kernel": 20_000}


def run_while_deleting(kvm: Kvm, vm: Vm, delete: Callable[[], None]) -> Exit:
    """upstream test_private_access_memslot_deleted's two threads.  The vCPU thread enters KVM_RUN
    with a guest that writes ANNOUNCED to a shared page and then reads EXITS_TEST_GPA over and
    over; the main thread waits until it sees the announcement (so the vCPU is inside KVM_RUN,
    past its first instructions), calls ``delete()``, and returns the exit that ends the run.
    Asserts that the run which ended was already running when the deletion started (the race
    was run inside KVM_RUN, not between runs)."""
    reads = READS.get(kvm.backend, 20_000)
    with kvm.mmap_anonymous(PAGE) as announce:
        vm.set_user_memory_region2(ANNOUNCE_SLOT, 0, ANNOUNCE_GPA, PAGE, announce.addr)
        vcpu = vm.create_vcpu(0)
        program = Program([Write(ANNOUNCE_GPA, 1, ANNOUNCED)] + [Verify(EXITS_TEST_GPA, 8, 0)] * reads)
        result: list[Exit | BaseException] = []
        last_run_started = [0.0]
        deletion_started = threading.Event()

        def vcpu_thread() -> None:
            try:
                while True:
                    vcpu.load(program)
                    last_run_started[0] = time.monotonic()
                    ex = vcpu.run()
                    if isinstance(ex, ExitHalt) and not deletion_started.is_set():
                        continue  # all reads done before the host got there: keep reading
                    result.append(ex)
                    return
            except BaseException as exc:  # reported on the main thread
                result.append(exc)

        thread = threading.Thread(target=vcpu_thread, name="vcpu", daemon=True)
        thread.start()
        deadline = time.monotonic() + HANG_TIMEOUT
        while announce.read(0, 1)[0] != ANNOUNCED:
            assert thread.is_alive(), f"the vCPU left KVM_RUN before announcing itself: {result}"
            assert time.monotonic() < deadline, "the vCPU never announced itself"
            time.sleep(0.0005)
        deletion_start = time.monotonic()
        deletion_started.set()
        delete()
        thread.join(HANG_TIMEOUT)
        assert not thread.is_alive(), "KVM_RUN did not return after the slot was deleted"
        vcpu.close()
        vm.set_user_memory_region2(ANNOUNCE_SLOT, 0, ANNOUNCE_GPA, 0, 0)
    (ex,) = result
    if isinstance(ex, BaseException):
        raise ex
    assert last_run_started[0] < deletion_start, "the deletion fell between two runs: no race inside KVM_RUN"
    check(vm)
    return ex


def test_private_access_memslot_deleted_while_running(backend: Kvm) -> None:
    """x86/private_mem_kvm_exits_test.c:test_private_access_memslot_deleted, as upstream: the slot
    is deleted by another thread while the vCPU is inside KVM_RUN reading the private page; the
    run ends with EFAULT + KVM_EXIT_MEMORY_FAULT {PRIVATE, EXITS_TEST_GPA, PAGE_SIZE}."""
    with protected_vm(backend) as vm, backend.mmap_anonymous(EXITS_TEST_SIZE) as backing:
        gmem = add_gmem_slot(vm, backing)
        vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, PRIVATE)
        check(vm)
        ex = run_while_deleting(backend, vm, lambda: vm.set_user_memory_region2(
            EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, 0, 0, guest_memfd=-1))
        assert_private_memory_fault(ex)
        gmem.close()


def test_private_access_memslot_deleted_while_running_gmem_attributes() -> None:
    """The in-place series' version of the same test (per-guest_memfd attributes, model only: no
    kernel has them yet): the page is made private through the guest_memfd, the slot is deleted
    while the vCPU is inside KVM_RUN, and the run ends in KVM_EXIT_MMIO, an 8-byte read at
    EXITS_TEST_GPA (a gfn without a slot has no private attribute any more)."""
    with guestmem.open("model", attributes="gmem") as kvm:
        vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(EXITS_TEST_SIZE, u.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, EXITS_TEST_SIZE, 0,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        gmem.set_memory_attributes2(0, EXITS_TEST_SIZE, PRIVATE)
        check(vm)
        ex = run_while_deleting(kvm, vm, lambda: vm.set_user_memory_region2(
            EXITS_TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, 0, 0, guest_memfd=-1))
        assert isinstance(ex, ExitMmio), f"expected KVM_EXIT_MMIO, got {ex!r}"
        assert (ex.phys_addr, ex.len, ex.is_write) == (EXITS_TEST_GPA, 8, False), ex
        gmem.close()
        vm.close()
