"""``guestmem bench --only x86_cpu``: what the model's x86-64 vCPU costs, beside the op vCPU.

Why these figures: the x86 vCPU is the referee for the op interpreter, so its price per unit of
guest work decides how much of the suite can afford it.  Each figure is measured in this process
with ``time.perf_counter`` around ``vcpu.run()`` calls only (set-up excluded):

* ``guest_mips``: a register-only loop (``add; dec; jnz``) of known instruction count, one run;
* ``write_gib_per_s`` (first touch, every page faulted in) and ``verify_gib_per_s`` (mapped,
  TLB refills only) for a ``Write``/``Verify`` of ``size`` bytes, x86 and ops;
* ``exit_us``: one ``Sync`` round trip (exit to the host and back into the guest), x86 and ops --
  on x86 each ``Sync`` is new code, so this includes translating its block once (the engine's
  first-execution cost); ``exit_loop_us`` is the steady state, an ``out`` in a loop;
* ``fault_us``: a ``Touch`` of one byte per page, each page its own EPT-violation exit and fault;
* the CPU's counters after the write (engine entries, TLB fills, faults, shootdowns).
"""

from __future__ import annotations

import statistics
import struct
import time
from typing import Any

from guestmem import uapi as u
from guestmem.guest.ops import Halt, Program, Sync, Touch, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32
LOOP_ITERS = 2_000_000


def _vm(cpu: str, size: int) -> tuple[Any, Any, Any, Any]:
    import guestmem

    kvm = guestmem.open("model", cpu=cpu)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(size, 0)
    shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, shared.addr, gmem, 0)
    return kvm, vm, gmem, shared


def _timed_run(vcpu: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    ex = vcpu.run()
    return ex, time.perf_counter() - t


def _mips() -> float:
    kvm, vm, _gmem, _shared = _vm("x86", 2 << 20)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Halt()]))
    code = (b"\x48\xc7\xc1" + struct.pack("<i", LOOP_ITERS)  # mov rcx, N
            + b"\x48\x83\xc0\x01\x48\xff\xc9\x75\xf7"          # add rax, 1; dec rcx; jnz
            + b"\xf4\xeb\xfd")                                 # hlt
    vcpu.cpu.load_bytes(code)
    ex, seconds = _timed_run(vcpu)
    assert ex.name == "halt", ex
    kvm.close()
    return (3 * LOOP_ITERS + 2) / seconds / 1e6


def _memory(cpu: str, size: int) -> dict[str, Any]:
    kvm, vm, _gmem, shared = _vm(cpu, size)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, size, 0x5A), Sync(1), Verify(GPA, size, 0x5A), Sync(2),
                       Touch(GPA, size, 0x5A), Sync(3), Halt()]))
    ex, write_s = _timed_run(vcpu)
    assert ex.name == "sync", ex
    counters = dict(vcpu.cpu.stats.as_dict()) if vcpu.cpu is not None else {}
    ex, verify_s = _timed_run(vcpu)
    assert ex.name == "sync", ex
    shared.discard(0, size)  # every page zapped: the Touch faults each one in again
    ex, touch_s = _timed_run(vcpu)
    assert ex.name == "sync", ex
    out: dict[str, Any] = {"write_gib_per_s": size / write_s / (1 << 30),
                           "verify_gib_per_s": size / verify_s / (1 << 30),
                           "fault_us": touch_s / (size // PS) * 1e6}
    if counters:
        out["after_write"] = counters
    kvm.close()
    return out


def _exit_us(cpu: str, n: int) -> float:
    kvm, vm, _gmem, _shared = _vm(cpu, 2 << 20)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Sync(i) for i in range(n)] + [Halt()]))
    vcpu.run()  # warm: the loader window's pages faulted in
    t = time.perf_counter()
    for _ in range(n - 1):
        vcpu.run()
    seconds = time.perf_counter() - t
    kvm.close()
    return seconds / (n - 1) * 1e6


def _exit_loop_us(n: int) -> float:
    kvm, vm, _gmem, _shared = _vm("x86", 2 << 20)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Halt()]))
    vcpu.cpu.load_bytes(b"\x66\xba\x80\x00" + b"\xee\xeb\xfd")  # mov dx, 0x80; L: out dx, al; jmp L
    vcpu.run()
    t = time.perf_counter()
    for _ in range(n):
        vcpu.run()
    seconds = time.perf_counter() - t
    kvm.close()
    return seconds / n * 1e6


def bench_x86_cpu(size: int, repeat: int = 3) -> dict[str, Any]:
    """The figures of the module docstring (medians over ``repeat`` runs where repeated)."""
    result: dict[str, Any] = {"size_bytes": size}
    result["guest_mips"] = statistics.median(_mips() for _ in range(repeat))
    for cpu in ("x86", "ops"):
        runs = [_memory(cpu, size) for _ in range(repeat)]
        fig: dict[str, Any] = {k: statistics.median(r[k] for r in runs)
                               for k in ("write_gib_per_s", "verify_gib_per_s", "fault_us")}
        if "after_write" in runs[0]:
            fig["after_write"] = runs[0]["after_write"]
        fig["exit_us"] = statistics.median(_exit_us(cpu, 200) for _ in range(repeat))
        if cpu == "x86":
            fig["exit_loop_us"] = statistics.median(_exit_loop_us(2000) for _ in range(repeat))
        result[cpu] = fig
    return result
