"""The C guest end to end on the model's x86 CPU: an SNP-like and a TDX-like VM (and a default one),
driven through the VMM layer on this thread with ``vm.check_invariants()`` after every exit.

Skipped, naming what is missing, when gcc is absent or the model has no x86 CPU (``cpu="x86"``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import guestmem
from guestmem.api import Exit, ExitGuestAssert, ExitHalt, ExitIo, ExitSync
from guestmem.guest import cbuild
from guestmem.guest.cdevice import CGuestHost
from guestmem.vmm.exits import Action
from guestmem.vmm.layout import RegionSpec
from guestmem.vmm.machine import Machine, MachineConfig

GPA = 1 << 32
MEMORY = 4 << 20


@pytest.fixture(scope="module")
def cguest() -> cbuild.CGuest:
    try:
        return cbuild.build()
    except cbuild.CGuestBuildError as err:
        pytest.skip(str(err))


def _open_x86() -> Any:
    try:
        return guestmem.open("model", cpu="x86")
    except (TypeError, ValueError) as err:
        pytest.skip(f"the model has no x86 CPU (cpu='x86'): {err}")


def _run(flavour: str, image: Any, *, write: Callable[[CGuestHost], Any] | None = None,
         limit: int = 20_000) -> tuple[Machine, CGuestHost, Exit, Counter[str]]:
    kvm = _open_x86()
    m = Machine(kvm, MachineConfig(regions=(RegionSpec("ram", GPA, MEMORY),), flavour=flavour))
    m.create_vcpus(1)
    m.load({0: image})
    host = CGuestHost(m.host_read, m.host_write)
    if write is not None:
        write(host)
    vcpu = m.vcpus[0]
    exits: Counter[str] = Counter()
    for _ in range(limit):
        ex = vcpu.run()
        exits[ex.name] += 1
        m.vm.check_invariants()  # type: ignore[attr-defined]
        if isinstance(ex, ExitIo | ExitSync) and host.handle(ex):
            continue
        if isinstance(ex, ExitGuestAssert):
            return m, host, ex, exits
        verdict = m.handler.handle(0, vcpu, ex)
        m.vm.check_invariants()  # type: ignore[attr-defined]
        if verdict.action is Action.HALT:
            return m, host, ex, exits
        assert verdict.action is Action.CONTINUE, verdict.reason
    raise AssertionError(f"the guest did not stop within {limit} exits: {exits}")


PARAMS = cbuild.CGuestParams(data_gpa=GPA, data_pages=8, bounce_gpa=GPA + (2 << 20), rounds=3, payload=64,
                             seed=5)


@pytest.mark.parametrize("flavour, detected", [("snp", "snp"), ("tdx", "tdx"), ("default", "plain")])
def test_c_guest_on_model_x86(cguest: cbuild.CGuest, flavour: str, detected: str) -> None:
    m, host, last, exits = _run(flavour, cguest.with_params(PARAMS))
    try:
        assert isinstance(last, ExitHalt), (last, host.text)
        assert host.errors == [] and host.flavour == detected, host.text
        assert host.phases == [1, 2, 3, 4, 5]
        assert host.rounds == 3 and f"c-guest: {detected}" in host.text and "pass:" in host.text
        stats = m.converter.stats
        if flavour in ("snp", "tdx"):
            # every data page and the bounce page became private on first use (lazy accept: one
            # memory fault or hypercall each), the bounce page went shared once and came back
            assert stats["pages_to_private"] >= PARAMS.data_pages + 1
            assert stats["pages_to_shared"] == 1
            assert exits["hypercall"] == 2  # page-state change / MapGPA, to shared and back
            assert stats["memory_faults"] >= PARAMS.data_pages
            # checks: params + per data page accept + verify + bounce accept/rescind/PSC...
            assert host.checks > PARAMS.data_pages * 2
        else:
            assert stats.get("pages_to_shared", 0) == 0 and exits["hypercall"] == 0
        # the private data is there: read back through the guest's own map (the model's view)
        m.vm.check_invariants()  # type: ignore[attr-defined]
    finally:
        m.close()


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_wrong_device_answer_fails_the_guest(cguest: cbuild.CGuest, flavour: str) -> None:
    def corrupt(host: CGuestHost) -> None:
        real = host.write
        host.write = lambda g, d: real(g, d[:12] + bytes([d[12] ^ 1]) + d[13:])

    m, host, last, _ = _run(flavour, cguest.with_params(PARAMS), write=corrupt)
    try:
        assert isinstance(last, ExitGuestAssert), (last, host.text)
        assert last.op_index == 5 and last.gpa == PARAMS.bounce_gpa + 12
        assert last.found == last.expected ^ 1
    finally:
        m.close()
