"""The VMM memory manager: RAM regions over guest_memfd, conversion on exits, discard policy,
listeners, accounting and tracing, backend-agnostic (floor 4; written against ``guestmem.api``).

Start with :class:`Machine` and :class:`MachineConfig`::

    import guestmem
    from guestmem.vmm import Machine, MachineConfig
    with Machine(guestmem.open("model"), MachineConfig()) as m:
        m.create_vcpus(1); m.load({0: program}); result = m.run()
"""

from guestmem.vmm.accounting import Accounting, BoundViolation, Residency
from guestmem.vmm.backing import Capabilities, RegionBacking, Strategy, choose_strategy
from guestmem.vmm.convert import ConversionManager, Outcome
from guestmem.vmm.exits import ExitHandler, SyncHandler
from guestmem.vmm.flavours import FLAVOURS, FlavourSpec, UnknownFlavour, flavour
from guestmem.vmm.layout import Layout, LayoutError, Piece, RegionSpec
from guestmem.vmm.listeners import ConversionListener, IommuFault, SimulatedIommu
from guestmem.vmm.machine import HostAccessError, Machine, MachineConfig
from guestmem.vmm.policy import DiscardPolicy
from guestmem.vmm.runloop import RunResult, VcpuResult, run_vcpus
from guestmem.vmm.snapshot import Cell, MapSnapshot
from guestmem.vmm.state import PageTracker
from guestmem.vmm.trace import VMM_TID, Event, EventTrace

__all__ = [
    "FLAVOURS",
    "VMM_TID",
    "Accounting",
    "BoundViolation",
    "Capabilities",
    "Cell",
    "ConversionListener",
    "ConversionManager",
    "DiscardPolicy",
    "Event",
    "EventTrace",
    "ExitHandler",
    "FlavourSpec",
    "HostAccessError",
    "IommuFault",
    "Layout",
    "LayoutError",
    "Machine",
    "MachineConfig",
    "MapSnapshot",
    "Outcome",
    "PageTracker",
    "Piece",
    "RegionBacking",
    "RegionSpec",
    "Residency",
    "RunResult",
    "SimulatedIommu",
    "Strategy",
    "SyncHandler",
    "UnknownFlavour",
    "VcpuResult",
    "choose_strategy",
    "flavour",
    "run_vcpus",
]
