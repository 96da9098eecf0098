"""A guest that spins on a value while the host changes memslots under it, as upstream's
``guest_spin_on_val()`` (set_memory_region_test.c) and ``guest_repeatedly_read()``
(private_mem_kvm_exits_test.c) do.

Why a harness: the op language has no loop, and upstream's races need a vCPU that is *inside*
``KVM_RUN`` when the host moves or deletes the slot.  A round here is ``ROUNDS_OPS`` reads of the
8 bytes at ``gpa`` (``Verify``) followed by a ``Sync``; the vCPU thread re-enters the guest round
after round until the host asks it to stop, so the guest reads continuously and every memslot
change lands while a run is in flight (the host only acts between its own calls, never between
runs).  What upstream's guest learns from the value it reads, the harness learns from the exits:

- a read that finds no memslot is an ``ExitMmio``: it is checked here (a read, 8 bytes, at
  ``gpa``: upstream's ``vcpu_worker`` assertions) and completed with ``MMIO_VAL`` in every byte,
  as upstream's worker copies ``MMIO_VAL`` into ``run->mmio.data``.  (The kernel backend's
  compiled ``Verify`` rescans a mismatching qword byte by byte, so right after an 8-byte read
  that differs from the spun-on value it reads single bytes; only then are 1-byte reads accepted.)
- a read that finds a value other than the one being spun on is a ``Verify`` failure, i.e. the
  end of upstream's spin loop: the new value (its first byte; the values used are uniform bytes)
  is recorded and the guest spins on it from then on;
- every round records the host phase it started in, how many reads it made and how many of them
  were MMIO, so a test can assert "every read was MMIO while the slot was gone" and "none once
  it was back";
- a read that differed from the spun-on value although it was no MMIO exit, while the kernel
  backend's byte-wise re-read finds the old value again, is a *transient*: a value the guest saw
  that no memory held and no MMIO exit delivered.  It is recorded apart (``transients``) and the
  tests assert there are none.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from guestmem.api import Exit, ExitGuestAssert, ExitMmio, ExitSync, Vcpu
from guestmem.guest.ops import Program, Sync, Verify

from .support import HANG_TIMEOUT

ROUND_OPS = 64  # reads per round: long enough that the vCPU is almost always inside KVM_RUN
READ_LEN = 8  # upstream reads a u64
MMIO_VAL = 0xEF  # what the host answers to an MMIO read (upstream: 0xbeef; a uniform byte here)


@dataclass
class Round:
    phase: int  # the host phase when the round started
    value: int  # the byte the guest was spinning on when the round started
    mmio_reads: int = 0  # 8-byte reads that were MMIO exits
    reads: int = 0  # 8-byte reads the guest made in the round
    end_value: int | None = None  # the byte it was spinning on when the round ended


@dataclass
class Spinner:
    """A vCPU thread spinning on the value at ``gpa``; ``phase`` is advanced by the host."""

    vcpu: Vcpu
    gpa: int
    value: int = 0
    phase: int = 0
    rounds: list[Round] = field(default_factory=list)
    changes: list[tuple[int, int]] = field(default_factory=list)  # (phase, new value)
    asserts: list[tuple[bool, ExitGuestAssert]] = field(default_factory=list)  # (after MMIO?, exit)
    transients: list[tuple[int, ExitGuestAssert]] = field(default_factory=list)  # (phase, exit)
    final: Exit | BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def program(self) -> Program:
        return Program([Verify(self.gpa, READ_LEN, self.value)] * ROUND_OPS + [Sync(1)])

    def start(self) -> Spinner:
        self._thread = threading.Thread(target=self._worker, name=f"spin-vcpu{self.vcpu.id}", daemon=True)
        self._thread.start()
        self.wait_rounds(1)
        return self

    def _worker(self) -> None:
        try:
            with self._lock:
                current = Round(self.phase, self.value)
            self.vcpu.load(self.program())
            after_mmio = False  # the last 8-byte read was MMIO and differed from the spun-on value
            while True:
                ex = self.vcpu.run()
                if isinstance(ex, ExitMmio):
                    assert not ex.is_write, f"unexpected MMIO write {ex!r}"
                    if ex.len == READ_LEN:
                        assert ex.phys_addr == self.gpa, f"unexpected MMIO address {ex!r}"
                        after_mmio = self.value != MMIO_VAL
                        current.mmio_reads += 1
                    else:
                        assert after_mmio and ex.len == 1, f"unexpected MMIO size {ex!r}"
                        in_read = self.gpa <= ex.phys_addr < self.gpa + READ_LEN
                        assert in_read, f"unexpected MMIO address {ex!r}"
                    ex.data = bytes([MMIO_VAL]) * ex.len
                    continue
                if isinstance(ex, ExitGuestAssert):  # the value changed: upstream's spin loop ends
                    found = ex.found & 0xFF
                    with self._lock:
                        current.reads += ex.op_index + 1
                        self.asserts.append((after_mmio, ex))
                        if after_mmio:  # the read that differed was MMIO (the rescan may not be)
                            self.changes.append((self.phase, MMIO_VAL))
                            if found != MMIO_VAL:
                                self.changes.append((self.phase, found))
                        elif found != self.value:
                            self.changes.append((self.phase, found))
                        else:  # differed, yet reads back as the old value: see transients
                            self.transients.append((self.phase, ex))
                        self.value = found
                    after_mmio = False
                    self.vcpu.load(self.program())
                    continue
                after_mmio = False
                if isinstance(ex, ExitSync):
                    with self._lock:
                        current.reads += ROUND_OPS
                        current.end_value = self.value
                        self.rounds.append(current)
                        current = Round(self.phase, self.value)
                    if self._stop.is_set():
                        return
                    self.vcpu.load(self.program())
                    continue
                self.final = ex
                return
        except BaseException as exc:  # reported on the main thread by stop()
            self.final = exc

    def advance(self) -> int:
        """The host finished a step: rounds that start from now on count for the next phase."""
        with self._lock:
            self.phase += 1
            return self.phase

    def wait_rounds(self, n: int, phase: int | None = None) -> list[Round]:
        """Wait until ``n`` whole rounds started in ``phase`` (default: the current one)."""
        phase = self.phase if phase is None else phase
        deadline = time.monotonic() + HANG_TIMEOUT
        while True:
            with self._lock:
                done = [r for r in self.rounds if r.phase == phase]
            if len(done) >= n:
                return done
            assert self._thread is not None and self._thread.is_alive(), (
                f"spinning vCPU stopped early: {self.final!r}")
            assert time.monotonic() < deadline, f"spinning vCPU made no progress in phase {phase}"
            time.sleep(0.001)

    def wait_end(self) -> Exit | BaseException | None:
        """Wait until the vCPU thread ends by itself (an exit the harness does not continue
        from) and return that exit."""
        assert self._thread is not None
        self._thread.join(HANG_TIMEOUT)
        assert not self._thread.is_alive(), "spinning vCPU did not stop (hang?)"
        return self.final

    def stop(self) -> None:
        """Stop at the end of the current round; re-raise what failed on the vCPU thread."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(HANG_TIMEOUT)
        assert not self._thread.is_alive(), "spinning vCPU did not stop (hang?)"
        if isinstance(self.final, BaseException):
            raise self.final
        assert self.final is None, f"spinning vCPU ended with an unexpected exit {self.final!r}"
