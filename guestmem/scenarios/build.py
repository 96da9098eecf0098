"""From a plan and a live machine to what each vCPU runs and what the host does at each sync.

Guest steps become guest ops (:mod:`guestmem.guest.ops`): writes and verifies per range piece,
map-GPA-range hypercalls per chunk (with the page-size bits the step asks for), and for ``accept``
the flavour's own mechanism -- an explicit hypercall on a software-protected VM, a touch that
faults (an implicit conversion) where the hardware tags accesses.  Host steps become ``Sync``
doorbells whose handler runs the host action on the vCPU's thread, as a device model would.
Every vCPU ends every phase at a barrier; the next phase's setup runs once, there, while all
vCPUs are parked.  Progress markers (more doorbells) let a progress bar move during long phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guestmem import uapi as u
from guestmem.api import Vcpu
from guestmem.guest.ops import Accept, MapGpaRange, Op, Sync, Verify, Write
from guestmem.scenarios.parse import ITEM, PAGE_SIZES
from guestmem.scenarios.plan import Plan
from guestmem.scenarios.spec import Phase, Step
from guestmem.vmm.listeners import IommuFault, SimulatedIommu
from guestmem.vmm.machine import Machine
from guestmem.vmm.trace import HOST, VMM_TID

PAGE = u.PAGE_SIZE
ENCRYPTED = u.KVM_MAP_GPA_RANGE_ENCRYPTED
SIZE_BITS = {4 << 10: 0, 2 << 20: u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M, 1 << 30: u.KVM_MAP_GPA_RANGE_PAGE_SZ_1G}

KIND_SHIFT = 28
BARRIER = 1 << KIND_SHIFT
HOSTCALL = 2 << KIND_SHIFT
PROGRESS = 3 << KIND_SHIFT
INDEX_MASK = (1 << KIND_SHIFT) - 1


class ScenarioFailure(RuntimeError):
    """A host check of the scenario failed (the run stops with this message)."""


@dataclass(frozen=True)
class HostCall:
    """A host step to run at a sync point: for ``vcpu`` (None = setup), at ``iteration``."""

    phase: Phase
    step: Step
    vcpu: int | None
    item: str | None
    iteration: int


@dataclass
class Script:
    ops: list[Op] = field(default_factory=list)
    calls: list[HostCall] = field(default_factory=list)
    syncs: int = 0


@dataclass
class Build:
    scripts: list[Script]
    setups: list[list[HostCall]]  # per phase
    active: list[bool]  # per phase

    @property
    def total_units(self) -> int:
        return sum(s.syncs for s in self.scripts)


def _where(step: Step) -> str:
    loc = step.loc
    place = f"{loc.file}:{loc.line}: " if loc.file and loc.line else ""
    return f"{place}{loc.field} ({step.op})"


class Builder:
    def __init__(self, plan: Plan, machine: Machine) -> None:
        self.plan = plan
        self.machine = machine
        self.private = machine.strategy.private_memory
        self.hw_tagged = machine.flavour.hw_tagged_access
        # Flavours whose guests accept (validate) private pages before use: the same ones whose
        # hardware tags accesses.  Elsewhere an Accept op is meant to be a no-op, and is left out.
        self.accepts = self.hw_tagged

    def _active(self, when: str) -> bool:
        return when == "always" or (when == "private") == self.private

    def build(self) -> Build:
        nv = self.plan.vcpus
        scripts = [Script() for _ in range(nv)]
        setups: list[list[HostCall]] = []
        active: list[bool] = []
        for pi, phase in enumerate(self.plan.scenario.phases):
            on = self._active(phase.when)
            active.append(on)
            members = range(nv) if phase.vcpus is None else phase.vcpus
            for v in members:
                if v >= nv:
                    raise phase.loc.error(f"phase {phase.name!r} names vCPU {v}, but the run has "
                                          f"{nv} vCPU(s) (see --vcpus)")
            calls: list[HostCall] = []
            for item in phase.foreach or (None,):
                for it in range(phase.repeat):
                    calls += [HostCall(phase, s, None, item, it) for s in phase.setup if self._active(s.when)]
            setups.append(calls if on else [])
            for v in range(nv):
                sc = scripts[v]
                if on and v in members:
                    for item in phase.foreach or (None,):
                        for it in range(phase.repeat):
                            for step in phase.steps:
                                if self._active(step.when):
                                    self._emit(sc, phase, step, v, item, it)
                sc.ops.append(Sync(BARRIER | pi))
                sc.syncs += 1
        return Build(scripts, setups, active)

    # --- emission ---------------------------------------------------------------------------------
    def _pieces(self, step: Step, vcpu: int | None, item: str | None) -> list[tuple[int, int]]:
        return self.plan.pieces(step.args["range"], vcpu, item)

    def _marker(self, sc: Script) -> None:
        sc.ops.append(Sync(PROGRESS))
        sc.syncs += 1

    def _emit(self, sc: Script, phase: Phase, step: Step, v: int, item: str | None, it: int) -> None:
        a = step.args
        if step.op.startswith("host-"):
            sc.calls.append(HostCall(phase, step, v, item, it))
            sc.ops.append(Sync(HOSTCALL | (len(sc.calls) - 1)))
            sc.syncs += 1
            return
        pieces = self._pieces(step, v, item)
        if step.op in ("write", "verify"):
            cls = Write if step.op == "write" else Verify
            byte = a["pattern"].value(v, it)
            sc.ops += [cls(g, n, byte, a["access"]) for g, n in pieces]
            self._marker(sc)
        elif step.op == "convert":
            self._convert(sc, step, pieces)
            self._marker(sc)
        elif step.op == "accept":
            self._accept(sc, step, pieces, v, it)
        else:  # pragma: no cover - the parser admits only the ops above
            raise AssertionError(step.op)

    def _convert(self, sc: Script, step: Step, pieces: list[tuple[int, int]]) -> None:
        a = step.args
        granule = PAGE_SIZES[a["page_size"]]
        attrs = (ENCRYPTED if a["to"] == "private" else 0) | SIZE_BITS[granule]
        expect = 0 if a["expect"] == "ok" else -u.KVM_EINVAL
        chunk = a["chunk"]
        for g, n in pieces:
            if a["pages"] != "all":
                parity = 1 if a["pages"] == "odd" else 0
                for off in range(0, n, PAGE):
                    if (off // PAGE) % 2 == parity:
                        sc.ops.append(MapGpaRange(g + off, 1, attrs, expect))
                        if a["to"] == "private" and a["expect"] == "ok" and self.accepts:
                            sc.ops.append(Accept(g + off, PAGE))
                continue
            step_size = chunk or n
            for off in range(0, n, step_size):
                size = min(step_size, n - off)
                # npages counts 4 KiB pages whatever the page size; a misaligned request is the
                # guest's choice (the VMM must refuse it), so it is emitted as written.
                sc.ops.append(MapGpaRange(g + off, max(1, size // PAGE), attrs, expect))
            if a["to"] == "private" and a["expect"] == "ok" and self.accepts:
                # A guest validates what it asked to make private (PVALIDATE / TDG.MEM.PAGE.ACCEPT)
                # before using it.
                sc.ops.append(Accept(g, n))

    def _accept(self, sc: Script, step: Step, pieces: list[tuple[int, int]], v: int, it: int) -> None:
        a = step.args
        via = a["via"]  # "none": the host already made it private; the guest only accepts
        if via == "lazy":
            via = "fault" if self.hw_tagged else "hypercall"
        if via == "fault" and not self.hw_tagged:
            raise step.locs.get("via", step.loc).error(
                f"accept via fault needs a flavour whose hardware tags private accesses (snp, tdx); "
                f"{self.machine.flavour.name} derives the access kind from the attribute, so a touch "
                "never faults")
        chunk = a["chunk"]
        pattern = a["pattern"]
        for g, n in pieces:
            for off in range(0, n, chunk):
                cg, cn = g + off, min(chunk, n - off)
                if via == "hypercall":
                    huge = cg % u.HPAGE_2M == 0 and cn % u.HPAGE_2M == 0
                    bits = u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M if huge else 0
                    sc.ops.append(MapGpaRange(cg, cn // PAGE, ENCRYPTED | bits, 0))
                if self.accepts:
                    sc.ops.append(Accept(cg, cn))
                if pattern is not None:
                    byte = pattern.value(v, it)
                    sc.ops += [Write(cg, cn, byte, "auto"), Verify(cg, cn, byte, "auto")]
                elif via == "fault" and a["touch"]:
                    # The first private touch converts.  A write, not a read: what a freshly
                    # accepted page holds is not defined on every flavour (SNP does not clear it).
                    sc.ops.append(Write(cg, cn, 0, "auto"))
                self._marker(sc)


class HostRunner:
    """Executes :class:`HostCall`s against the machine (on a vCPU thread or at a barrier)."""

    def __init__(self, plan: Plan, machine: Machine) -> None:
        self.plan = plan
        self.machine = machine

    def run(self, call: HostCall, vcpu: Vcpu | None) -> None:
        step, a = call.step, call.step.args
        tid = call.vcpu if call.vcpu is not None else VMM_TID
        m = self.machine
        op = step.op.removeprefix("host-")
        if op == "policy":
            self._policy(step)
            return
        name = a["range"] if a["range"] != ITEM else call.item
        pieces = self.plan.pieces(a["range"], call.vcpu, call.item)
        with m.trace.span(HOST, step.op, tid, range=name, phase=call.phase.name):
            for g, n in pieces:
                if op == "write":
                    byte = a["pattern"].value(call.vcpu or 0, call.iteration)
                    if a.get("via") == "dma":
                        self._dma_write(step, g, n, byte)
                    else:
                        m.host_fill(g, n, byte)
                elif op == "verify":
                    self._verify(step, g, n, a["pattern"].value(call.vcpu or 0, call.iteration), call)
                elif op == "discard":
                    out = m.discard(g, n, a["side"], tid)
                    if not out.ok:
                        raise ScenarioFailure(f"{_where(step)}: discard failed: {out.error}")
                elif op == "convert":
                    out = m.convert(g, n, a["to"] == "private", tid, vcpu)
                    if not out.ok:
                        raise ScenarioFailure(f"{_where(step)}: host conversion failed: {out.error}")
                    if a.get("prefault"):
                        m.prefault(g, n, tid, vcpu)
                elif op == "prefault":
                    m.prefault(g, n, tid, vcpu)
                else:  # pragma: no cover
                    raise AssertionError(op)

    def _iommu(self, step: Step) -> SimulatedIommu:
        if self.machine.iommu is None:
            raise ScenarioFailure(f"{_where(step)}: via = \"dma\" needs [vmm] iommu = \"coordinated\" or "
                                  "\"legacy\"")
        return self.machine.iommu

    def _dma_write(self, step: Step, gpa: int, size: int, byte: int) -> None:
        iommu = self._iommu(step)
        if step.args.get("expect") != "fault":
            iommu.dma_fill(gpa, size, byte)
            return
        try:
            iommu.dma_fill(gpa, size, byte)
        except IommuFault:
            return  # refused, as it must be
        raise ScenarioFailure(f"{_where(step)}: a DMA write to gpa {gpa:#x} went through, but the IOMMU "
                              "should not map it (it is private or discarded)")

    def _verify(self, step: Step, gpa: int, size: int, byte: int, call: HostCall) -> None:
        data = (self._iommu(step).dma_read(gpa, size) if step.args.get("via") == "dma"
                else self.machine.host_read(gpa, size))
        bad = data.translate(None, bytes([byte]))
        if bad:
            i = next(k for k, b in enumerate(data) if b != byte)
            who = f"vCPU {call.vcpu}, " if call.vcpu is not None else ""
            raise ScenarioFailure(f"{_where(step)}: host expected {byte:#04x} at gpa {gpa + i:#x}, found "
                                  f"{data[i]:#04x} ({who}iteration {call.iteration})")

    def _policy(self, step: Step) -> None:
        conv = self.machine.converter
        changes = {k: v for k, v in step.args.items()
                   if k in ("discard_shared", "discard_private", "preallocate_private") and v is not None}
        if changes:
            conv.policy = conv.policy.with_(**changes)
        if step.args.get("prefault") is not None:
            conv.prefault = step.args["prefault"]
        self.machine.trace.instant(HOST, "policy", VMM_TID, **{k: str(v) for k, v in step.args.items()
                                                                 if v is not None})

