"""The model's x86-64 vCPU (``cpu="x86"``): one guest three ways, SPTE-following TLBs, the SNP
C-bit and TDX shared-bit decisions, the firmware instructions, and port I/O / MMIO exits.

Hand-assembled guests use the loader's identity map (2 MiB pages over 512 GiB) and change it
themselves where a test needs its own page-table entry.
"""

from __future__ import annotations

import struct

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import (
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitIo,
    ExitMemoryFault,
    ExitMmio,
    ExitShutdown,
    ExitSync,
)
from guestmem.guest import x86
from guestmem.guest.ops import Halt, MapGpaRange, Program, Sync, Touch, Verify, Write
from guestmem.model.kvm.x86 import loader as model_loader
from guestmem.model.kvm.x86.cpu import SNP_C_BIT, TDX_GPAW

PAGE = u.PAGE_SIZE
GPA = 1 << 32
SIZE = 4 << 20


def movabs(reg: int, imm: int) -> bytes:
    return bytes([0x48 | (reg >> 3), 0xB8 + (reg & 7)]) + struct.pack("<Q", imm)


def out_al(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port) + b"\xee"  # mov dx, port; out dx, al


HLT_LOOP = b"\xf4\xeb\xfd"
STORE_55 = b"\xc6\x00\x55"  # mov byte [rax], 0x55
LOAD_BL_OUT = b"\x8a\x18\x88\xd8"  # mov bl, [rax]; mov al, bl


def make_vm(vm_type: int, cpu: str = "x86", private: bool = False):  # type: ignore[no-untyped-def]
    kvm = guestmem.open("model", cpu=cpu)
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(SIZE, 0)
    shared = kvm.mmap_anonymous(SIZE)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, SIZE, shared.addr, gmem, 0)
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
    if private:
        vm.set_memory_attributes(GPA, SIZE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    if vm_type in (u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM):
        vm.launch_finalize()
    return kvm, vm, shared, gmem  # the caller keeps the guest_memfd open (unreferenced = closed)


def load_bytes(vm, code: bytes):  # type: ignore[no-untyped-def]
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Halt()]))
    vcpu.cpu.load_bytes(code)
    return vcpu


def test_loader_layout_is_the_kernel_backends() -> None:
    from guestmem.linux import loader as kernel_loader

    assert (model_loader.LOADER_SLOT, model_loader.LOADER_GPA, model_loader.LOADER_SIZE) == (
        kernel_loader.LOADER_SLOT, kernel_loader.LOADER_GPA, kernel_loader.LOADER_SIZE)


def test_cpu_switch_is_validated() -> None:
    with pytest.raises(ValueError):
        guestmem.open("model", cpu="arm")


# --- one guest, two model vCPUs: the same exits and memory ------------------------------------------

PROGRAMS = [
    [Write(GPA, 3 * PAGE + 5, 0x5A), Verify(GPA, 3 * PAGE + 5, 0x5A), Sync(1), Verify(GPA, PAGE, 0x11),
     Halt()],
    [Touch(GPA, 8 * PAGE, 0x77), Verify(GPA, 1, 0x77), Verify(GPA + 1, 1, 0x00), Halt()],
    [MapGpaRange(GPA, 4, u.KVM_MAP_GPA_RANGE_ENCRYPTED), Write(GPA, 4 * PAGE, 0xC3), Sync(2),
     MapGpaRange(GPA + 1, 1, 0, expect_ret=0), Halt()],
    [MapGpaRange(GPA, 0, 0, expect_ret=-u.KVM_EINVAL), Sync(3), Halt()],
]


def _run_all(vm_type: int, cpu: str, program: list) -> tuple[list[tuple], bytes]:  # type: ignore[type-arg]
    kvm, vm, shared, gmem = make_vm(vm_type, cpu)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program(program))
    seen: list[tuple] = []  # type: ignore[type-arg]
    for _ in range(50):
        ex = vcpu.run()
        vm.check_invariants()
        if isinstance(ex, ExitGuestAssert):
            seen.append(("assert", ex.gpa, ex.expected, ex.found, ex.op_index))
            break
        seen.append((*(v for k, v in sorted(ex.__dict__.items()) if k != "reason"), ex.name))
        if isinstance(ex, ExitHypercall):
            attrs = u.KVM_MEMORY_ATTRIBUTE_PRIVATE if ex.args[2] & u.KVM_MAP_GPA_RANGE_ENCRYPTED else 0
            vm.set_memory_attributes(ex.args[0], ex.args[1] * PAGE, attrs)
            ex.ret = 0
        if isinstance(ex, ExitHalt):
            break
    data = shared.read(0, 16 * PAGE)
    kvm.close()
    return seen, data


@pytest.mark.parametrize("index", range(len(PROGRAMS)))
@pytest.mark.parametrize("vm_type", [u.KVM_X86_DEFAULT_VM, u.KVM_X86_SW_PROTECTED_VM], ids=["default", "sw"])
def test_same_exits_and_memory_as_the_op_interpreter(vm_type: int, index: int) -> None:
    program = PROGRAMS[index]
    if vm_type == u.KVM_X86_DEFAULT_VM and any(isinstance(op, MapGpaRange) and op.npages for op in program):
        pytest.skip("a DEFAULT VM has no private memory to convert to")
    assert _run_all(vm_type, "x86", program) == _run_all(vm_type, "ops", program)


# --- SPTE-following TLB -------------------------------------------------------------------------------

def test_a_zap_flushes_the_cpu_view_and_the_next_access_faults_again() -> None:
    kvm, vm, shared, gmem = make_vm(u.KVM_X86_SW_PROTECTED_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, PAGE, 0x21), Sync(1), Verify(GPA, PAGE, 0x21), Halt()]))
    assert vcpu.run() == ExitSync(1)
    cpu = vcpu.cpu
    assert cpu.tlb_holds(GPA // PAGE, GPA // PAGE + 1)
    faults = cpu.stats.faults
    shared.discard(0, PAGE)  # MADV_REMOVE: the MMU notifier zaps the SPTE
    assert not cpu.tlb_holds(GPA // PAGE, GPA // PAGE + 1)
    vm.check_invariants()
    ex = vcpu.run()  # the page reads as zero now, and it took a new fault to get there
    assert isinstance(ex, ExitGuestAssert) and (ex.gpa, ex.expected, ex.found) == (GPA, 0x21, 0)
    assert cpu.stats.faults > faults


def test_an_attribute_change_under_a_running_guest_gives_what_the_op_vcpu_gives() -> None:
    seen = []
    for cpu in ("ops", "x86"):
        kvm, vm, shared, gmem = make_vm(u.KVM_X86_SW_PROTECTED_VM, cpu)
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([Write(GPA, PAGE, 0x31), Sync(1), Verify(GPA, PAGE, 0x31), Halt()]))
        assert vcpu.run() == ExitSync(1)
        vm.set_memory_attributes(GPA, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vm.check_invariants()
        ex = vcpu.run()  # the private page is fresh: the guest's Verify finds zero
        assert isinstance(ex, ExitGuestAssert)
        seen.append((ex.gpa, ex.expected, ex.found, ex.op_index))
        vm.check_invariants()
    assert seen[0] == seen[1] == (GPA, 0x31, 0, 2)


# --- port I/O and MMIO exits ---------------------------------------------------------------------

def test_port_io_exits_and_in_completes_with_the_vmms_data() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_DEFAULT_VM)
    code = (b"\xb0\x5c" + out_al(0x3F8)          # mov al, 0x5c; out 0x3f8
            + b"\x66\xba\xf8\x03\xec"             # mov dx, 0x3f8; in al, dx
            + out_al(0x80) + HLT_LOOP)
    vcpu = load_bytes(vm, code)
    ex = vcpu.run()
    assert ex == ExitIo(port=0x3F8, size=1, direction=u.KVM_EXIT_IO_OUT, data=b"\x5c")
    ex = vcpu.run()
    assert isinstance(ex, ExitIo) and ex.direction == u.KVM_EXIT_IO_IN and ex.size == 1
    ex.data = b"\xa7"
    assert vcpu.run() == ExitIo(port=0x80, size=1, direction=u.KVM_EXIT_IO_OUT, data=b"\xa7")
    assert vcpu.run() == ExitHalt()


def test_mmio_exits_have_the_instructions_length_and_data() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_DEFAULT_VM)
    hole = 0xD000_0000
    code = (movabs(x86.RAX, hole + 0x10)
            + b"\x66\xc7\x00\x34\x12"              # mov word [rax], 0x1234
            + b"\x8b\x18"                          # mov ebx, [rax]
            + b"\x88\xd8" + out_al(0x80)           # mov al, bl; out 0x80
            + b"\x88\xf8" + out_al(0x81)           # mov al, bh; out 0x81
            + HLT_LOOP)
    vcpu = load_bytes(vm, code)
    assert vcpu.run() == ExitMmio(hole + 0x10, 2, True, b"\x34\x12")
    ex = vcpu.run()
    assert isinstance(ex, ExitMmio) and (ex.phys_addr, ex.len, ex.is_write) == (hole + 0x10, 4, False)
    ex.data = b"\xef\xbe\xad\xde" + bytes(4)
    assert vcpu.run().data == b"\xef"  # type: ignore[attr-defined]
    assert vcpu.run().data == b"\xbe"  # type: ignore[attr-defined]
    assert vcpu.run() == ExitHalt()
    vm.check_invariants()


def test_an_unhandled_guest_exception_is_a_triple_fault() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_DEFAULT_VM)
    vcpu = load_bytes(vm, b"\x0f\x0b")  # ud2
    assert vcpu.run() == ExitShutdown()


# --- SNP-like: the C-bit decides ---------------------------------------------------------------

PDE_OF_GPA = model_loader.LOADER_GPA + x86.PD_OFFSET + (GPA >> 21) * 8


def _snp_flip_and_validate() -> bytes:
    c = 1 << SNP_C_BIT
    return (b"\xb8\x1f\x00\x00\x80\x0f\xa2\x89\xd8" + out_al(0x80)   # cpuid 0x8000001f; out ebx
            + movabs(x86.RAX, GPA) + b"\xc6\x00\x11"                    # shared store
            + movabs(x86.RBX, PDE_OF_GPA) + movabs(x86.RCX, GPA | c | 0x83)
            + b"\x48\x89\x0b" + b"\x0f\x01\x38"                          # mov [rbx], rcx; invlpg [rax]
            + b"\xb9\x00\x00\x00\x00\xba\x01\x00\x00\x00"               # ecx = 0 (4K), edx = 1
            + b"\xf2\x0f\x01\xff"                                          # pvalidate
            + out_al(0x81)                                                 # out eax (status)
            + b"\x9c\x58" + out_al(0x82)                                   # pushf; pop rax; out (CF)
            + movabs(x86.RAX, GPA) + STORE_55 + LOAD_BL_OUT + out_al(0x83) + HLT_LOOP)


def test_snp_guest_flipping_the_c_bit_without_converting_gets_a_memory_fault() -> None:
    kvm, vm, shared, gmem = make_vm(u.KVM_X86_SNP_VM)
    vcpu = load_bytes(vm, _snp_flip_and_validate())
    assert vcpu.run() == ExitIo(port=0x80, size=1, direction=u.KVM_EXIT_IO_OUT, data=bytes([SNP_C_BIT]))
    ex = vcpu.run()  # PVALIDATE through the C-bit mapping: a private access to a shared gfn
    assert ex == ExitMemoryFault(GPA, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert shared.read(0, 1) == b"\x11"  # the shared store happened through the shared view
    vm.set_memory_attributes(GPA, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.check_invariants()
    assert vcpu.run().data == b"\x00"  # type: ignore[attr-defined]   # PVALIDATE: success
    assert vcpu.run().data[0] & 1 == 0  # type: ignore[attr-defined]  # CF clear: state changed
    assert vcpu.run().data == b"\x55"  # type: ignore[attr-defined]  # the private store reads back
    assert vcpu.run() == ExitHalt()
    vm.check_invariants()
    # The host sees ciphertext once the private mapping is gone (the twin is written back).
    vm.set_memory_attributes(GPA, PAGE, 0)
    vm.check_invariants()


def test_snp_pvalidate_twice_sets_cf_and_bad_size_fails_input() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_SNP_VM, private=True)
    c = 1 << SNP_C_BIT
    pv = b"\xf2\x0f\x01\xff"
    code = (movabs(x86.RBX, PDE_OF_GPA) + movabs(x86.RCX, GPA | c | 0x83) + b"\x48\x89\x0b"
            + movabs(x86.RAX, GPA) + b"\x0f\x01\x38"
            + b"\xb9\x00\x00\x00\x00\xba\x01\x00\x00\x00" + pv + b"\x9c\x58" + out_al(0x80)
            + movabs(x86.RAX, GPA) + b"\xb9\x00\x00\x00\x00\xba\x01\x00\x00\x00" + pv
            + b"\x9c\x58" + out_al(0x81)
            + movabs(x86.RAX, GPA + PAGE) + b"\xb9\x01\x00\x00\x00\xba\x01\x00\x00\x00" + pv
            + out_al(0x82) + HLT_LOOP)
    vcpu = load_bytes(vm, code)
    assert vcpu.run().data[0] & 1 == 0  # type: ignore[attr-defined]
    assert vcpu.run().data[0] & 1 == 1  # type: ignore[attr-defined]   # already validated: CF
    assert vcpu.run().data == b"\x01"  # type: ignore[attr-defined]   # 2 MiB at a 4 KiB address
    assert vcpu.run() == ExitHalt()


def test_snp_private_access_before_pvalidate_is_a_vc_triple_fault() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_SNP_VM, private=True)
    code = (movabs(x86.RBX, PDE_OF_GPA) + movabs(x86.RCX, GPA | (1 << SNP_C_BIT) | 0x83)
            + b"\x48\x89\x0b" + movabs(x86.RAX, GPA) + b"\x0f\x01\x38" + STORE_55 + HLT_LOOP)
    vcpu = load_bytes(vm, code)
    assert vcpu.run() == ExitShutdown()


# --- TDX-like: the shared bit decides; TDCALL -------------------------------------------------------

TDCALL = b"\x66\x0f\x01\xcc"


def test_tdx_vp_info_accept_and_map_gpa() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_TDX_VM)
    shared_bit = 1 << (TDX_GPAW - 1)
    code = (b"\xb8\x01\x00\x00\x00" + TDCALL + b"\x88\xc8" + out_al(0x80)      # VP.INFO; out cl
            + b"\xb8\x06\x00\x00\x00" + movabs(x86.RCX, GPA) + TDCALL          # ACCEPT (shared!)
            + out_al(0x81)
            + b"\xb8\x06\x00\x00\x00" + movabs(x86.RCX, GPA) + TDCALL          # ACCEPT again
            + b"\x48\xc1\xe8\x20" + out_al(0x82)                                # shr rax, 32; out
            + movabs(x86.RAX, GPA) + STORE_55 + LOAD_BL_OUT + out_al(0x83)
            + b"\xb8\x00\x00\x00\x00" + movabs(x86.R10, 0) + movabs(x86.R11, 0x10001)
            + movabs(x86.R12, (GPA + PAGE) | shared_bit) + movabs(x86.R13, PAGE) + TDCALL
            + b"\x4c\x89\xd0" + out_al(0x84)                                    # mov rax, r10; out
            + HLT_LOOP)
    vcpu = load_bytes(vm, code)
    assert vcpu.run().data == bytes([TDX_GPAW])  # type: ignore[attr-defined]
    ex = vcpu.run()
    assert ex == ExitMemoryFault(GPA, PAGE, u.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    vm.set_memory_attributes(GPA, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vcpu.run().data == b"\x00"  # type: ignore[attr-defined]   # accepted
    assert vcpu.run().data == b"\x0a"  # type: ignore[attr-defined]   # 0xC0000B0A: already accepted
    assert vcpu.run().data == b"\x55"  # type: ignore[attr-defined]
    ex = vcpu.run()
    assert isinstance(ex, ExitHypercall) and ex.args[:3] == (GPA + PAGE, 1, u.KVM_MAP_GPA_RANGE_DECRYPTED)
    ex.ret = 0
    assert vcpu.run().data == b"\x00"  # type: ignore[attr-defined]
    assert vcpu.run() == ExitHalt()
    vm.check_invariants()


def test_stats_count_exits_and_fills() -> None:
    kvm, vm, _, gmem = make_vm(u.KVM_X86_SW_PROTECTED_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, 16 * PAGE, 1), Sync(1), Halt()]))
    assert vcpu.run() == ExitSync(1)
    assert vcpu.run() == ExitHalt()
    cpu = vcpu.cpu
    assert cpu.exits == {"sync": 1, "halt": 1}
    assert cpu.stats.fills >= 16  # one TLB fill per page written, at least
    # rep stosq faults in the rest of its range at once: far fewer faults than pages.
    assert 1 <= cpu.stats.faults < 16
    assert vm.mmu.count()["4K"] >= 16


# --- one guest, three ways: op vCPU, x86 vCPU, and /dev/kvm where the host allows ---------------

def _run_plain(backend: str, program: list) -> tuple[list[tuple], bytes]:  # type: ignore[type-arg]
    """A DEFAULT VM with one anonymous memslot (what any KVM host runs), the program to its end."""
    kvm = guestmem.open("model", cpu=backend) if backend in ("ops", "x86") else guestmem.open("kernel")
    try:
        vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
        mem = kvm.mmap_anonymous(SIZE)
        vm.set_user_memory_region(1, 0, GPA, SIZE, mem.addr)
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program(program))
        seen: list[tuple] = []  # type: ignore[type-arg]
        for _ in range(20):
            ex = vcpu.run()
            if isinstance(ex, ExitGuestAssert):
                seen.append(("assert", ex.gpa, ex.expected, ex.found, ex.op_index))
                break
            seen.append((*(v for k, v in sorted(ex.__dict__.items()) if k != "reason"), ex.name))
            if isinstance(ex, ExitHalt):
                break
        return seen, mem.read(0, 16 * PAGE)
    finally:
        kvm.close()


THREE_WAYS = [PROGRAMS[0], PROGRAMS[1],
              [Write(GPA + 100, 2 * PAGE + 17, 0xE1), Sync(5), Verify(GPA + 100, 2 * PAGE + 17, 0xE1),
               Touch(GPA + 3 * PAGE, 4 * PAGE, 0x42, stride=1000), Verify(GPA + 3 * PAGE + 1000, 1, 0x42),
               Halt()]]


@pytest.mark.parametrize("index", range(len(THREE_WAYS)))
def test_one_guest_three_ways(index: int) -> None:
    program = THREE_WAYS[index]
    x86_run = _run_plain("x86", program)
    assert x86_run == _run_plain("ops", program)
    try:
        kernel_run = _run_plain("kernel", program)
    except (OSError, ImportError) as exc:
        pytest.skip(f"kernel backend unavailable: {exc}")
    assert kernel_run == x86_run


def test_a_zap_from_another_thread_kicks_the_running_cpu_and_flushes_its_tlb() -> None:
    import threading
    import time

    kvm, vm, shared, gmem = make_vm(u.KVM_X86_DEFAULT_VM)
    # Spin reading the flag byte at GPA until it is non-zero, then report it.
    code = movabs(x86.RAX, GPA) + b"\x8a\x18\x84\xdb\x74\xfa" + b"\x88\xd8" + out_al(0x80) + HLT_LOOP
    vcpu = load_bytes(vm, code)
    cpu = vcpu.cpu
    gfn = GPA // PAGE

    def host() -> None:
        deadline = time.monotonic() + 60
        while not cpu.tlb_holds(gfn, gfn + 1) and time.monotonic() < deadline:
            time.sleep(0.001)  # until the spinning guest has the page in its TLB
        shared.discard(0, PAGE)  # zap while the guest runs: it must be kicked out and flushed
        shared.write(0, b"\x07")

    thread = threading.Thread(target=host)
    thread.start()
    ex = vcpu.run()
    thread.join()
    assert ex == ExitIo(port=0x80, size=1, direction=u.KVM_EXIT_IO_OUT, data=b"\x07")
    assert cpu.stats.shootdowns >= 1
    vm.check_invariants()
