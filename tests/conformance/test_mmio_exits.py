"""The MMIO exits of a guest op, on both backends: the rule of guestmem/model/kvm/mmio.py.

A Write, Verify or Touch over a GPA with no memslot exits once per string-instruction element
(a qword of the op's body, a byte of its tail, a touch point) and per page the element touches,
with that part's length; a Verify that mismatches re-reads the qword byte by byte and then the
failing byte once more.  ``expected_exits`` below is the rule written out independently of the
model's implementation; the kernel backend (the compiled x86 code under KVM's emulator) and the
model must both produce exactly it.
"""

from __future__ import annotations

import pytest

import guestmem.uapi as u
from guestmem.api import Exit, ExitGuestAssert, ExitMmio, ExitSync, Kvm
from guestmem.guest.ops import Op, Program, Sync, Touch, Verify, Write

PS = u.PAGE_SIZE
MMIO = 0x8000_0000  # no memslot there on either backend
Seq = list[tuple[object, ...]]


def _parts(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at page boundaries."""
    cut = (start // PS + 1) * PS
    return [(start, end)] if end <= cut else [(start, cut), (cut, end)]


def _elements(gpa: int, size: int) -> list[tuple[int, int]]:
    body = size // 8 * 8
    qwords = [(gpa + i, gpa + i + 8) for i in range(0, body, 8)]
    return qwords + [(b, b + 1) for b in range(gpa + body, gpa + size)]


def expected_exits(op: Op, device_byte: int) -> Seq:
    """The rule: the exits of ``op`` on MMIO whose reads all return ``device_byte``."""
    if isinstance(op, Touch):
        return [("mmio", p, 1, True, bytes([op.pattern])) for p in range(op.gpa, op.gpa + op.size, op.stride)]
    assert isinstance(op, Write | Verify)
    write = isinstance(op, Write)
    out: Seq = []
    for s, e in _elements(op.gpa, op.size):
        for a, b in _parts(s, e):
            out.append(("mmio", a, b - a, write, bytes([op.pattern if write else device_byte]) * (b - a)))
        if not write and device_byte != op.pattern:
            if e - s == 8:  # narrowing: the first byte already differs
                out.append(("mmio", s, 1, False, bytes([device_byte])))
            out.append(("mmio", s, 1, False, bytes([device_byte])))  # the report's own load
            out.append(("assert", s, op.pattern, device_byte))
            return out
    return out


def run_exits(kvm: Kvm, op: Op, device_byte: int) -> Seq:
    with kvm.create_vm(u.KVM_X86_DEFAULT_VM) as vm:
        vcpu = vm.create_vcpu(0)
        if hasattr(vcpu, "run_timeout"):
            vcpu.run_timeout = 60.0
        vcpu.load(Program([op, Sync(7)]))
        out: Seq = []
        for _ in range(200):
            ex: Exit = vcpu.run()
            if isinstance(ex, ExitMmio):
                if not ex.is_write:
                    ex.data = bytes([device_byte]) * ex.len
                out.append(("mmio", ex.phys_addr, ex.len, ex.is_write, bytes(ex.data[: ex.len])))
                continue
            if isinstance(ex, ExitGuestAssert):
                out.append(("assert", ex.gpa, ex.expected, ex.found))
            else:
                assert isinstance(ex, ExitSync) and ex.value == 7, ex
            vcpu.close()
            return out
    raise AssertionError("no end of the op's exits")


CASES = [
    pytest.param(Write(MMIO, 1, 0x42), 0, id="write-1"),
    pytest.param(Write(MMIO, 3, 0x42), 0, id="write-3-bytes"),
    pytest.param(Write(MMIO, 19, 0x42), 0, id="write-2-qwords-3-bytes"),
    pytest.param(Write(MMIO + PS - 6, 12, 0x42), 0, id="write-qword-across-a-page"),
    pytest.param(Touch(MMIO, 3 * PS, 0x42), 0, id="touch-3-pages"),
    pytest.param(Verify(MMIO, 16, 0x42), 0x42, id="verify-match"),
    pytest.param(Verify(MMIO, 11, 0x42), 0x42, id="verify-match-tail"),
    pytest.param(Verify(MMIO + PS - 4, 9, 0x42), 0x42, id="verify-qword-across-a-page"),
    pytest.param(Verify(MMIO, 16, 0x42), 0x41, id="verify-mismatch-qword"),
    pytest.param(Verify(MMIO, 3, 0x42), 0x41, id="verify-mismatch-tail"),
]


@pytest.mark.parametrize(("op", "device_byte"), CASES)
def test_mmio_exits_follow_the_rule(backend: Kvm, op: Op, device_byte: int) -> None:
    assert run_exits(backend, op, device_byte) == expected_exits(op, device_byte)


def test_rule_as_measured_on_a_page_crossing_qword() -> None:
    """The oracle above, on the case that shows the fragment split (measured on this host's kernel:
    6 bytes to the page end, then 2, then the tail bytes one by one)."""
    seq = expected_exits(Write(MMIO + PS - 6, 12, 0x42), 0)
    assert [(a - MMIO, n) for _, a, n, *_ in seq] == [(PS - 6, 6), (PS, 2), (PS + 2, 1), (PS + 3, 1),
                                                       (PS + 4, 1), (PS + 5, 1)]


def test_verify_reports_what_the_last_read_returned(backend: Kvm) -> None:
    """A device that answers differently each time: the qword mismatches, the byte-by-byte re-read
    finds nothing wrong, so the code reports the qword's last byte, with the value the report's
    own load got (one 8-byte read, eight 1-byte reads, one more 1-byte read, then the assertion)."""
    answers = iter([0x41] + [0x42] * 8 + [0x43])
    with backend.create_vm(u.KVM_X86_DEFAULT_VM) as vm:
        vcpu = vm.create_vcpu(0)
        if hasattr(vcpu, "run_timeout"):
            vcpu.run_timeout = 60.0
        vcpu.load(Program([Verify(MMIO, 8, 0x42), Sync(7)]))
        reads: list[tuple[int, int]] = []
        while True:
            ex = vcpu.run()
            if not isinstance(ex, ExitMmio):
                break
            assert not ex.is_write
            ex.data = bytes([next(answers)]) * ex.len
            reads.append((ex.phys_addr - MMIO, ex.len))
        vcpu.close()
    assert reads == [(0, 8)] + [(i, 1) for i in range(8)] + [(7, 1)]
    assert isinstance(ex, ExitGuestAssert) and (ex.gpa, ex.expected, ex.found) == (MMIO + 7, 0x42, 0x43)
