"""``Machine``: a VM with RAM regions, vCPUs, the conversion manager and its listeners, wired up.

This is the VMM layer's front door.  Given an open backend (``guestmem.open(...)``) and a
:class:`MachineConfig`, it creates the flavour's VM (a refusal names the missing VM type), probes
capabilities once, picks a backing strategy by capability, lays out RAM regions as memslots,
enables the map-GPA-range exit, attaches an IOMMU listener if asked, and runs guest programs on one
thread per vCPU.  Host-side operations a device model or a scenario needs (reading and writing
shared memory, DMA pins, host-initiated conversion and discard, pre-fault) go through it, so they
are traced and accounted like everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

from guestmem import uapi as u
from guestmem.api import Exit, Kvm, Vcpu, Vm
from guestmem.guest.image import GuestImage
from guestmem.guest.ops import Program
from guestmem.vmm.accounting import Accounting
from guestmem.vmm.backing import Capabilities, RegionBacking, Strategy, choose_strategy
from guestmem.vmm.convert import ContentMode, ConversionManager, Outcome, Prefault
from guestmem.vmm.exits import ExitHandler, IoHandler, SyncHandler
from guestmem.vmm.flavours import FlavourSpec, create_vm, flavour
from guestmem.vmm.introspect import introspection_for
from guestmem.vmm.layout import Layout, RegionSpec
from guestmem.vmm.listeners import SimulatedIommu
from guestmem.vmm.policy import DiscardPolicy
from guestmem.vmm.runloop import STOP_GRACE_S, RunResult, run_vcpus
from guestmem.vmm.snapshot import MapSnapshot, take_snapshot
from guestmem.vmm.state import PageTracker
from guestmem.vmm.trace import HOST, VMM_TID, EventTrace

PAGE = u.PAGE_SIZE
DEFAULT_GPA = 1 << 32  # where the selftests put guest_memfd memory
DEFAULT_SLACK = 2 << 20


class HostAccessError(RuntimeError):
    """A host read/write/DMA pin touched an address that is not guest RAM."""


@dataclass(frozen=True)
class MachineConfig:
    """What to build.  ``backing`` is "auto" or a :class:`Strategy` value; ``iommu`` is "none",
    "coordinated" or "legacy"; ``prefault`` is "off", "private" or "all"."""

    regions: tuple[RegionSpec, ...] = (RegionSpec("ram", DEFAULT_GPA, 64 << 20),)
    flavour: str = "sw-protected"
    backing: str = "auto"
    policy: DiscardPolicy = field(default_factory=DiscardPolicy)
    prefault: Prefault = "off"
    content: ContentMode = "auto"
    iommu: str = "none"
    slack: int = DEFAULT_SLACK
    first_slot: int = 10


class Machine:
    """A running guest's memory manager (see the module docstring)."""

    def __init__(self, kvm: Kvm, config: MachineConfig, *, trace: EventTrace | None = None) -> None:
        self.kvm = kvm
        self.config = config
        self.trace = trace if trace is not None else EventTrace()
        self.flavour: FlavourSpec = flavour(config.flavour)
        self.layout = Layout(config.regions)
        self.vcpus: dict[int, Vcpu] = {}
        self.regions: list[RegionBacking] = []
        self.iommu: SimulatedIommu | None = None
        self.vm: Vm = create_vm(kvm, self.flavour)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, vm = self.config, self.vm
        self.caps = Capabilities.probe(vm)
        self.strategy: Strategy = choose_strategy(self.caps, self.flavour, cfg.backing)
        if self.caps.map_gpa_range_exit:
            vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 0, (1 << u.KVM_HC_MAP_GPA_RANGE,))
        with self.trace.span(HOST, "create regions", VMM_TID, strategy=self.strategy.value):
            for i, spec in enumerate(self.layout):
                self.regions.append(RegionBacking(self.kvm, vm, spec, cfg.first_slot + i, self.strategy,
                                                  self.caps))
        self.tracker = PageTracker([(r.gpa // PAGE, r.end // PAGE) for r in self.layout])
        if cfg.policy.shared_backing == "prealloc" and self.strategy is Strategy.SEPARATE:
            for r in self.regions:  # populate the whole shared side now, as prealloc=on does
                r.fill(r.spec.gpa, r.spec.size, 0)
        self.introspection = introspection_for(self.kvm)
        self.accounting = Accounting(self.regions, self.tracker, self.introspection, cfg.slack, self.trace)
        self.converter = ConversionManager(self.layout, self.regions, self.tracker, self.strategy,
                                           self.caps, cfg.policy, self.accounting, self.trace,
                                           prefault=cfg.prefault, content=cfg.content)
        if cfg.iommu != "none":
            if cfg.iommu not in ("coordinated", "legacy"):
                raise ValueError(f"iommu must be none, coordinated or legacy, not {cfg.iommu!r}")
            self.iommu = SimulatedIommu(cfg.iommu)  # type: ignore[arg-type]
            with self.trace.span(HOST, "attach IOMMU", VMM_TID, mode=cfg.iommu):
                self.converter.add_listener(self.iommu, self.converter)
        self.handler = ExitHandler(self.converter, self.trace)
        self._finalize_launch()
        self.accounting.sample("setup", VMM_TID)

    def _finalize_launch(self) -> None:
        """SNP/TDX-like VMs must finish their launch (SNP_LAUNCH_FINISH / TDX_FINALIZE_VM) before
        the guest may fault or the host may pre-fault.  The interface has no launch calls yet, so
        this uses the backend's ``launch_finalize`` where it offers one."""
        if not self.flavour.hw_tagged_access:
            return
        finalize = getattr(self.vm, "launch_finalize", None)
        if callable(finalize):
            with self.trace.span(HOST, "launch finalize", VMM_TID):
                finalize()

    # --- vCPUs and running --------------------------------------------------------------------------
    def create_vcpus(self, n: int) -> None:
        for i in range(len(self.vcpus), n):
            self.vcpus[i] = self.vm.create_vcpu(i)
        if self.vcpus:
            self.converter.default_vcpu = self.vcpus[0]

    def load(self, programs: Mapping[int, Program | GuestImage]) -> None:
        for vid, prog in programs.items():
            self.vcpus[vid].load(prog)

    def run(self, *, on_sync: SyncHandler | None = None, timeout_s: float = 600.0,
            on_stop: list[Callable[[], None]] | None = None,
            on_exit: Callable[[int, Exit], None] | None = None, grace_s: float = STOP_GRACE_S,
            on_io: IoHandler | None = None) -> RunResult:
        """Run every loaded vCPU to completion (see :func:`guestmem.vmm.runloop.run_vcpus`);
        ``on_io`` is the device model for port I/O (without one, port I/O stops the run)."""
        self.handler.on_sync = on_sync
        self.handler.on_io = on_io
        result = run_vcpus(self.vcpus, self.handler, self.trace, timeout_s=timeout_s, on_stop=on_stop,
                           on_exit=on_exit, grace_s=grace_s)
        self.accounting.finish()
        return result

    # --- host-side operations -----------------------------------------------------------------------
    def convert(self, gpa: int, size: int, to_private: bool, tid: int = VMM_TID,
                vcpu: Vcpu | None = None) -> Outcome:
        return self.converter.convert(gpa, size, to_private, origin="host", tid=tid, vcpu=vcpu)

    def discard(self, gpa: int, size: int, side: str = "both", tid: int = VMM_TID) -> Outcome:
        return self.converter.discard(gpa, size, tid, side)

    def prefault(self, gpa: int, size: int, tid: int = VMM_TID, vcpu: Vcpu | None = None) -> int:
        return self.converter.prefault_range(vcpu or self.converter.default_vcpu, gpa, size, tid)

    def _pieces(self, gpa: int, size: int) -> list[tuple[RegionBacking, int, int]]:
        out = []
        for p in self.layout.split(gpa, size):
            if p.region is None:
                raise HostAccessError(f"[{p.gpa:#x}, {p.end:#x}) is not guest RAM")
            out.append((self.regions[p.region], p.gpa, p.size))
        return out

    def host_read(self, gpa: int, size: int) -> bytes:
        return b"".join(r.read(g, n) for r, g, n in self._pieces(gpa, size))

    def host_write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for r, g, n in self._pieces(gpa, len(data)):
            r.write(g, data[pos : pos + n])
            pos += n

    def host_fill(self, gpa: int, size: int, byte: int) -> None:
        for r, g, n in self._pieces(gpa, size):
            r.fill(g, n, byte)

    @contextmanager
    def dma_pin(self, gpa: int, size: int, tid: int = VMM_TID) -> Iterator[None]:
        """Pin the shared pages of ``[gpa, gpa+size)`` for DMA in flight; discards wait for it."""
        if gpa % PAGE or size % PAGE or size <= 0:
            raise HostAccessError("a DMA pin must cover whole pages")
        pieces = self._pieces(gpa, size)
        with ExitStack() as stack:
            for r, g, n in pieces:
                cm: AbstractContextManager[None] = r.shared.pin(r.offset(g), n)
                stack.enter_context(cm)
            self.tracker.pin(gpa // PAGE, (gpa + size) // PAGE, +1)
            try:
                yield
            finally:
                self.tracker.pin(gpa // PAGE, (gpa + size) // PAGE, -1)
        self.converter.release_deferred(gpa, size, tid)

    # --- reporting -----------------------------------------------------------------------------------
    def snapshot(self, cell: int = u.HPAGE_2M) -> MapSnapshot:
        return take_snapshot(self, cell)

    def summary(self) -> dict[str, object]:
        return {
            "flavour": self.flavour.name,
            "vm_type": self.flavour.vm_type_name,
            "backing": self.strategy.value,
            "capabilities": self.caps.as_dict(),
            "regions": [{"name": r.spec.name, "gpa": r.spec.gpa, "size": r.spec.size, "slot": r.slot}
                        for r in self.regions],
            "policy": {**self.converter.policy.__dict__, "prefault": self.converter.prefault,
                       "content": self.config.content},
            "conversion": dict(self.converter.stats),
            "mmio": {"reads": self.handler.mmio_reads, "writes": self.handler.mmio_writes},
            "iommu": self.iommu.stats() if self.iommu is not None else None,
            "accounting": self.accounting.summary(),
            "warnings": list(self.converter.warnings),
        }

    def close(self) -> None:
        """Detach listeners, close vCPUs, delete memslots and free the backing, close the VM."""
        if self.iommu is not None:
            self.iommu.detach()
        for v in self.vcpus.values():
            v.close()
        for r in self.regions:
            r.close()
        self.regions = []
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
