"""``guestmem bench --only c_guest``: what running the C guest costs on each of the three ways a guest
can run -- the model's x86 CPU, the model's op interpreter (an equivalent Program), and the kernel
backend's real vCPU -- in one run, on this machine.

Why: issue #14 adds an instruction-level CPU to the model; this says what it costs against the op
interpreter (which runs the same memory lifecycle without instructions) and against /dev/kvm.

Method (stated in the output too):

* **cpu_s** is this process's CPU time (``time.process_time``: user and system, so the kernel's
  time inside ``KVM_RUN`` on this thread counts) around the whole run, driven on this thread
  through the VMM layer (conversions, memory faults and the device included), best of ``repeat``;
  CPU time, not wall clock, because the machine is shared (as :mod:`guestmem.bench_vmm` does).
  ``wall_s`` is given beside it.
* **per exit**: the C guest is run with ``rounds_lo`` and ``rounds_hi`` device round trips (1-byte
  payload); the marginal cost per exit is (cpu_hi - cpu_lo) / (exits_hi - exits_lo).  Each extra
  round is one port-I/O exit plus a few dozen guest instructions, so this is the cost of an exit
  round trip through the backend and the VMM's handler.
* **MIPS** = guest instructions / cpu_s.  The instructions are counted on the model's x86 CPU in a
  separate, untimed run of the same image and flavour with a Unicorn code hook on every
  instruction (the timed runs have no hook).  The kernel gives no count, so its figure divides the
  count of the model's DEFAULT-VM run (the same plain path of the same binary; only the CPUID
  answers differ, which changes a handful of instructions) by the kernel's wall time.  The op
  interpreter executes no instructions: its "equivalent MIPS" divides the x86 guest's count for
  the same flavour by the interpreter's wall time.
"""

from __future__ import annotations

import time
from typing import Any

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitIo
from guestmem.errors import CapabilityMissing, KvmError
from guestmem.guest import cbuild
from guestmem.guest.cdevice import CGuestHost
from guestmem.guest.ops import Accept, MapGpaRange, Op, Program, Sync, Verify, Write
from guestmem.vmm.exits import Action
from guestmem.vmm.layout import RegionSpec
from guestmem.vmm.machine import Machine, MachineConfig
from guestmem.vmm.trace import EventTrace

GPA = 1 << 32
MEMORY = 4 << 20
PAGE = cbuild.PAGE
DEVICE_SYNC = 0xDE71CE  # the op program's device doorbell (ExitSync value)


def _params(data_pages: int, rounds: int, payload: int) -> cbuild.CGuestParams:
    return cbuild.CGuestParams(data_gpa=GPA, data_pages=data_pages, bounce_gpa=GPA + (2 << 20),
                               rounds=rounds, payload=payload)


def _open(backend: str, cpu: str | None) -> Any:
    return guestmem.open(backend, cpu=cpu) if cpu else guestmem.open(backend)


def _ops_program(p: cbuild.CGuestParams, private: bool) -> Program:
    """The C guest's memory lifecycle in the op language: accept and write each data page, share
    the bounce page, one device doorbell per round (after writing the request), take it back,
    verify the data."""
    ops: list[Op] = []
    for i in range(p.data_pages):
        gpa = p.data_gpa + i * PAGE
        ops += [Accept(gpa, PAGE), Write(gpa, PAGE, 0x5A)]
    b = p.bounce_gpa
    ops.append(Accept(b, PAGE))
    if private:
        ops.append(MapGpaRange(b, 1, u.KVM_MAP_GPA_RANGE_DECRYPTED))
    for _ in range(p.rounds):
        ops += [Write(b, cbuild.REQ_HEADER + p.payload, 0x11, "shared" if private else "auto"),
                Sync(DEVICE_SYNC)]
    if private:
        ops += [MapGpaRange(b, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED), Accept(b, PAGE)]
    ops.append(Verify(p.data_gpa, p.data_pages * PAGE, 0x5A))
    return Program(ops)


def _run_once(backend: str, flavour: str, p: cbuild.CGuestParams, kind: str,
              count: bool = False) -> dict[str, Any]:
    """One run of the C guest (``kind`` "x86") or its op program ("ops") through the VMM layer;
    ``count`` adds a code hook counting the model x86 CPU's instructions (not for timing)."""
    kvm = _open(backend, "x86" if backend == "model" and kind == "x86" else None)
    try:
        cfg = MachineConfig(regions=(RegionSpec("ram", GPA, MEMORY),), flavour=flavour, slack=4 << 20)
        m = Machine(kvm, cfg, trace=EventTrace(enabled=False))
        try:
            m.create_vcpus(1)
            host = CGuestHost(m.host_read, m.host_write)
            if kind == "x86":
                m.load({0: cbuild.c_guest_image(p)})
            else:
                m.load({0: _ops_program(p, m.flavour.hw_tagged_access or m.strategy.value != "shared-only")})
            vcpu = m.vcpus[0]
            counted = [0]
            if count:
                _hook_counter(vcpu, counted)
            exits = 0
            t, c = time.perf_counter(), time.process_time()
            while True:
                ex = vcpu.run()
                exits += 1
                if isinstance(ex, ExitIo) and host.handle(ex):
                    continue
                verdict = m.handler.handle(0, vcpu, ex)
                if verdict.action is Action.HALT:
                    break
                if verdict.action is Action.FAIL:
                    raise RuntimeError(f"{kind} guest on {backend}/{flavour} failed: {verdict.reason}")
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            m.accounting.finish()
            if kind == "x86" and host.result is None:
                raise RuntimeError(f"the C guest on {backend}/{flavour} reported no result")
            return {"wall_s": wall, "cpu_s": cpu, "exits": exits,
                    "instructions": counted[0] if count else None}
        finally:
            m.close()
    finally:
        kvm.close()


def _hook_counter(vcpu: Any, counted: list[int]) -> None:
    import unicorn

    cpu = vcpu.cpu  # the model vCPU's X86Cpu (guestmem/model/kvm/x86/cpu.py)

    def one(uc: Any, address: int, size: int, _ud: Any) -> None:
        counted[0] += 1

    with cpu.uc_lock:
        cpu.uc.hook_add(unicorn.UC_HOOK_CODE, one)
        cpu.uc.ctl_flush_tb()


def _best(backend: str, flavour: str, p: cbuild.CGuestParams, kind: str, repeat: int) -> dict[str, Any]:
    runs = [_run_once(backend, flavour, p, kind) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["cpu_s"])
    return best


def _figures(backend: str, flavour: str, kind: str, p: cbuild.CGuestParams, lo: cbuild.CGuestParams,
             hi: cbuild.CGuestParams, repeat: int, instructions: int) -> dict[str, Any]:
    full = _best(backend, flavour, p, kind, repeat)
    a, b = _best(backend, flavour, lo, kind, repeat), _best(backend, flavour, hi, kind, repeat)
    extra_exits = b["exits"] - a["exits"]
    row: dict[str, Any] = {
        "program": f"{backend} {kind}", "flavour": flavour, "cpu_s": full["cpu_s"], "wall_s": full["wall_s"],
        "exits": full["exits"], "guest_instructions": instructions,
        "mips": instructions / max(full["cpu_s"], 1e-9) / 1e6,
    }
    if extra_exits > 0:
        row["per_exit_us"] = (b["cpu_s"] - a["cpu_s"]) / extra_exits * 1e6
    return row


def bench_c_guest(data_pages: int = 16, rounds: int = 8, rounds_lo: int = 4, rounds_hi: int = 516,
                  repeat: int = 3) -> dict[str, Any]:
    """The C guest on the model's x86 CPU (SNP-like, TDX-like, default), its op-program equivalent on
    the model's interpreter, and its shared subset on the kernel backend (see the module doc)."""
    try:
        cbuild.build()
    except cbuild.CGuestBuildError as exc:
        return {"skipped": str(exc)}
    p = _params(data_pages, rounds, 256)
    lo, hi = _params(1, rounds_lo, 1), _params(1, rounds_hi, 1)
    rows: list[dict[str, Any]] = []
    counts = {f: int(_run_once("model", f, p, "x86", count=True)["instructions"])
              for f in ("snp", "tdx", "default")}
    for flavour in ("snp", "tdx", "default"):
        rows.append(_figures("model", flavour, "x86", p, lo, hi, repeat, counts[flavour]))
    for flavour in ("snp", "tdx", "default"):
        rows.append(_figures("model", flavour, "ops", p, lo, hi, repeat, counts[flavour]))
    kernel: dict[str, Any] | str
    try:
        kernel = _figures("kernel", "default", "x86", p, lo, hi, repeat, counts["default"])
    except (CapabilityMissing, KvmError, OSError) as exc:
        kernel = f"skipped: {exc}"
    if isinstance(kernel, dict):
        rows.append(kernel)
    return {
        "method": ("cpu_s: process CPU time around the run through the VMM layer, best of "
                   f"{repeat}; per exit: marginal CPU per extra device round trip ({rounds_lo} vs "
                   f"{rounds_hi} rounds, 1-byte payload); MIPS: guest instructions / cpu_s, the "
                   "instructions counted by a code hook in a separate untimed model-x86 run of the same "
                   "image and flavour (the kernel: the DEFAULT-VM count; the op interpreter: its "
                   "flavour's count, as equivalent MIPS)"),
        "data_pages": data_pages, "rounds": rounds,
        "runs": rows,
        **({"kernel": kernel} if isinstance(kernel, str) else {}),
    }
