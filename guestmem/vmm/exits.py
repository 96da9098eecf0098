"""What the VMM does with each vCPU exit.

One function per exit kind, answering with a :class:`Verdict`: keep running, the vCPU is done, or
the run must stop (with a reason a human can act on).  Conversions go to the
:class:`~guestmem.vmm.convert.ConversionManager`; ``Sync`` doorbells go to whoever drives the run
(a scenario); MMIO to RAM-less addresses reads as all-ones and ignores writes, as unassigned PCI
space does.  A memory fault that repeats at the same place without progress is a guest stuck in
a loop (libkrun#478's 100% CPU), and stops the vCPU instead of spinning forever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from guestmem.api import (
    Exit,
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitInternalError,
    ExitIo,
    ExitMemoryFault,
    ExitMmio,
    ExitShutdown,
    ExitSync,
    Vcpu,
)
from guestmem.vmm.convert import ConversionManager
from guestmem.vmm.trace import EXIT, EventTrace

MAX_REPEATED_FAULTS = 64

SyncHandler = Callable[[int, Vcpu, int], None]
"""Called as ``handler(vcpu_id, vcpu, value)`` for ``ExitSync``; raise to stop the run."""

IoHandler = Callable[[int, Vcpu, ExitIo], bool]
"""Called as ``handler(vcpu_id, vcpu, exit)`` for ``ExitIo`` (a device model's port I/O); True if
it handled the access, False to leave it unexpected (the run stops); raise to stop the run."""


class Action(Enum):
    CONTINUE = "continue"
    HALT = "halt"
    FAIL = "fail"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""


CONTINUE = Verdict(Action.CONTINUE)


class ExitHandler:
    """Dispatches exits for every vCPU of one machine."""

    def __init__(self, converter: ConversionManager, trace: EventTrace,
                 on_sync: SyncHandler | None = None, on_io: IoHandler | None = None) -> None:
        self.converter = converter
        self.trace = trace
        self.on_sync = on_sync
        self.on_io = on_io
        self.mmio_reads = 0
        self.mmio_writes = 0
        self._last_fault: dict[int, tuple[int, int, int]] = {}

    def handle(self, vid: int, vcpu: Vcpu, ex: Exit) -> Verdict:
        if ex.__class__ is ExitMemoryFault:  # the common exit first (a subclass takes the long way)
            return self._memory_fault(vid, vcpu, ex)
        if not isinstance(ex, ExitMemoryFault):
            self._last_fault.pop(vid, None)
        if isinstance(ex, ExitHypercall):
            self.converter.handle_map_gpa_range(ex, vid, vcpu)
            return CONTINUE
        if isinstance(ex, ExitMemoryFault):
            return self._memory_fault(vid, vcpu, ex)
        if isinstance(ex, ExitSync):
            if self.on_sync is None:
                return CONTINUE
            self.on_sync(vid, vcpu, ex.value)
            return CONTINUE
        if isinstance(ex, ExitHalt):
            return Verdict(Action.HALT)
        if isinstance(ex, ExitMmio):
            return self._mmio(vid, ex)
        if isinstance(ex, ExitGuestAssert):
            where = f" (guest op #{ex.op_index})" if ex.op_index >= 0 else ""
            return Verdict(Action.FAIL, f"{ex}{where}")
        if isinstance(ex, ExitShutdown):
            return Verdict(Action.FAIL, "the guest shut down (triple fault)")
        if isinstance(ex, ExitInternalError):
            return Verdict(Action.FAIL, f"KVM internal error, suberror {ex.suberror}, data {ex.data}")
        if isinstance(ex, ExitIo):
            if self.on_io is not None and self.on_io(vid, vcpu, ex):
                return CONTINUE
            return Verdict(Action.FAIL, f"unexpected port I/O at port {ex.port:#x}")
        return Verdict(Action.FAIL, f"unexpected exit {ex!r}")

    def _memory_fault(self, vid: int, vcpu: Vcpu, ex: ExitMemoryFault) -> Verdict:
        gpa, flags = ex.gpa, ex.flags
        last = self._last_fault.get(vid)
        n = last[2] + 1 if last is not None and last[0] == gpa and last[1] == flags else 1
        self._last_fault[vid] = (gpa, flags, n)
        if n > MAX_REPEATED_FAULTS:
            return self._stuck(ex, n)
        out = self.converter.handle_memory_fault(ex, vid, vcpu)
        if out.ok:
            return CONTINUE
        return Verdict(Action.FAIL, f"unresolvable memory fault: {out.error}")

    @staticmethod
    def _stuck(ex: ExitMemoryFault, n: int) -> Verdict:
        return Verdict(Action.FAIL, f"the guest is stuck: {n} memory faults in a row at gpa "
                       f"{ex.gpa:#x} ({'private' if ex.private else 'shared'}) that conversion "
                       "does not resolve")

    def _mmio(self, vid: int, ex: ExitMmio) -> Verdict:
        if ex.is_write:
            self.mmio_writes += 1
        else:
            self.mmio_reads += 1
            ex.data = b"\xff" * ex.len
        self.trace.instant(EXIT, "mmio", vid, gpa=hex(ex.phys_addr), len=ex.len, write=ex.is_write)
        return CONTINUE
