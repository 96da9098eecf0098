"""The MMIO exits a guest op gives: the exact sequence the kernel backend's compiled code produces.

Why this exists: a VMM sees an op's MMIO accesses one exit at a time, and for the model to be a
twin of the kernel it must give the same exits — the same addresses, lengths, data and count —
not "one exit of up to 8 bytes" of its own invention.  The rule follows from two facts:

1. What the op compiles to (:mod:`guestmem.guest.x86`): ``Write`` is ``rep stosq`` over
   ``size // 8`` qwords then ``rep stosb`` over the rest; ``Verify`` is ``repe scasq`` then
   ``repe scasb``, and on a mismatch it re-reads the failing qword byte by byte (``repe scasb``
   over its 8 bytes) and then loads the failing byte once more (``movzx r10, byte [rdi-1]``) to
   report it; ``Touch`` is one ``mov byte [rdi], al`` per touch point.
2. How KVM emulates a string instruction on MMIO: one element per emulation
   (arch/x86/kvm/emulate.c:5510-5530, the ``rep_prefix && String`` restart), and an access that
   crosses a page is split into two fragments (arch/x86/kvm/x86.c:7782-7796), each of which is
   its own exit of at most 8 bytes (x86.c:11437, ``len = min(8u, frag->len)``).  A fragment in
   ordinary memory is read or written directly, without an exit.

So: **an element is a qword of the op's body (``gpa + 8k``) or a byte of its tail (or a touch
point); each element's part in each MMIO page is one exit, of that part's length, with the
pattern as data for a write.**  A ``Verify`` element is compared only once all its parts are in;
a mismatching qword is then read again byte by byte up to the first mismatch (a 1-byte exit per
MMIO byte), and the failing byte once more; the assertion reports that last read.  The rule was
measured on this host's kernel and is checked on both backends by
``tests/conformance/test_mmio_exits.py``.

A ``Verify`` qword that straddles ordinary memory and MMIO and mismatches in its memory part
still takes the MMIO part's exit first, as on the kernel (:func:`straddling_element`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.api import Exit, ExitGuestAssert, ExitMmio
from guestmem.guest.ops import Touch, Verify, Write

if TYPE_CHECKING:
    from collections.abc import Callable

    from guestmem.guest.ops import Access
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
QWORD = 8


def element(op: Write | Verify | Touch, gpa: int, pos: int) -> tuple[int, int]:
    """The element (one string-instruction iteration) of ``op`` that holds byte ``pos``; ``gpa`` is
    the op's start as the vCPU decoded it."""
    if isinstance(op, Touch):
        return pos, pos + 1
    body_end = gpa + op.size // QWORD * QWORD
    if pos < body_end:
        start = gpa + (pos - gpa) // QWORD * QWORD
        return start, start + QWORD
    return pos, pos + 1


def fragment_end(pos: int, elem_end: int) -> int:
    """Where the fragment starting at ``pos`` ends: the element's end or the page's, first."""
    return min(elem_end, (pos // PS + 1) * PS)


@dataclass
class StringMmio:
    """The MMIO exits of one op in progress.  ``is_mmio(gpa)`` says whether a byte has no memory
    behind it; ``peek(gpa)`` reads one byte of ordinary memory as the guest would (or returns the
    exit that reading it needs first, e.g. a memory fault)."""

    op: Write | Verify | Touch
    gpa: int  # the op's start, decoded
    pc: int
    is_mmio: Callable[[int], bool]
    peek: Callable[[int], int | Exit]
    phase: str = "element"  # element | narrow | reread
    start: int = 0
    end: int = 0
    pos: int = 0  # the next byte this phase reads
    seen: dict[int, int] = field(default_factory=dict)
    found: int | None = None  # the failing byte as the report's own load read it
    pending: ExitMmio | None = None

    @property
    def write(self) -> bool:
        return not isinstance(self.op, Verify)

    def begin(self, pos: int) -> Exit:
        """The op reached MMIO at ``pos``: the first exit for the element that holds it."""
        self.phase = "element"
        self.start, self.end = element(self.op, self.gpa, pos)
        self.pos = pos
        self.seen = {}
        self.found = None
        for b in range(self.start, pos):  # the element's part in memory before the MMIO page
            if not self.is_mmio(b):
                got = self.peek(b)
                if isinstance(got, Exit):
                    return got
                self.seen[b] = got
        first = self._next()
        assert not isinstance(first, int), "begin() is only called where the op meets MMIO"
        return first

    def complete(self, done: ExitMmio) -> Exit | int:
        """The VMM completed ``done``; the next exit, or the position the op continues from."""
        if not done.is_write:
            data = bytes(done.data[: done.len]).ljust(done.len, b"\0")
            if self.phase == "reread":
                self.found = data[0]
            else:
                for i in range(done.len):
                    self.seen[done.phys_addr + i] = data[i]
        if self.phase == "element":
            self.pos = done.phys_addr + done.len
        return self._next()

    def _after(self, end: int) -> int:
        """Where the op goes on after an element: the next touch point for a Touch."""
        if isinstance(self.op, Touch):
            stride = self.op.stride
            return min(self.gpa + self.op.size, self.gpa + -(-(end - self.gpa) // stride) * stride)
        return end

    def _exit(self, pos: int, end: int) -> ExitMmio:
        n = end - pos
        ex = ExitMmio(pos, n, self.write, bytes([self.op.pattern]) * n if self.write else bytes(n))
        self.pending = ex
        return ex

    def _read(self, pos: int, end: int) -> Exit | None:
        """Make sure ``[pos, end)`` (within one page) is in ``seen``; an exit if that needs one."""
        if self.is_mmio(pos):
            return self._exit(pos, end)
        for b in range(pos, end):
            got = self.peek(b)
            if isinstance(got, Exit):
                return got
            self.seen[b] = got
        return None

    def _next(self) -> Exit | int:
        pattern = self.op.pattern
        if self.phase == "element":
            while self.pos < self.end:
                frag = fragment_end(self.pos, self.end)
                if self.write:
                    if self.is_mmio(self.pos):
                        return self._exit(self.pos, frag)
                    return self.pos  # the rest of the element is memory: the vCPU writes it
                ex = self._read(self.pos, frag)
                if ex is not None:
                    return ex
                self.pos = frag
            if self.write or all(self.seen.get(b, pattern) == pattern for b in range(self.start, self.end)):
                return self._after(self.end)
            if self.end - self.start == 1:  # a tail byte: straight to the report
                self.phase, self.pos = "reread", self.start
            else:  # the code reads the qword again, byte by byte
                self.phase, self.pos, self.seen = "narrow", self.start, {}
        if self.phase == "narrow":
            for b in range(self.start, self.end):
                if b not in self.seen:
                    ex = self._read(b, b + 1)
                    if ex is not None:
                        return ex
                if self.seen[b] != pattern:
                    self.phase, self.pos = "reread", b
                    break
            else:  # no byte differs this time: the code reports the qword's last byte
                self.phase, self.pos = "reread", self.end - 1
        assert self.phase == "reread"
        if self.found is None:
            if self.is_mmio(self.pos):
                return self._exit(self.pos, self.pos + 1)
            got = self.peek(self.pos)
            if isinstance(got, Exit):
                return got
            self.found = got
        return ExitGuestAssert(self.pos, pattern, self.found, self.pc, "Verify")


def straddling_element(vm: ModelVm, op: Write | Verify | Touch, gpa: int, at: int) -> int | None:
    """A Verify mismatch found in memory at ``at``: if its element goes on into an MMIO page, the
    page boundary where the element's MMIO part starts (the vCPU must read it before it can
    fail), else None."""
    start, end = element(op, gpa, at)
    boundary = (start // PS + 1) * PS
    if boundary < end and no_memory(vm, boundary, False):
        return boundary
    return None


def no_memory(vm: ModelVm, gpa: int, write: bool) -> bool:
    """Whether the guest's access to ``gpa`` is emulated as MMIO (fault.py's ``Emulate``): no
    memslot, or a write to a read-only one."""
    slot = vm.slot_for(gpa // PS)
    return slot is None or (write and slot.readonly)


def peek(vm: ModelVm, gpa: int, access: Access) -> int | Exit:
    """One byte of ordinary guest memory as the guest reads it, faulting it in if need be."""
    from guestmem.model.kvm.fault import Emulate, page_fault

    gfn = gpa // PS
    want = vm.arch.access_kind(access)
    for _ in range(64):
        with vm.mmu_lock():
            runs = vm.mmu.translate(0, gfn, gfn + 1, want, False)
            if runs:
                s, _, pfn, private = runs[0]
                return int(vm.arch.guest_read(vm.system.pool, pfn, gpa - s * PS, 1, private)[0])
        res = page_fault(vm, gfn, gfn + 1, access, False)
        if isinstance(res, Emulate):
            raise AssertionError(f"gpa {gpa:#x} has no memory behind it")  # callers ask is_mmio first
        if not isinstance(res, int):
            return res
    raise RuntimeError(f"gpa {gpa:#x}: the fault never settled")  # pragma: no cover
