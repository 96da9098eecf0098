"""Scenarios that run the C guest: the ``cpu`` key and the ``[guest]`` table (hostile input named by
file, line and field), its launch parameters from ranges, and the run on the kernel backend's
default VM (the shared subset; skipped without /dev/kvm or gcc)."""

from __future__ import annotations

import pytest

import guestmem
from guestmem.errors import CapabilityMissing, KvmError
from guestmem.guest import cbuild
from guestmem.scenarios import ScenarioError, load, load_text
from guestmem.scenarios.imagerun import guest_params
from guestmem.scenarios.plan import make_plan
from guestmem.scenarios.run import model_options, run_scenario

GOOD = """\
[scenario]
name = "cg"
description = "c guest"
flavours = ["snp", "default"]
cpu = "x86"
memory = "4M"

[guest]
image = "c-guest"
data = "data"
bounce = "bounce"
rounds = 3

[range.data]
within = "ram"
size = "64K"

[range.bounce]
within = "ram"
offset = "1M"
size = "4K"
"""


def broken(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


def test_good_guest_scenario() -> None:
    scn = load_text(GOOD, "cg.toml")
    assert scn.cpu == "x86" and scn.guest is not None and scn.phases == ()
    assert (scn.guest.image, scn.guest.rounds, scn.guest.payload) == ("c-guest", 3, 256)
    p = guest_params(scn, make_plan(scn))
    assert p == cbuild.CGuestParams(data_gpa=1 << 32, data_pages=16, bounce_gpa=(1 << 32) + (1 << 20),
                                    rounds=3, payload=256, seed=1)


def test_cpu_sets_the_model_switch() -> None:
    scn = load_text(GOOD, "cg.toml")
    assert model_options(scn)["cpu"] == "x86"
    assert "cpu" not in model_options(scn, cpu="ops")
    assert model_options(load("boot"), cpu="x86")["cpu"] == "x86"
    assert "cpu" not in model_options(load("boot"))


@pytest.mark.parametrize("old, new, field, words", [
    ('cpu = "x86"', 'cpu = "arm"', "scenario.cpu", "not one of ops, x86"),
    ('cpu = "x86"', 'cpu = "ops"', "scenario.cpu", 'set cpu = "x86"'),
    ('cpu = "x86"', 'cpu = 86', "scenario.cpu", "expected a string"),
    ('memory = "4M"', 'memory = "4M"\nvcpus = 2', "scenario.vcpus", "one vCPU"),
    ('image = "c-guest"', 'image = "linux"', "guest.image", "not one of c-guest"),
    ('data = "data"', 'data = "nope"', "guest.data", "must name a [range]"),
    ('bounce = "bounce"', 'bounce = "slice"', "guest.bounce", "must name a [range]"),
    ('rounds = 3', 'rounds = -1', "guest.rounds", "rounds must be"),
    ('rounds = 3', 'rounds = 3.0', "guest.rounds", "expected an integer"),
    ('rounds = 3', 'rounds = 3\npayload = 5000', "guest.payload", "payload must be"),
    ('rounds = 3', 'rounds = 3\ncolour = 1', "guest.colour", "unknown key"),
    ('[range.data]', '[[phase]]\nname = "x"\n\n[range.data]', "phase", "one or the other"),
])
def test_hostile_guest_table(old: str, new: str, field: str, words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_text(broken(old, new), "cg.toml")
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)
    assert info.value.file == "cg.toml"


def test_no_guest_still_needs_phases() -> None:
    text = GOOD[: GOOD.index("[guest]")] + GOOD[GOOD.index("[range.data]"):]
    with pytest.raises(ScenarioError, match="at least one"):
        load_text(text, "cg.toml")


def test_overlapping_ranges_are_named() -> None:
    scn = load_text(broken('offset = "1M"', 'offset = "32K"'), "cg.toml")
    with pytest.raises(ScenarioError) as info:
        guest_params(scn, make_plan(scn))
    assert info.value.field == "guest.bounce" and "overlaps" in str(info.value)


def test_cpu_ops_refused_for_an_image() -> None:
    with pytest.raises(ScenarioError, match="needs the x86 CPU"):
        run_scenario(load_text(GOOD, "cg.toml"), cpu="ops")
    with pytest.raises(ScenarioError, match="cpu must be"):
        run_scenario(load("boot"), cpu="arm")


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["c-guest-snp", "c-guest-tdx"])
def test_c_guest_scenarios_on_the_kernel(name: str) -> None:
    try:
        guestmem.open("kernel").close()
    except (OSError, KvmError) as exc:
        pytest.skip(f"kernel backend unavailable: {exc}")
    try:
        cbuild.build()
    except cbuild.CGuestBuildError as exc:
        pytest.skip(str(exc))
    try:
        report = run_scenario(load(name), backend="kernel", snapshots=True, memory=2 << 20)
    except CapabilityMissing as exc:
        pytest.skip(f"kernel backend: {exc}")
    assert report.ok, report.error
    g = report.extra["guest"]
    want = {"snp": "snp", "tdx": "tdx", "default": "plain"}[report.flavour]
    assert g["flavour"] == want and g["rounds"] == 4 and g["phases"] == [1, 2, 3, 4, 5]
    assert "pass:" in g["console"]
    assert [m.title for m in report.phase_maps] == [
        "after phase 1: paging", "after phase 2: accepted", "after phase 3: shared", "after phase 4: device",
        "after phase 5: private"]


@pytest.mark.parametrize("name, flavour", [("c-guest-snp", "snp"), ("c-guest-tdx", "tdx")])
def test_c_guest_scenarios_on_the_model(name: str, flavour: str) -> None:
    try:
        cbuild.build()
    except cbuild.CGuestBuildError as exc:
        pytest.skip(str(exc))
    report = run_scenario(load(name), snapshots=True, memory=4 << 20)
    assert report.ok, report.error
    assert report.flavour == flavour and report.extra["guest"]["flavour"] == flavour
    # lazy accept: one memory fault per data page (a quarter of RAM), then the bounce page shared
    # and taken back with a hypercall each
    assert report.exits_by_reason["memoryfault"] >= (1 << 20) // 4096
    assert report.exits_by_reason["hypercall"] == 2
    device, private = report.phase_maps[3], report.phase_maps[4]
    assert sum(c.shared_resident for c in device.cells) == 1  # pages: the bounce page
    assert sum(c.shared_resident for c in private.cells) == 0


def test_without_a_compiler_the_run_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", "no-such-cc-guestmem")
    monkeypatch.setenv("GUESTMEM_CACHE", str(tmp_path))
    with pytest.raises(CapabilityMissing, match=r"C compiler.*'no-such-cc-guestmem' is not on PATH"):
        run_scenario(load("c-guest-snp"), memory=2 << 20)


def test_an_op_scenario_on_the_x86_cpu_keeps_its_bound() -> None:
    """--cpu x86 on a phases scenario: the compiled ops run on the model's x86 CPU, and the loader
    window it keeps resident (page tables, code) is counted in the bound's slack, not against RAM."""
    from guestmem.guest import x86

    scn = load("bounce-io")
    report = run_scenario(scn, cpu="x86", memory=8 << 20, vcpus=1)
    assert report.ok, report.error
    assert report.bound_ok
    limit = report.machine["accounting"]["limit_pages"] * 4096
    assert limit == (8 << 20) + scn.vmm.slack.absolute + x86.TABLES_SIZE + (64 << 10)
    ops = run_scenario(scn, memory=8 << 20, vcpus=1)
    assert ops.machine["accounting"]["limit_pages"] * 4096 == (8 << 20) + scn.vmm.slack.absolute
