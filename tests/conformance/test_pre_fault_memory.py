"""Port of upstream ``tools/testing/selftests/kvm/pre_fault_memory_test.c``, plus the argument checks
of ``kvm_vcpu_pre_fault_memory`` (virt/kvm/kvm_main.c) that run before any architecture code.

Upstream: a slot of 2 MiB + 4 KiB (slot 10); pre-fault [0, 2M) -> all done; [2M, 2M+8K) -> one
page done, then ENOENT (no memslot: the page beyond the slot would be emulated MMIO);
[2M+4K, 2M+8K) -> ENOENT with nothing done.  Each call races a worker thread that deletes and
re-creates the slot; the result is stable once the slot is back.  Then the guest reads every
page.  Run on DEFAULT (shared), SW_PROTECTED (shared) and SW_PROTECTED with the slot bound to a
guest_memfd and the range set private.

As upstream, every call is checked to either make progress (success, fewer bytes left) or
fail and leave the range untouched (``KvmError.size_left`` is the ``size`` the kernel copied
back, unchanged).  The slot sits where upstream puts it, at the top of the guest physical
address space (``(max_gfn - TEST_NPAGES)`` pages, aligned down to 2 MiB), and also at 4 GiB.
``max_gfn`` is found through the interface: the highest page a memslot may end at (x86's
``kvm_arch_prepare_memory_region`` refuses slots past ``kvm_mmu_max_gfn()``), by bisection.
Departures: the guest *verifies* the pages read as zero where upstream only reads them; on the
kernel backend the guest's identity map ends at 512 GiB, so at the top of a larger address
space only the pre-faults run (the guest's reads are skipped, and say so).

KVM_PRE_FAULT_MEMORY needs a TDP MMU on x86: ``KVM_CAP_PRE_FAULT_MEMORY`` is 0 without one and
every well-formed call fails with EOPNOTSUPP; the upstream port skips then, and
``test_pre_fault_memory_unsupported_is_eopnotsupp`` checks that answer.
"""

from __future__ import annotations

import errno
import threading

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import GuestMemfd, Kvm, Mapping, Vcpu, Vm
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Verify

from .support import (
    HANG_TIMEOUT,
    PAGE,
    SZ_2M,
    SZ_4G,
    GuestScript,
    check,
    drive,
    raises_errno,
    require_cap,
    require_vm_type,
)

TEST_SIZE = SZ_2M + PAGE
TEST_NPAGES = TEST_SIZE // PAGE
TEST_SLOT = 10
TEST_GPA = SZ_4G

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


class PrefaultSlot:
    """The test memslot, re-creatable (upstream vm_userspace_mem_region_add with flags 0 or
    KVM_MEM_GUEST_MEMFD, which also creates a fresh guest_memfd for the private side)."""

    def __init__(self, kvm: Kvm, vm: Vm, private: bool, gpa: int = TEST_GPA) -> None:
        self.vm = vm
        self.gpa = gpa
        self.private = private
        self.backing: Mapping = kvm.mmap_anonymous(TEST_SIZE)
        self.gmems: list[GuestMemfd] = []

    def add(self) -> None:
        if self.private:
            gmem = self.vm.create_guest_memfd(TEST_SIZE, 0)
            self.gmems.append(gmem)
            self.vm.set_user_memory_region2(TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, self.gpa, TEST_SIZE,
                                            self.backing.addr, guest_memfd=gmem, guest_memfd_offset=0)
        else:
            self.vm.set_user_memory_region2(TEST_SLOT, 0, self.gpa, TEST_SIZE, self.backing.addr)

    def delete(self) -> None:
        self.vm.set_user_memory_region2(TEST_SLOT, 0, self.gpa, 0, 0)

    def close(self) -> None:
        for gmem in self.gmems:
            gmem.close()
        self.backing.close()


def pre_fault_memory(vcpu: Vcpu, slot: PrefaultSlot, offset: int, size: int, expected_left: int) -> None:
    """upstream pre_fault_memory(): pre-fault [slot.gpa+offset, +size) while a worker deletes and
    re-creates the slot; retry until stable; check the bytes left and the final errno."""
    gpa, left = slot.gpa + offset, size
    prefault_ready = threading.Event()
    recreate_slot = threading.Event()
    worker_error: list[BaseException] = []

    def delete_slot_worker() -> None:
        try:
            prefault_ready.wait(HANG_TIMEOUT)
            slot.delete()
            recreate_slot.wait(HANG_TIMEOUT)
            slot.add()
        except BaseException as exc:  # reported on the main thread
            worker_error.append(exc)

    worker = threading.Thread(target=delete_slot_worker, name="delete-slot-worker", daemon=True)
    worker.start()
    prefault_ready.set()

    slot_recreated = False
    err = 0
    while True:
        try:
            new_left = vcpu.pre_fault_memory(gpa, left)
            err = 0
            assert new_left < left, "a successful KVM_PRE_FAULT_MEMORY must make progress"
            gpa, left = gpa + (left - new_left), new_left
        except KvmError as exc:
            err = exc.errno or -1
            assert exc.size_left == left, (
                f"a failed KVM_PRE_FAULT_MEMORY changed the range: {left} -> {exc.size_left} bytes left")
            if err == errno.EINTR:  # interrupted by an unrelated signal: retry at once
                continue
        if not slot_recreated:
            recreate_slot.set()
            worker.join(HANG_TIMEOUT)
            assert not worker.is_alive(), "delete-slot worker hung"
            assert not worker_error, f"delete-slot worker failed: {worker_error[0]!r}"
            slot_recreated = True
            check(slot.vm)
            if left:
                continue  # retry for a stable result
        if not left or err:
            break

    assert left == expected_left, f"completed with {left} bytes left, expected {expected_left}"
    if expected_left:
        assert err == errno.ENOENT, f"expected ENOENT, got {errno.errorcode.get(err, err)}"
    else:
        assert err == 0


def prefault_vm(kvm: Kvm, vm_type: int, private: bool) -> Vm:
    require_cap(kvm, u.KVM_CAP_PRE_FAULT_MEMORY)
    vm = require_vm_type(kvm, vm_type)
    require_cap(vm, u.KVM_CAP_PRE_FAULT_MEMORY)
    if private:
        require_cap(vm, u.KVM_CAP_MEMORY_ATTRIBUTES, PRIVATE)
    return vm


def max_gfn(kvm: Kvm, vm: Vm) -> int:
    """The guest's max_gfn as upstream's vm->max_gfn: one past the highest gfn a memslot may cover,
    found by bisection over 1-page slots (each probe is created and deleted again)."""
    with kvm.mmap_anonymous(PAGE) as page:
        def fits(gfn: int) -> bool:
            try:
                vm.set_user_memory_region2(TEST_SLOT, 0, gfn * PAGE, PAGE, page.addr)
            except KvmError as exc:
                assert exc.errno == errno.EINVAL, exc
                return False
            vm.set_user_memory_region2(TEST_SLOT, 0, gfn * PAGE, 0, 0)
            return True

        lo, hi = 0, 1 << (52 - u.PAGE_SHIFT)  # fits(lo); not fits(hi): x86 addresses 52 bits at most
        assert fits(lo) and not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return hi


@pytest.mark.parametrize("where", ["top", "4G"])
@pytest.mark.parametrize(("vm_type", "private"), [
    pytest.param(u.KVM_X86_DEFAULT_VM, False, id="DEFAULT-shared"),
    pytest.param(u.KVM_X86_SW_PROTECTED_VM, False, id="SW_PROTECTED-shared"),
    pytest.param(u.KVM_X86_SW_PROTECTED_VM, True, id="SW_PROTECTED-private"),
])
def test_pre_fault_memory(backend: Kvm, vm_type: int, private: bool, where: str) -> None:
    """pre_fault_memory_test.c:__test_pre_fault_memory, at the top of the guest physical address
    space as upstream (``where="top"``) and at 4 GiB."""
    with prefault_vm(backend, vm_type, private) as vm:
        top = (max_gfn(backend, vm) - TEST_NPAGES) * PAGE // SZ_2M * SZ_2M if where == "top" else 0
        gpa = top or TEST_GPA
        slot = PrefaultSlot(backend, vm, private, gpa)
        slot.add()
        check(vm)
        if private:
            vm.set_memory_attributes(gpa, TEST_SIZE, PRIVATE)
            check(vm)
        vcpu = vm.create_vcpu(0)

        pre_fault_memory(vcpu, slot, 0, SZ_2M, 0)
        pre_fault_memory(vcpu, slot, SZ_2M, PAGE * 2, PAGE)
        pre_fault_memory(vcpu, slot, TEST_SIZE, PAGE, PAGE)

        reads = GuestScript()(*(Verify(gpa + i * PAGE, 8, 0) for i in range(TEST_NPAGES)))
        try:
            vcpu.load(reads.program())
        except ValueError as exc:  # the kernel backend's guests reach 512 GiB at most
            reads_skipped: str | None = str(exc)
        else:
            reads_skipped = None
            drive(vm, vcpu, reads)
        vcpu.close()
        slot.delete()
        check(vm)
        slot.close()
        if reads_skipped:
            pytest.skip(f"pre-faults checked; the guest's reads cannot run there: {reads_skipped}")


# --- extra: argument checks (kvm_vcpu_pre_fault_memory), on every host -----------------------------


@pytest.mark.parametrize(("gpa", "size", "flags"), [
    pytest.param(TEST_GPA, PAGE, 1, id="flags"),
    pytest.param(TEST_GPA, PAGE, 1 << 63, id="flags-high"),
    pytest.param(TEST_GPA + 1, PAGE, 0, id="gpa-unaligned"),
    pytest.param(TEST_GPA, 1, 0, id="size-unaligned"),
    pytest.param(TEST_GPA, PAGE + 1, 0, id="size-unaligned-2"),
    pytest.param(TEST_GPA, 0, 0, id="size-zero"),
    pytest.param((1 << 64) - PAGE, 2 * PAGE, 0, id="wraps"),
    pytest.param((1 << 64) - PAGE, PAGE, 0, id="ends-at-zero"),
])
def test_pre_fault_memory_invalid_args(backend: Kvm, gpa: int, size: int, flags: int) -> None:
    """flags != 0, an unaligned gpa or size, or ``gpa + size <= gpa`` (size 0, wrap) are EINVAL,
    checked before anything else -- so also on hosts where the call is otherwise EOPNOTSUPP --
    and the size KVM copies back is the one passed in."""
    with require_vm_type(backend, u.KVM_X86_DEFAULT_VM) as vm, backend.mmap_anonymous(TEST_SIZE) as backing:
        vm.set_user_memory_region2(TEST_SLOT, 0, TEST_GPA, TEST_SIZE, backing.addr)
        vcpu = vm.create_vcpu(0)
        with raises_errno(errno.EINVAL) as excinfo:
            vcpu.pre_fault_memory(gpa, size, flags)
        assert excinfo.value.size_left == size  # KVM copies the untouched range back
        check(vm)
        vcpu.close()


def test_pre_fault_memory_unsupported_is_eopnotsupp(backend: Kvm) -> None:
    """Where KVM_CAP_PRE_FAULT_MEMORY is 0 (x86 without a TDP MMU), a well-formed call is
    EOPNOTSUPP whether or not a memslot covers the range; where it is set, the same calls pre-fault
    a slot's page and give ENOENT outside any slot."""
    with require_vm_type(backend, u.KVM_X86_DEFAULT_VM) as vm, backend.mmap_anonymous(TEST_SIZE) as backing:
        vm.set_user_memory_region2(TEST_SLOT, 0, TEST_GPA, TEST_SIZE, backing.addr)
        vcpu = vm.create_vcpu(0)
        if vm.check_extension(u.KVM_CAP_PRE_FAULT_MEMORY):
            assert vcpu.pre_fault_memory(TEST_GPA, PAGE) == 0
            check(vm)
            with raises_errno(errno.ENOENT) as excinfo:
                vcpu.pre_fault_memory(TEST_GPA + TEST_SIZE, PAGE)
            assert excinfo.value.size_left == PAGE
        else:
            for gpa in (TEST_GPA, TEST_GPA + TEST_SIZE, 0):
                with raises_errno(errno.EOPNOTSUPP) as excinfo:
                    vcpu.pre_fault_memory(gpa, PAGE)
                assert excinfo.value.size_left == PAGE
        check(vm)
        vcpu.close()


# --- the in-place series: attributes live in the guest_memfd (model only) ---------------------------


class GmemPrefaultSlot(PrefaultSlot):
    """The test slot over an mmap-able guest_memfd with per-file attributes, as the in-place
    series' version of the test sets it up: every (re-)creation binds a fresh guest_memfd, private
    from the start (no INIT_SHARED) or shared (INIT_SHARED), and the slot is guest_memfd-only."""

    def add(self) -> None:
        flags = u.GUEST_MEMFD_FLAG_MMAP | (0 if self.private else u.GUEST_MEMFD_FLAG_INIT_SHARED)
        gmem = self.vm.create_guest_memfd(TEST_SIZE, flags)
        self.gmems.append(gmem)
        self.vm.set_user_memory_region2(TEST_SLOT, u.KVM_MEM_GUEST_MEMFD, self.gpa, TEST_SIZE, 0,
                                        guest_memfd=gmem, guest_memfd_offset=0)


@pytest.mark.parametrize("private", [pytest.param(False, id="shared"), pytest.param(True, id="private")])
def test_pre_fault_memory_gmem_attributes(private: bool) -> None:
    """pre_fault_memory_test.c:__test_pre_fault_memory(KVM_X86_SW_PROTECTED_VM, private) with the
    in-place series' per-guest_memfd attributes (no kernel has them, so the model runs it alone):
    the same three racing pre-faults at the top of the guest physical address space, with the
    guest_memfd's own attribute deciding private or shared; then the guest reads every page.
    Extra: the guest_memfd's attribute is what was asked (private pages refuse host access)."""
    with guestmem.open("model", attributes="gmem") as kvm:
        vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gpa = (max_gfn(kvm, vm) - TEST_NPAGES) * PAGE // SZ_2M * SZ_2M
        slot = GmemPrefaultSlot(kvm, vm, private, gpa)
        slot.add()
        check(vm)
        vcpu = vm.create_vcpu(0)
        pre_fault_memory(vcpu, slot, 0, SZ_2M, 0)
        pre_fault_memory(vcpu, slot, SZ_2M, PAGE * 2, PAGE)
        pre_fault_memory(vcpu, slot, TEST_SIZE, PAGE, PAGE)
        drive(vm, vcpu, GuestScript()(*(Verify(gpa + i * PAGE, 8, 0) for i in range(TEST_NPAGES))))
        with slot.gmems[-1].mmap(TEST_SIZE) as host:
            if private:
                with pytest.raises(GuestAccessFault):
                    host.read(0, 1)
            else:
                assert host.read(0, 8) == bytes(8)
        vcpu.close()
        slot.delete()
        check(vm)
        slot.close()
        vm.close()
