"""Decoding ``kvm_run`` into typed exits, on hand-built ``kvm_run`` images (no /dev/kvm needed).

Covers the exits this host cannot produce (memory faults, hypercalls, internal errors, fail entry).
"""

from __future__ import annotations

import ctypes
import errno

import guestmem.uapi as u
from guestmem.api import (
    Exit,
    ExitFailEntry,
    ExitHypercall,
    ExitInternalError,
    ExitIo,
    ExitMemoryFault,
    ExitMmio,
    ExitSync,
    ExitUnknown,
)
from guestmem.guest import x86
from guestmem.linux.vcpu import EHWPOISON, decode_exit, decode_failure


def _run(reason: int) -> tuple[u.kvm_run, bytearray]:
    raw = bytearray(4096)
    run = u.kvm_run.from_buffer(raw)
    run.exit_reason = reason
    return run, raw


def _no_doorbell(port: int) -> Exit:
    raise AssertionError(f"unexpected doorbell {port:#x}")


def test_memory_fault_is_an_exit_only_with_efault_or_ehwpoison() -> None:
    run, _ = _run(u.KVM_EXIT_MEMORY_FAULT)
    run.u.memory_fault.gpa, run.u.memory_fault.size = 0xC000_0000, 4096
    run.u.memory_fault.flags = u.KVM_MEMORY_EXIT_FLAG_PRIVATE
    ex = decode_failure(run, errno.EFAULT)
    assert ex == ExitMemoryFault(gpa=0xC000_0000, size=4096, flags=u.KVM_MEMORY_EXIT_FLAG_PRIVATE,
                                 errno=errno.EFAULT)
    assert ex.private
    poisoned = decode_failure(run, EHWPOISON)
    assert poisoned is not None and poisoned.errno == EHWPOISON
    assert decode_failure(run, errno.EINVAL) is None
    run.exit_reason = u.KVM_EXIT_UNKNOWN
    assert decode_failure(run, errno.EFAULT) is None


def test_io_exit_data_comes_from_data_offset() -> None:
    run, raw = _run(u.KVM_EXIT_IO)
    io = run.u.io
    io.direction, io.size, io.port, io.count, io.data_offset = u.KVM_EXIT_IO_OUT, 2, 0x3F8, 2, 1024
    raw[1024:1028] = b"abcd"
    expected = ExitIo(port=0x3F8, size=2, direction=1, data=b"abcd", count=2)
    assert decode_exit(run, raw, _no_doorbell) == expected


def test_doorbell_ports_call_back() -> None:
    run, raw = _run(u.KVM_EXIT_IO)
    run.u.io.direction, run.u.io.size, run.u.io.port, run.u.io.count = u.KVM_EXIT_IO_OUT, 1, x86.PORT_SYNC, 1
    assert decode_exit(run, raw, lambda port: ExitSync(port)) == ExitSync(x86.PORT_SYNC)
    run.u.io.direction = u.KVM_EXIT_IO_IN  # an IN from the doorbell port is plain port I/O
    assert isinstance(decode_exit(run, raw, _no_doorbell), ExitIo)


def test_mmio_hypercall_internal_failentry_unknown() -> None:
    run, raw = _run(u.KVM_EXIT_MMIO)
    run.u.mmio.phys_addr, run.u.mmio.len, run.u.mmio.is_write = 0xFEE00000, 4, 1
    ctypes.memmove(run.u.mmio.data, b"\x01\x02\x03\x04\x05\x06\x07\x08", 8)
    assert decode_exit(run, raw, _no_doorbell) == ExitMmio(0xFEE00000, 4, True, b"\x01\x02\x03\x04")

    run.exit_reason = u.KVM_EXIT_HYPERCALL
    hc = run.u.hypercall
    hc.nr, hc.flags = u.KVM_HC_MAP_GPA_RANGE, u.KVM_HYPERCALL_LONG_MODE
    hc.args[0], hc.args[1], hc.args[2] = 1 << 32, 3, u.KVM_MAP_GPA_RANGE_ENCRYPTED
    ex = decode_exit(run, raw, _no_doorbell)
    assert isinstance(ex, ExitHypercall)
    assert (ex.gpa, ex.npages, ex.to_private, ex.longmode, ex.ret) == (1 << 32, 3, True, True, 0)

    run.exit_reason = u.KVM_EXIT_INTERNAL_ERROR
    run.u.internal.suberror, run.u.internal.ndata = u.KVM_INTERNAL_ERROR_EMULATION, 2
    run.u.internal.data[0], run.u.internal.data[1] = 7, 8
    assert decode_exit(run, raw, _no_doorbell) == ExitInternalError(1, (7, 8))

    run.exit_reason = u.KVM_EXIT_FAIL_ENTRY
    run.u.fail_entry.hardware_entry_failure_reason, run.u.fail_entry.cpu = 0x21, 3
    fe = decode_exit(run, raw, _no_doorbell)
    assert isinstance(fe, ExitFailEntry) and fe.reason == u.KVM_EXIT_FAIL_ENTRY
    assert (fe.reason, fe.hardware_entry_failure_reason, fe.cpu) == (u.KVM_EXIT_FAIL_ENTRY, 0x21, 3)

    run.exit_reason = u.KVM_EXIT_SYSTEM_EVENT
    assert decode_exit(run, raw, _no_doorbell) == ExitUnknown(raw_reason=u.KVM_EXIT_SYSTEM_EVENT)
