"""Fixtures for the VMM-layer tests: machines built on a backend, skipping (with the missing
capability named) where the backend cannot build them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from vmm_helpers import GPA, MachineFactory, MiB

import guestmem
from guestmem.api import Kvm
from guestmem.errors import CapabilityMissing
from guestmem.vmm import Machine, MachineConfig, RegionSpec


@pytest.fixture
def model() -> Iterator[Kvm]:
    kvm = guestmem.open("model")
    try:
        yield kvm
    finally:
        kvm.close()



@pytest.fixture
def make_machine() -> Iterator[MachineFactory]:
    """``make_machine(kvm, regions=..., **config)``: a Machine, closed after the test; a backend
    that cannot build it skips the test naming the missing capability."""
    built: list[Machine] = []

    def make(kvm: Kvm, regions: tuple[RegionSpec, ...] | None = None, **config: Any) -> Machine:
        cfg = MachineConfig(regions=regions or (RegionSpec("ram", GPA, 8 * MiB),), **config)
        try:
            m = Machine(kvm, cfg)
        except CapabilityMissing as exc:
            pytest.skip(f"{kvm.backend} backend: {exc}")
        built.append(m)
        return m

    yield make
    for m in built:
        m.close()
