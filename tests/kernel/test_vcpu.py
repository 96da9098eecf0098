"""Guest programs on a real vCPU: compiled x86-64 code over guest_memfd memory, typed exits.

The guest_memfd slot is bound with the guest_memfd's own mmap as ``userspace_addr`` (hosts whose
KVM emulates guest instructions reach guest memory through it; upstream ignores it for MMAP slots).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import guestmem.uapi as u
from guestmem.api import (
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitIo,
    ExitMmio,
    ExitShutdown,
    ExitSync,
    Vcpu,
    iter_exits,
)
from guestmem.errors import KvmError
from guestmem.guest.ops import Accept, Halt, MapGpaRange, Program, Sync, Verify, Write
from guestmem.linux import LOADER_GPA, LOADER_SLOT, KernelGuestMemfd, KernelMapping, KernelVcpu, KernelVm

from .support import GIB4, MIB, PS, errno_of, require_cap, require_gmem_flags

SIZE = 4 * MIB
FLAGS = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED


@dataclass
class Guest:
    vm: KernelVm
    gmem: KernelGuestMemfd
    mem: KernelMapping
    vcpu: KernelVcpu

    def run(self, program: Program | list[Any]) -> list[Any]:
        self.vcpu.load(program if isinstance(program, Program) else Program(program))
        return list(iter_exits(self.vcpu, limit=100))


@pytest.fixture
def guest(vm: KernelVm) -> Iterator[Guest]:
    require_gmem_flags(vm, FLAGS)
    with vm.create_guest_memfd(SIZE, FLAGS) as gmem, gmem.mmap() as mem:
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GIB4, SIZE, mem.addr, gmem, 0)
        vcpu = vm.create_vcpu(0)
        vcpu.run_timeout = 30.0
        yield Guest(vm, gmem, mem, vcpu)
        vcpu.close()


def test_vcpu_is_a_protocol_vcpu(guest: Guest) -> None:
    assert isinstance(guest.vcpu, Vcpu)


def test_write_then_host_sees_it_and_guest_verifies(guest: Guest) -> None:
    exits = guest.run([Write(GIB4, SIZE, 0x5A), Write(GIB4 + 3, 5, 0x11), Sync(1),
                       Verify(GIB4, 3, 0x5A), Verify(GIB4 + 3, 5, 0x11), Verify(GIB4 + 8, SIZE - 8, 0x5A)])
    assert [type(e) for e in exits] == [ExitSync, ExitHalt]
    assert exits[0].value == 1
    data = guest.mem.read(0, SIZE)
    assert data[:3] == b"\x5a" * 3 and data[3:8] == b"\x11" * 5 and data[8:] == b"\x5a" * (SIZE - 8)


def test_host_writes_guest_verifies(guest: Guest) -> None:
    guest.mem.fill(0, SIZE, 0xAA)
    exits = guest.run([Verify(GIB4, SIZE, 0xAA), Write(GIB4, SIZE, 0xFF)])
    assert isinstance(exits[-1], ExitHalt) and len(exits) == 1
    assert guest.mem.read(0, SIZE) == b"\xff" * SIZE


@pytest.mark.parametrize("bad_at", [0, 7, 8, 13, PS - 1, SIZE - 9, SIZE - 1])
def test_verify_failure_reports_gpa_expected_found(guest: Guest, bad_at: int) -> None:
    guest.mem.fill(0, SIZE, 0x33)
    guest.mem.write(bad_at, b"\x99")
    exits = guest.run([Sync(5), Verify(GIB4, SIZE, 0x33), Sync(6)])
    assert isinstance(exits[0], ExitSync)
    fail = exits[1]
    assert isinstance(fail, ExitGuestAssert)
    assert (fail.gpa, fail.expected, fail.found, fail.op_index) == (GIB4 + bad_at, 0x33, 0x99, 1)
    assert len(exits) == 2  # an assertion ends the program
    assert isinstance(guest.vcpu.run(), ExitHalt)  # and every further run halts


def test_verify_tail_only_failure(guest: Guest) -> None:
    guest.mem.write(2, b"\x01")
    fail = guest.run([Verify(GIB4, 5, 0)])[0]
    assert isinstance(fail, ExitGuestAssert) and (fail.gpa, fail.found) == (GIB4 + 2, 1)


def test_sync_values_and_continue(guest: Guest) -> None:
    values = [0, 1, 0xFFFF_FFFF, 1 << 40, (1 << 64) - 1]
    guest.vcpu.load(Program([Sync(v) for v in values]))
    for v in values:
        ex = guest.vcpu.run()
        assert isinstance(ex, ExitSync) and ex.value == v
    assert isinstance(guest.vcpu.run(), ExitHalt)
    assert isinstance(guest.vcpu.run(), ExitHalt)


def test_halt_in_the_middle_stops(guest: Guest) -> None:
    exits = guest.run([Write(GIB4, 1, 1), Halt(), Write(GIB4, 1, 2)])
    assert [type(e) for e in exits] == [ExitHalt]
    assert guest.mem.read(0, 1) == b"\x01"


def test_private_and_shared_access_kinds_compile_as_auto(guest: Guest) -> None:
    exits = guest.run([Write(GIB4, PS, 0x21, access="private"), Accept(GIB4, PS),
                       Verify(GIB4, PS, 0x21, access="shared")])
    assert [type(e) for e in exits] == [ExitHalt]


def test_punch_hole_then_guest_reads_zero(guest: Guest) -> None:
    guest.vcpu.load(Program([Write(GIB4, SIZE, 0x77), Sync(1), Verify(GIB4 + MIB, 2 * MIB, 0),
                             Verify(GIB4, MIB, 0x77), Verify(GIB4 + 3 * MIB, MIB, 0x77), Sync(2)]))
    assert isinstance(guest.vcpu.run(), ExitSync)
    guest.gmem.punch_hole(MIB, 2 * MIB)
    ex = guest.vcpu.run()
    assert isinstance(ex, ExitSync) and ex.value == 2, ex


def test_mmio_exit_outside_memslots(guest: Guest) -> None:
    ex = guest.run([Write(0x8000_0000, 1, 0x42)])[0]
    assert isinstance(ex, ExitMmio)
    assert (ex.phys_addr, ex.len, ex.is_write, ex.data) == (0x8000_0000, 1, True, b"\x42")


def test_raw_port_io_and_shutdown_exits(guest: Guest) -> None:
    vcpu, loader = guest.vcpu, guest.vm.loader()
    vcpu.load(Program([Sync(0)]))
    # mov edx, 0x80; mov al, 0x42; out dx, al; in al, dx; ud2 (no IDT: triple fault)
    loader.write(vcpu.compiled.entry, b"\xba\x80\x00\x00\x00\xb0\x42\xee\xec\x0f\x0b")
    out, inp, down = vcpu.run(), vcpu.run(), vcpu.run()
    assert isinstance(out, ExitIo) and (out.port, out.size, out.direction, out.data) == (0x80, 1, 1, b"\x42")
    assert isinstance(inp, ExitIo) and (inp.port, inp.direction) == (0x80, u.KVM_EXIT_IO_IN)
    assert isinstance(down, ExitShutdown)


PORT_IN = b"\xba\x80\x00\x00\x00\xec"  # mov edx, 0x80; in al, dx
MMIO_READ = b"\x48\xbb" + (0x8000_0000).to_bytes(8, "little") + b"\x8a\x03"  # mov rbx, ...; mov al, [rbx]


@pytest.mark.parametrize("pending", [PORT_IN, MMIO_READ], ids=["port-in", "mmio-read"])
def test_reload_after_an_exit_that_needs_completion(guest: Guest, pending: bytes) -> None:
    vcpu = guest.vcpu
    vcpu.load(Program([Sync(0)]))
    guest.vm.loader().write(vcpu.compiled.entry, pending)
    assert isinstance(vcpu.run(), ExitIo | ExitMmio)
    vcpu.load(Program([Write(GIB4, 16, 0x61), Sync(5)]))
    ex = vcpu.run()
    assert isinstance(ex, ExitSync) and ex.value == 5, ex
    assert guest.mem.read(0, 16) == b"\x61" * 16


def test_watchdog_interrupts_a_guest_that_never_exits(guest: Guest) -> None:
    vcpu = guest.vcpu
    vcpu.load(Program([Sync(0)]))
    guest.vm.loader().write(vcpu.compiled.entry, b"\xeb\xfe")  # jmp $
    vcpu.run_timeout = 0.3
    with pytest.raises(KvmError) as info:
        vcpu.run()
    assert info.value.errno == errno.EINTR and "watchdog" in info.value.message
    vcpu.load(Program([Sync(9)]))  # the vCPU is still usable
    ex = vcpu.run()
    assert isinstance(ex, ExitSync) and ex.value == 9


def test_two_vcpus_run_their_own_programs(guest: Guest) -> None:
    other = guest.vm.create_vcpu(1)
    guest.vcpu.load(Program([Write(GIB4, PS, 1), Sync(10)]))
    other.load(Program([Write(GIB4 + PS, PS, 2), Sync(11)]))
    assert guest.vcpu.compiled is not None and other.compiled is not None
    assert guest.vcpu.compiled.base != other.compiled.base
    a, b = guest.vcpu.run(), other.run()
    assert isinstance(a, ExitSync) and isinstance(b, ExitSync) and (a.value, b.value) == (10, 11)
    assert guest.mem.read(PS - 1, 2) == b"\x01\x02"


def test_duplicate_vcpu_id_eexist(vm: KernelVm) -> None:
    vm.create_vcpu(3)
    assert errno_of(lambda: vm.create_vcpu(3)) == errno.EEXIST


def test_loader_window_conflicts_come_from_the_kernel(kvm: Any) -> None:
    with kvm.create_vm() as vm, kvm.mmap_anonymous(PS) as m:
        vm.set_user_memory_region(5, 0, LOADER_GPA + MIB, PS, m.addr)
        vcpu = vm.create_vcpu(0)
        assert errno_of(lambda: vcpu.load(Program([Sync(1)]))) == errno.EEXIST
    with kvm.create_vm() as vm, kvm.mmap_anonymous(PS) as m:
        vm.set_user_memory_region(LOADER_SLOT, 0, 0, PS, m.addr)
        vcpu = vm.create_vcpu(0)
        assert errno_of(lambda: vcpu.load(Program([Sync(1)]))) == errno.EINVAL  # modifying a slot's size


def test_program_beyond_identity_map_refused(guest: Guest) -> None:
    with pytest.raises(ValueError):
        guest.vcpu.load(Program([Write(1 << 40, 1, 0)]))


def test_pre_fault_memory(guest: Guest) -> None:
    if guest.vm.check_extension(u.KVM_CAP_PRE_FAULT_MEMORY):
        assert guest.vcpu.pre_fault_memory(GIB4, PS) == PS
    else:
        # Without the cap the ioctl exists on x86 but cannot pre-fault (no TDP MMU): EOPNOTSUPP.
        assert errno_of(lambda: guest.vcpu.pre_fault_memory(GIB4, PS)) == errno.EOPNOTSUPP
    for gpa, size, flags in ((GIB4, PS, 1), (GIB4 + 1, PS, 0), (GIB4, PS - 1, 0), (GIB4, 0, 0)):
        assert errno_of(lambda gpa=gpa, size=size, flags=flags: guest.vcpu.pre_fault_memory(
            gpa, size, flags)) == errno.EINVAL


def test_closed_vcpu_ebadf(guest: Guest) -> None:
    guest.vcpu.close()
    guest.vcpu.close()
    assert errno_of(guest.vcpu.run) == errno.EBADF


def test_vm_close_closes_its_vcpus(kvm: Any) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.closed


# --- hypercalls -------------------------------------------------------------------------------------


@pytest.fixture
def hypercalls(guest: Guest, hypercall_probe: dict[str, Any]) -> Guest:
    require_cap(guest.vm, u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
    if not hypercall_probe["exits"]:
        pytest.skip(f"KVM_CAP_EXIT_HYPERCALL is offered but no KVM_EXIT_HYPERCALL reaches userspace on "
                    f"this host ({hypercall_probe['result']})")
    return guest


def test_map_gpa_range_without_the_exit_enabled_is_enosys(hypercalls: Guest) -> None:
    exits = hypercalls.run([MapGpaRange(GIB4, 1, 0, expect_ret=-u.KVM_ENOSYS)])
    assert [type(e) for e in exits] == [ExitHalt]


def test_map_gpa_range_exit_and_return_value(hypercalls: Guest) -> None:
    assert hypercalls.vm.enable_hypercall_exit()
    vcpu = hypercalls.vcpu
    attrs = u.KVM_MAP_GPA_RANGE_ENCRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    vcpu.load(Program([MapGpaRange(GIB4, 2, attrs, expect_ret=0), Sync(1),
                       MapGpaRange(GIB4, 1, 0, expect_ret=-u.KVM_EINVAL), Sync(2),
                       MapGpaRange(GIB4, 1, 0, expect_ret=0)]))
    ex = vcpu.run()
    assert isinstance(ex, ExitHypercall)
    assert (ex.nr, ex.gpa, ex.npages, ex.attrs) == (u.KVM_HC_MAP_GPA_RANGE, GIB4, 2, attrs)
    assert ex.to_private
    assert ex.longmode
    assert isinstance(vcpu.run(), ExitSync)  # ret 0 matched
    ex = vcpu.run()
    assert isinstance(ex, ExitHypercall)
    ex.ret = -u.KVM_EINVAL
    assert isinstance(vcpu.run(), ExitSync)  # the guest saw -EINVAL
    ex = vcpu.run()
    ex.ret = 5
    fail = vcpu.run()
    assert isinstance(fail, ExitGuestAssert) and (fail.expected, fail.found) == (0, 5)


def test_map_gpa_range_bad_args_answered_by_kvm(hypercalls: Guest) -> None:
    assert hypercalls.vm.enable_hypercall_exit()
    # Unaligned gpa / zero pages never reach userspace: KVM returns -KVM_EINVAL to the guest.
    exits = hypercalls.run([MapGpaRange(GIB4 + 1, 1, 0, expect_ret=-u.KVM_EINVAL),
                            MapGpaRange(GIB4, 0, 0, expect_ret=-u.KVM_EINVAL)])
    assert [type(e) for e in exits] == [ExitHalt]
