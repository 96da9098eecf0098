"""Every shipped scenario runs to a pass on the model, and the ones this host's kernel can run
(the shared-only subset) run for real on it; the rest skip naming the capability the kernel lacks."""

from __future__ import annotations

import pytest

import guestmem
from guestmem.errors import CapabilityMissing, KvmError
from guestmem.scenarios import load, shipped
from guestmem.scenarios.run import run_scenario

# Small guests for the kernel: its guest runs in KVM's instruction emulator.
KERNEL_MEMORY = {"balloon": 8 << 20, "bounce-io": 8 << 20, "snp-lazy-4g": 16 << 20,
                 "c-guest-snp": 2 << 20, "c-guest-tdx": 2 << 20}
# The 4 GiB lazy-accept guest is a benchmark-sized run (a million faults): here, the same scenario
# at 16 MiB; `guestmem run snp-lazy-4g` runs it whole.
MODEL_MEMORY = {"snp-lazy-4g": 16 << 20, "c-guest-snp": 4 << 20, "c-guest-tdx": 4 << 20}


@pytest.mark.parametrize("name", shipped())
def test_shipped_scenario_passes_on_the_model(name: str) -> None:
    scn = load(name)
    try:
        report = run_scenario(scn, memory=MODEL_MEMORY.get(name))
    except CapabilityMissing as exc:  # the model needs nothing from the host but gcc for the C guest
        if scn.guest is None:
            raise
        pytest.skip(str(exc))
    assert report.ok, report.error
    assert report.backend == "model" and report.flavour == scn.flavours[0]
    assert report.exits > 0 and report.frames_peak > 0
    assert report.bound_ok or not scn.vmm.enforce_bound
    assert all(v["status"] == "halted" for v in report.vcpu_results)


@pytest.mark.parametrize("name, flavour, memory", [
    ("boot", "snp", 24 << 20),  # lazy accept through memory-fault exits
    ("bounce-io", "tdx", 16 << 20),
    ("conversion-storm", "snp", 24 << 20),
])
def test_hardware_flavours_on_the_model(name: str, flavour: str, memory: int) -> None:
    report = run_scenario(load(name), flavour=flavour, memory=memory)
    assert report.ok, report.error
    assert report.flavour == flavour
    if name == "boot":
        assert report.exits_by_reason.get("memoryfault", 0) > 0


@pytest.mark.kernel
@pytest.mark.parametrize("name", shipped())
def test_shipped_scenario_on_the_kernel(name: str) -> None:
    try:
        guestmem.open("kernel").close()
    except (OSError, ImportError, KvmError) as exc:
        pytest.skip(f"kernel backend unavailable: {exc}")
    try:
        report = run_scenario(load(name), backend="kernel", memory=KERNEL_MEMORY.get(name))
    except CapabilityMissing as exc:
        pytest.skip(f"kernel backend: {exc}")
    assert report.ok, report.error
    assert report.backend == "kernel"
    assert report.frames_peak > 0
