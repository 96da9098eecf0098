"""The run loop: one thread per vCPU, and a run that always ends with a report -- when a vCPU
raises, when the guest asserts, when a guest keeps faulting without progress, and when a vCPU
never comes back from KVM_RUN.  No test here measures time; the timeouts only guard against the
hang the run loop exists to prevent."""

from __future__ import annotations

import threading

import pytest
from vmm_helpers import GPA, PAGE, PRIVATE_FLAG, MachineFactory

from guestmem.api import Exit, ExitMemoryFault, Kvm, Vcpu
from guestmem.guest.ops import Program, Sync, Verify, Write
from guestmem.vmm import Machine

HANG_GUARD_S = 120.0


class Faulty:
    """Wraps a real vCPU; its ``run`` raises on the ``fail_on``-th call."""

    def __init__(self, inner: Vcpu, fail_on: int) -> None:
        self.inner = inner
        self.id = inner.id
        self.calls = 0
        self.fail_on = fail_on

    def load(self, program: Program) -> None:
        self.inner.load(program)

    def run(self) -> Exit:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("backend exploded")
        return self.inner.run()

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        return self.inner.pre_fault_memory(gpa, size, flags)

    def close(self) -> None:
        self.inner.close()


class Replay:
    """A vCPU that returns the same memory fault forever (a guest stuck on one page)."""

    def __init__(self, vid: int) -> None:
        self.id = vid

    def load(self, program: Program) -> None:
        pass

    def run(self) -> Exit:
        return ExitMemoryFault(GPA, PAGE, PRIVATE_FLAG)

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        return size

    def close(self) -> None:
        pass


class Stuck:
    """A vCPU whose KVM_RUN never returns (until the test lets it go)."""

    def __init__(self, vid: int) -> None:
        self.id = vid
        self.release = threading.Event()

    def load(self, program: Program) -> None:
        pass

    def run(self) -> Exit:
        self.release.wait()
        raise RuntimeError("released")

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        return size

    def close(self) -> None:
        self.release.set()


def two_vcpus(m: Machine, program: Program) -> None:
    m.create_vcpus(2)
    m.load({0: program, 1: program})


def test_a_raising_vcpu_stops_the_run(backend: Kvm, make_machine: MachineFactory) -> None:
    """vCPU 1 raises; vCPU 0, parked at a barrier waiting for it, is released; the report names
    vCPU 1 and the exception."""
    m = make_machine(backend, flavour="default")
    two_vcpus(m, Program([Write(GPA, PAGE, 1), Sync(7), Verify(GPA, PAGE, 1)]))
    m.vcpus[1] = Faulty(m.vcpus[1], fail_on=1)
    barrier = threading.Barrier(2)

    def on_sync(_vid: int, _vcpu: Vcpu, value: int) -> None:
        barrier.wait()

    result = m.run(on_sync=on_sync, on_stop=[barrier.abort], timeout_s=HANG_GUARD_S)
    assert not result.ok and not result.timed_out
    assert result.error == "vCPU 1: RuntimeError: backend exploded"
    by_id = {v.vcpu: v for v in result.vcpus}
    assert by_id[1].status == "failed" and "backend exploded" in (by_id[1].detail or "")
    assert by_id[0].status == "stopped"


def test_guest_assertion_is_reported(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected")
    m.create_vcpus(1)
    m.load({0: Program([Write(GPA, PAGE, 0x11), Verify(GPA, PAGE, 0x12)])})
    result = m.run(timeout_s=HANG_GUARD_S)
    assert not result.ok
    assert result.error is not None and "expected 0x12, found 0x11" in result.error


def test_a_fault_that_never_resolves_stops(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected")
    m.vcpus[0] = Replay(0)
    result = m.run(timeout_s=HANG_GUARD_S)
    assert result.error is not None and "stuck" in result.error and "memory faults in a row" in result.error


def test_a_vcpu_that_never_returns_is_reported_not_waited_for(model: Kvm, make_machine: MachineFactory
                                                              ) -> None:
    m = make_machine(model, flavour="sw-protected")
    stuck = Stuck(0)
    m.vcpus[0] = stuck
    try:
        result = m.run(timeout_s=0.2, grace_s=0.2)
    finally:
        stuck.release.set()
    assert result.timed_out and not result.ok
    assert result.vcpus[0].status == "stuck"
    assert result.error is not None and "did not stop" in result.error


@pytest.mark.parametrize("fail_on", [1, 3])
def test_a_failing_host_action_stops_all_vcpus(model: Kvm, make_machine: MachineFactory, fail_on: int
                                               ) -> None:
    m = make_machine(model, flavour="sw-protected")
    two_vcpus(m, Program([Sync(1), Sync(2), Sync(3), Sync(4)]))
    seen: list[int] = []

    def on_sync(vid: int, _vcpu: Vcpu, value: int) -> None:
        seen.append(value)
        if vid == 0 and value == fail_on:
            raise ValueError(f"host check {value} failed")

    result = m.run(on_sync=on_sync, timeout_s=HANG_GUARD_S)
    assert result.error == f"vCPU 0: ValueError: host check {fail_on} failed"
    assert result.vcpus[0].status == "failed"
