"""Constants and small helpers shared by the VMM-layer tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import guestmem.uapi as u
from guestmem.api import ExitHypercall, Vcpu
from guestmem.guest.ops import Op, Program
from guestmem.vmm import Machine

GPA = 1 << 32
MiB = 1 << 20
PAGE = u.PAGE_SIZE
E = u.KVM_MAP_GPA_RANGE_ENCRYPTED
SZ_2M = u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M
SZ_1G = u.KVM_MAP_GPA_RANGE_PAGE_SZ_1G
PRIVATE_FLAG = u.KVM_MEMORY_EXIT_FLAG_PRIVATE


def hypercall(gpa: int, npages: int, attrs: int, nr: int = u.KVM_HC_MAP_GPA_RANGE) -> ExitHypercall:
    """A MAP_GPA_RANGE exit as KVM delivers it (ret pre-set to 0)."""
    return ExitHypercall(nr, (gpa, npages, attrs, 0, 0, 0))


def run_program(m: Machine, ops: list[Op], on_sync: Callable[[int], None] | None = None) -> None:
    """Run ``ops`` on vCPU 0 to completion; ``on_sync(value)`` runs at each Sync."""
    m.create_vcpus(1)
    m.load({0: Program(ops)})

    def sync(_vid: int, _vcpu: Vcpu, value: int) -> None:
        if on_sync is not None:
            on_sync(value)

    result = m.run(on_sync=sync, timeout_s=300)
    assert result.ok, result.error


MachineFactory = Callable[..., Machine]
"""The ``make_machine`` fixture: ``make_machine(kvm, regions=..., **MachineConfig fields)``."""
