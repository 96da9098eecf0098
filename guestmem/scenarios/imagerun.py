"""Run a scenario's ``[guest]`` image (the C guest) instead of phases of ops.

Why this exists: a built guest decides its own steps, so there is nothing to compile; the VMM layer
only has to start it with launch parameters taken from the scenario's ranges, be its device (the
port-I/O protocol of :mod:`guestmem.guest.cdevice`), and resolve its conversions and faults as for
any guest.  The guest's phase doorbells (``PORT_SYNC``) mark the maps of the report ("after phase
N: name", taken while the guest waits at its doorbell), and the run passes only if the guest
reported its result, detected the flavour the VM really has, and the device saw every request.
"""

from __future__ import annotations

import time
from typing import Any

from guestmem.api import ExitIo, ExitSync, Kvm, Vcpu
from guestmem.errors import CapabilityMissing
from guestmem.guest import cbuild
from guestmem.guest.cdevice import CGuestHost
from guestmem.scenarios.plan import Plan
from guestmem.scenarios.spec import Scenario
from guestmem.vmm.machine import Machine
from guestmem.vmm.runloop import RunResult
from guestmem.vmm.snapshot import MapSnapshot, auto_cell_size
from guestmem.vmm.trace import PHASE, VMM_TID, EventTrace

# The flavour a guest should detect on each machine flavour.
EXPECTED_FLAVOUR = {"snp": "snp", "tdx": "tdx", "sw-protected": "plain", "default": "plain"}


def guest_params(scn: Scenario, plan: Plan) -> cbuild.CGuestParams:
    """The C guest's launch parameters from the scenario's ``[guest]`` ranges (errors name the field)."""
    g = scn.guest
    assert g is not None
    data = plan.pieces(g.data, None)
    if len(data) != 1:
        raise g.locs["data"].error(f"range {g.data!r} must be one piece of RAM (it spans a hole)")
    bounce = plan.pieces(g.bounce, None)
    data_gpa, data_size = data[0]
    bounce_gpa = bounce[0][0]
    if data_gpa <= bounce_gpa < data_gpa + data_size:
        raise g.locs["bounce"].error(f"range {g.bounce!r} overlaps the data range {g.data!r}")
    try:
        return cbuild.CGuestParams(data_gpa=data_gpa, data_pages=data_size // cbuild.PAGE,
                                   bounce_gpa=bounce_gpa, rounds=g.rounds, payload=g.payload, seed=g.seed)
    except ValueError as exc:
        raise g.locs["data"].error(str(exc)) from None


def run_image(scn: Scenario, plan: Plan, kvm: Kvm, machine: Machine, notes: list[str], trace: EventTrace,
              progress: Any, snapshots: bool, timeout_s: float | None) -> Any:
    from guestmem.scenarios.run import finish_report

    params = guest_params(scn, plan)
    try:
        image = cbuild.c_guest_image(params)
    except cbuild.CGuestBuildError as exc:  # no gcc: the host lacks what builds the guest
        raise CapabilityMissing("a C compiler to build the C guest", str(exc)) from None
    machine.create_vcpus(1)
    machine.load({0: image})
    cell = auto_cell_size(plan.memory)
    before = machine.snapshot(cell) if snapshots else None
    phase_maps: list[MapSnapshot] = []
    host = CGuestHost(machine.host_read, machine.host_write)
    total = len(cbuild.PHASE_NAMES)

    def on_sync(vid: int, vcpu: Vcpu, value: int) -> None:
        host.handle(ExitSync(value=value))
        name = cbuild.PHASE_NAMES.get(value, f"phase {value}")
        trace.instant(PHASE, name, VMM_TID, phase=value)
        machine.accounting.sample(f"phase {value}", VMM_TID)
        if snapshots:
            snap = machine.snapshot(cell)
            phase_maps.append(MapSnapshot(snap.cell_size, snap.cells, snap.regions, snap.levels_known,
                                          snap.residency, f"after phase {value}: {name}"))
        if progress is not None:
            progress(min(len(host.phases), total), total)

    def on_io(vid: int, vcpu: Vcpu, ex: ExitIo) -> bool:
        return host.handle(ex)

    acct = machine.accounting
    start = time.monotonic()
    def on_exit(vid: int, ex: Any) -> None:
        acct.check_host(f"a {ex.name} exit of vCPU {vid}")

    result: RunResult = machine.run(on_sync=on_sync, on_io=on_io, timeout_s=timeout_s or scn.timeout_s,
                                    on_exit=on_exit)
    wall = time.monotonic() - start
    error = result.error or _verdict(host, machine.flavour.name, params.rounds)
    extra = {"guest": {"image": scn.guest.image if scn.guest else "?", "flavour": host.flavour,
                       "checks": host.checks, "rounds": host.rounds, "phases": list(host.phases),
                       "console": host.text, "params": params.__dict__, "image_bytes": image.size}}
    return finish_report(scn, plan, kvm, machine, notes, trace, error, wall, result, before,
                         cell if snapshots else None, phase_maps, total_units=total, progress=progress,
                         extra=extra)


def _verdict(host: CGuestHost, machine_flavour: str, rounds: int) -> str | None:
    if host.errors:
        return host.errors[0]
    if host.result is None:
        return "the guest halted without reporting a result"
    if host.rounds != rounds:
        return f"the device saw {host.rounds} request(s), not {rounds}"
    want = EXPECTED_FLAVOUR.get(machine_flavour)
    if want is not None and host.flavour != want:
        return f"the guest detected flavour {host.flavour!r} on a {machine_flavour} VM (expected {want!r})"
    return None

