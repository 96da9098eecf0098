"""Accounting stays cheap in fragmented guests: a full measurement is O(populated runs), so the
VMM takes one only as often as keeps its cost a small share of the time (issue 10's cliff)."""

from __future__ import annotations

from vmm_helpers import GPA, PAGE, MachineFactory

from guestmem.api import Kvm
from guestmem.vmm import accounting


def test_costly_measurement_spaces_out_the_next(model: Kvm, make_machine: MachineFactory,
                                                monkeypatch) -> None:
    m = make_machine(model, flavour="sw-protected")
    clock = iter(range(0, 10**15, 10**9))  # every reading of the cost clock is 1 s later
    monkeypatch.setattr(accounting, "_cost_clock", lambda: next(clock))
    m.accounting._next_full_ns = 0  # the setup sample's gap is over
    before = m.accounting.samples
    m.convert(GPA, PAGE, True)  # the first run-time measurement "costs" 1 s...
    assert m.accounting.samples == before + 1
    for i in range(1, 20):  # ...so the next ones wait 50 s: only the O(1) frame check runs
        m.convert(GPA + 2 * i * PAGE, PAGE, True)
    assert m.accounting.samples == before + 1
    assert m.accounting.bound_ok
    m.accounting.finish()  # the final sample is always taken
    assert m.accounting.samples == before + 2


def test_measurement_in_progress_is_not_repeated(model: Kvm, make_machine: MachineFactory) -> None:
    m = make_machine(model, flavour="sw-protected")
    m.accounting._next_full_ns = 0
    m.accounting._measuring = True  # another vCPU is measuring: this one does not wait or repeat it
    before = m.accounting.samples
    m.convert(GPA, PAGE, True)
    assert m.accounting.samples == before


def test_the_host_check_after_an_exit_names_it_and_is_rate_limited(model: Kvm, make_machine: MachineFactory,
                                                                   monkeypatch) -> None:
    """The run loop's on_exit hook: over the bound, the check stops the run naming the exit;
    within HOST_CHECK_GAP_S of the last check it reads nothing (and builds no message)."""
    import pytest

    from guestmem.api import ExitHalt

    m = make_machine(model, flavour="sw-protected")
    acct = m.accounting
    acct.check_host_after_exit(0, ExitHalt())  # no host limit: nothing to check
    reads: list[int] = []
    monkeypatch.setattr(accounting, "process_resident_bytes", lambda: reads.append(1) or 10 << 30)
    acct.host_limit_bytes = 1 << 30
    acct._host_last = -1e9  # the last check was long ago
    with pytest.raises(accounting.ResidentLimitExceeded, match="after a halt exit of vCPU 3"):
        acct.check_host_after_exit(3, ExitHalt())
    assert len(reads) == 1 and acct.host_exceeded is not None
    acct.check_host_after_exit(3, ExitHalt())  # just checked: within the gap, nothing read
    assert len(reads) == 1
