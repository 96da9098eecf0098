"""Run a scenario: open the backend, build the machine (trying the scenario's flavours in order),
compile the phases, run the vCPUs, and report.

The report (:class:`ScenarioReport`) holds what a person or a script wants after a run: did it
work, how long it took, exits by reason, conversions, the peak of resident frames and whether the
"resident ≤ guest size + slack" bound held, the machine's full summary, the event trace, and
optionally the guest physical map before and after.  Input errors raise
:class:`~guestmem.scenarios.errors.ScenarioError` before the backend is touched; a backend that
cannot run the scenario raises :class:`~guestmem.errors.CapabilityMissing` naming what it lacks;
everything that goes wrong *during* the run ends up in the report, never as a hang.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import guestmem
from guestmem import uapi as u
from guestmem.api import Kvm, Vcpu
from guestmem.errors import CapabilityMissing, ModelSwitchOff
from guestmem.scenarios.build import (
    BARRIER,
    HOSTCALL,
    INDEX_MASK,
    PROGRESS,
    Build,
    Builder,
    HostRunner,
    ScenarioFailure,
)
from guestmem.scenarios.errors import ScenarioError
from guestmem.scenarios.plan import Plan, make_plan
from guestmem.scenarios.sizes import fmt_size
from guestmem.scenarios.spec import Scenario
from guestmem.vmm.accounting import ResidentLimitExceeded
from guestmem.vmm.flavours import flavour as flavour_spec
from guestmem.vmm.machine import Machine, MachineConfig
from guestmem.vmm.policy import DiscardPolicy
from guestmem.vmm.runloop import RunResult
from guestmem.vmm.snapshot import MapSnapshot, auto_cell_size
from guestmem.vmm.trace import PHASE, VMM_TID, EventTrace

log = logging.getLogger("guestmem.scenario")

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class ScenarioReport:
    scenario: str
    file: str | None
    backend: str
    flavour: str
    vcpus: int
    memory: int
    ok: bool
    error: str | None
    wall_s: float
    exits: int
    exits_by_reason: dict[str, int]
    conversions: int
    frames_peak: int
    frames_peak_source: str
    bound_ok: bool
    notes: list[str]
    machine: dict[str, Any]
    vcpu_results: list[dict[str, Any]]
    trace: EventTrace
    before: MapSnapshot | None = None
    after: MapSnapshot | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # With snapshots: the map at the end of each phase that ran (title "after phase N: name"), taken
    # at the phase's closing barrier, while every vCPU waits there -- the pictures per phase.
    phase_maps: list[MapSnapshot] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object."""
        acct = self.machine.get("accounting", {})
        return {
            "scenario": self.scenario,
            "file": self.file,
            "backend": self.backend,
            "flavour": self.flavour,
            "vcpus": self.vcpus,
            "memory": self.memory,
            "ok": self.ok,
            "error": self.error,
            "wall_s": round(self.wall_s, 6),
            "exits": self.exits,
            "exits_by_reason": self.exits_by_reason,
            "conversions": self.conversions,
            "frames_peak": self.frames_peak,
            "frames_peak_source": self.frames_peak_source,
            "bound": {"ok": self.bound_ok, "guest_pages": acct.get("guest_pages"),
                      "limit_pages": acct.get("limit_pages"), "violations": acct.get("violations"),
                      "first_violation": acct.get("first_violation")},
            "notes": self.notes,
            "machine": self.machine,
            "vcpu_results": self.vcpu_results,
            "trace_events": len(self.trace),
        }


def model_options(scn: Scenario | None, overrides: dict[str, Any] | None = None,
                  cpu: str | None = None) -> dict[str, Any]:
    """The model switches a scenario runs with: what its [vmm] settings and ``cpu`` imply (a hugetlb
    shared side is 2 MiB host folios; in-place backing needs per-guest_memfd attributes; ``cpu =
    "x86"`` is the model's x86 CPU), then its [model] table, then ``cpu`` from the command line
    (``--cpu``), then ``overrides`` (``--model NAME=VALUE``), later ones winning."""
    options: dict[str, Any] = {}
    if scn is not None and scn.cpu != "ops":
        options["cpu"] = scn.cpu
    if scn is not None:
        if scn.vmm.shared_backing == "hugetlb":
            options["anon_folio_order"] = 9  # the model's stand-in for a hugetlb-backed shared side
        if scn.vmm.backing == "inplace":
            options["attributes"] = "gmem"
        options.update(scn.model)
    if cpu is not None:
        if cpu == "ops":
            options.pop("cpu", None)
        else:
            options["cpu"] = cpu
    options.update(overrides or {})
    return options


# Capabilities a model switch turns off, with the switch and the value that turns them on.
_SWITCH_FOR_CAP = {
    "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES": ("attributes", "gmem"),
    "KVM_CAP_MEMORY_ATTRIBUTES": ("attributes", "vm"),
    "KVM_CAP_PRE_FAULT_MEMORY": ("tdp_mmu", True),
}


def open_backend(backend: str, scn: Scenario | None = None, *, device: str | None = None,
                 model: dict[str, Any] | None = None, cpu: str | None = None) -> Kvm:
    """Open a backend for a scenario; a backend that cannot be opened is a missing capability."""
    if backend not in guestmem.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(guestmem.BACKENDS)}")
    options: dict[str, Any] = model_options(scn, model, cpu) if backend == "model" else {}
    if backend == "kernel" and device:
        options["path"] = device
    try:
        return guestmem.open(backend, **options)
    except (ImportError, OSError) as exc:
        raise CapabilityMissing(f"the {backend} backend", str(exc)) from None


def machine_config(scn: Scenario, plan: Plan, flavour: str, loader_bytes: int = 0) -> MachineConfig:
    """The VMM's configuration; ``loader_bytes`` (the model's x86 loader window, see
    :func:`loader_resident_bytes`) is added to the slack of the residency bound."""
    v = scn.vmm
    return MachineConfig(
        regions=plan.layout.regions, flavour=flavour, backing=v.backing,
        policy=DiscardPolicy(v.discard_shared, v.discard_private, v.preallocate_private,
                             v.shared_backing),  # type: ignore[arg-type]
        prefault=v.prefault, content=v.content, iommu=v.iommu,  # type: ignore[arg-type]
        slack=v.slack.absolute + loader_bytes,
    )


def loader_resident_bytes(kvm: Kvm, scn: Scenario, plan: Plan) -> int:
    """What the model's x86 CPU keeps resident outside guest RAM: its loader window's identity map,
    GDT and TSS (``x86.TABLES_SIZE``), a code region per vCPU, and a built image.  It lives in the
    model's frame pool, which the residency bound measures, so the bound's slack grows by it, as
    a firmware region would be allowed for; 0 on the kernel backend (whose loader is outside the
    guest's memory as the VMM measures it) and for the op interpreter."""
    options = getattr(kvm, "options", None)
    if kvm.backend != "model" or getattr(options, "cpu", "ops") != "x86":
        return 0
    from guestmem.guest import x86

    code = plan.vcpus * (64 << 10)  # the loader's CODE_REGION_MIN per vCPU
    image = 0
    if scn.guest is not None:
        from guestmem.guest import cbuild

        try:
            image = cbuild.build().image.size
        except cbuild.CGuestBuildError:
            image = 0  # the run stops later, naming the missing compiler
    return x86.TABLES_SIZE + code + -(-image // u.PAGE_SIZE) * u.PAGE_SIZE


def _check_requirements(scn: Scenario, m: Machine) -> None:
    needs = {
        "private-memory": (m.strategy.private_memory, "private memory"),
        "hypercall-exit": (m.caps.map_gpa_range_exit, "KVM_CAP_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE)"),
        "pre-fault": (m.caps.pre_fault, "KVM_CAP_PRE_FAULT_MEMORY"),
        "guest-memfd": (m.caps.guest_memfd, "KVM_CAP_GUEST_MEMFD"),
    }
    for req in scn.requires:
        ok, cap = needs[req]
        if not ok:
            raise CapabilityMissing(cap, f"scenario {scn.name!r} requires {req} "
                                    f"(flavour {m.flavour.name}, {m.strategy.value} backing)")


def create_machine(kvm: Kvm, scn: Scenario, plan: Plan, flavour: str | None, trace: EventTrace
                   ) -> tuple[Machine, list[str]]:
    """Build a machine of the first flavour that works (only ``flavour`` if one is forced)."""
    candidates = [flavour_spec(flavour).name] if flavour else list(scn.flavours)
    notes: list[str] = []
    first_error: CapabilityMissing | None = None
    for name in candidates:
        m: Machine | None = None
        try:
            m = Machine(kvm, machine_config(scn, plan, name, loader_resident_bytes(kvm, scn, plan)),
                        trace=trace)
            _check_requirements(scn, m)
            return m, notes
        except CapabilityMissing as exc:
            if m is not None:
                m.close()
            exc = _blame_switch(kvm, exc)
            first_error = first_error or exc
            notes.append(f"flavour {name} skipped: {exc}")
    assert first_error is not None
    raise first_error


def _blame_switch(kvm: Kvm, exc: CapabilityMissing) -> CapabilityMissing:
    """On the model, a capability that is only missing because a switch is off says so."""
    options = getattr(kvm, "options", None)
    if kvm.backend != "model" or options is None:
        return exc
    for cap, (switch, value) in _SWITCH_FOR_CAP.items():
        if exc.cap.startswith(cap) and getattr(options, switch) != value:
            return ModelSwitchOff(cap, switch, value, getattr(options, switch), str(exc))
    return exc


def run_scenario(scn: Scenario, *, backend: str = "model", flavour: str | None = None,
                 vcpus: int | None = None, memory: int | None = None, kvm: Kvm | None = None,
                 progress: Progress | None = None, snapshots: bool = False,
                 timeout_s: float | None = None, device: str | None = None,
                 max_resident: int | None = None, model: dict[str, Any] | None = None,
                 trace: bool = True, cpu: str | None = None) -> ScenarioReport:
    """Run ``scn`` and report (see the module docstring for what raises and what is reported).
    ``max_resident`` bounds the whole process's resident set: crossing it stops the run and the
    report says so (``extra["resident_limit"]``).  ``trace=False`` records no events (the report's
    trace is then empty): a fault then costs nothing for a trace nobody asked for.  ``cpu`` ("ops" or
    "x86", ``--cpu``) overrides the scenario's ``cpu``; the kernel backend always runs x86 code."""
    if cpu is not None and cpu not in ("ops", "x86"):
        raise ScenarioError(f"cpu must be ops or x86, not {cpu!r}", field="--cpu")
    if cpu == "ops" and scn.guest is not None:
        raise ScenarioError(f"scenario {scn.name!r} runs a [guest] image, which needs the x86 CPU",
                            field="--cpu")
    plan = make_plan(scn, vcpus=vcpus, memory=memory)
    if flavour is not None:
        flavour_spec(flavour)  # unknown names are bad input, before any backend work
        if flavour not in scn.flavours:
            raise ScenarioError(f"scenario {scn.name!r} is written for flavour(s) {', '.join(scn.flavours)}, "
                                f"not {flavour!r}", field="--flavour")
    own = kvm is None
    if model and backend != "model":
        raise ScenarioError("model switches apply to the model backend only", field="--model")
    kvm = kvm or open_backend(backend, scn, device=device, model=model, cpu=cpu)
    log.info("%s on the %s backend%s: %d vCPU(s), %s", scn.name, kvm.backend,
             f" ({getattr(kvm, 'options', '')})" if kvm.backend == "model" else "", plan.vcpus,
             fmt_size(plan.memory))
    events = EventTrace(enabled=trace)
    try:
        machine, notes = create_machine(kvm, scn, plan, flavour, events)
        log.info("machine: flavour %s, %s backing; %s", machine.flavour.name, machine.strategy.value,
                 "; ".join(notes) or "first flavour tried")
        try:
            machine.accounting.host_limit_bytes = max_resident
            return _run(scn, plan, kvm, machine, notes, events, progress, snapshots, timeout_s)
        finally:
            machine.close()
    finally:
        if own:
            kvm.close()


class _Driver:
    """The scenario's side of the run loop: barriers, setups, host calls, progress."""

    def __init__(self, plan: Plan, machine: Machine, build: Build, progress: Progress | None,
                 snapshot_cell: int | None = None) -> None:
        self.plan = plan
        self.snapshot_cell = snapshot_cell
        self.phase_maps: list[MapSnapshot] = []
        self.machine = machine
        self.build = build
        self.host = HostRunner(plan, machine)
        self.progress = progress
        self.total = build.total_units
        self.done = 0
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._phase = 0
        self.barrier = threading.Barrier(plan.vcpus, action=self._between_phases)

    def run_setup(self, pi: int) -> None:
        phase = self.plan.scenario.phases[pi]
        if not self.build.active[pi]:
            self.machine.trace.instant(PHASE, f"skip {phase.name}", VMM_TID, when=phase.when)
            return
        self.machine.trace.instant(PHASE, phase.name, VMM_TID, phase=pi + 1)
        log.info("phase %d/%d: %s", pi + 1, len(self.plan.scenario.phases), phase.name)
        for call in self.build.setups[pi]:
            log.debug("setup: %s", call)
            self.host.run(call, self.machine.converter.default_vcpu)

    def _between_phases(self) -> None:
        pi = self._phase
        self.machine.accounting.sample(f"phase {pi + 1}", VMM_TID)
        if self.snapshot_cell is not None and self.build.active[pi] and self.failure is None:
            snap = self.machine.snapshot(self.snapshot_cell)
            name = self.plan.scenario.phases[pi].name
            self.phase_maps.append(MapSnapshot(snap.cell_size, snap.cells, snap.regions, snap.levels_known,
                                               snap.residency, f"after phase {pi + 1}: {name}"))
        self._phase += 1
        if self._phase < len(self.plan.scenario.phases) and self.failure is None:
            try:
                self.run_setup(self._phase)
            except Exception as exc:  # reported by every vCPU leaving the barrier
                self.failure = f"setup of phase {self._phase + 1}: {exc}"

    def on_sync(self, vid: int, vcpu: Vcpu, value: int) -> None:
        kind, index = value & ~INDEX_MASK, value & INDEX_MASK
        if kind == HOSTCALL:
            self.host.run(self.build.scripts[vid].calls[index], vcpu)
        elif kind == BARRIER:
            self.barrier.wait()
            if self.failure is not None:
                raise ScenarioFailure(self.failure)
        elif kind != PROGRESS:
            raise ScenarioFailure(f"the guest rang an unknown doorbell {value:#x}")
        if self.progress is not None:
            with self._lock:
                self.done += 1
                done = self.done
            self.progress(done, self.total)


def _run(scn: Scenario, plan: Plan, kvm: Kvm, machine: Machine, notes: list[str], trace: EventTrace,
         progress: Progress | None, snapshots: bool, timeout_s: float | None) -> ScenarioReport:
    from guestmem.guest.ops import Program

    if scn.guest is not None:
        from guestmem.scenarios.imagerun import run_image

        return run_image(scn, plan, kvm, machine, notes, trace, progress, snapshots, timeout_s)
    build = Builder(plan, machine).build()
    machine.create_vcpus(plan.vcpus)
    machine.load({v: Program(s.ops) for v, s in enumerate(build.scripts)})
    cell = auto_cell_size(plan.memory)
    before = machine.snapshot(cell) if snapshots else None
    driver = _Driver(plan, machine, build, progress, cell if snapshots else None)
    start = time.monotonic()
    error: str | None = None
    result: RunResult | None = None
    acct = machine.accounting
    try:
        driver.run_setup(0)
    except Exception as exc:
        error = f"setup of phase 1: {exc}"
    if error is None:
        # Every exit is a chance to check the process's resident set (rate limited inside), so a run
        # that grows without converting anything still stops at the bound.
        result = machine.run(on_sync=driver.on_sync, timeout_s=timeout_s or scn.timeout_s,
                             on_stop=[driver.barrier.abort],
                             on_exit=acct.check_host_after_exit)
        error = result.error
    else:
        machine.accounting.finish()
    wall = time.monotonic() - start
    return finish_report(scn, plan, kvm, machine, notes, trace, error, wall, result,
                         before, cell if snapshots else None, driver.phase_maps,
                         total_units=build.total_units, progress=progress)


def finish_report(scn: Scenario, plan: Plan, kvm: Kvm, machine: Machine, notes: list[str], trace: EventTrace,
                  error: str | None, wall: float, result: RunResult | None, before: MapSnapshot | None,
                  cell: int | None, phase_maps: list[MapSnapshot], *, total_units: int = 0,
                  progress: Progress | None = None, extra: dict[str, Any] | None = None) -> ScenarioReport:
    """After a run: the model's invariants, the residency bound, the maps, and the report."""
    acct = machine.accounting
    if error is None:
        check = getattr(machine.vm, "check_invariants", None)  # the model's self-check, where offered
        if callable(check):
            try:
                check()
            except AssertionError as exc:
                error = f"model invariant violated after the run: {exc}"
    try:
        acct.check_host("the run", force=True)
    except ResidentLimitExceeded:
        pass  # recorded in host_exceeded
    resident_limit = acct.host_exceeded
    if resident_limit is not None:
        error = f"stopped: {resident_limit}"
    summary = machine.summary()
    peak, peak_source = acct.frames_peak()
    bound_ok = acct.bound_ok
    if not bound_ok and scn.vmm.enforce_bound and error is None:
        error = f"memory bound broken: {acct.violations[0].describe()}"
    elif not bound_ok:
        notes.append(f"memory bound broken (reported, not enforced): {acct.violations[0].describe()}")
    if progress is not None:
        progress(total_units, total_units)
    vcpu_results = []
    if result is not None:
        for vr in result.vcpus:
            vcpu_results.append({"vcpu": vr.vcpu, "status": vr.status, "exits": dict(vr.exits),
                                 "error": vr.error, "detail": vr.detail})
    exits = result.exits if result is not None else {}
    after = machine.snapshot(cell) if cell is not None else None
    if before is not None:
        before = MapSnapshot(before.cell_size, before.cells, before.regions, before.levels_known,
                             before.residency, f"{scn.name}: before")
    if after is not None:
        after = MapSnapshot(after.cell_size, after.cells, after.regions, after.levels_known,
                            after.residency, f"{scn.name}: after")
    return ScenarioReport(
        scenario=scn.name, file=scn.file, backend=kvm.backend, flavour=machine.flavour.name,
        vcpus=plan.vcpus, memory=plan.memory, ok=error is None, error=error, wall_s=wall,
        exits=sum(exits.values()), exits_by_reason=dict(exits),
        conversions=int(machine.converter.stats["conversions"]), frames_peak=peak,
        frames_peak_source=peak_source, bound_ok=bound_ok, notes=notes, machine=summary,
        vcpu_results=vcpu_results, trace=trace, before=before, after=after, phase_maps=phase_maps,
        extra={"memory_human": fmt_size(plan.memory), "resident_limit": resident_limit,
               "host_peak_bytes": acct.host_peak_bytes, **(extra or {})},
    )
