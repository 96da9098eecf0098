"""Scenario files written wrong: each mistake comes back as one error naming the file, the line
and the field -- checked against where the mistake really is in the text."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestmem.scenarios import ScenarioError, load, load_text
from guestmem.scenarios.plan import make_plan

GOOD = """\
[scenario]
name = "t"
description = "a test"
vcpus = 2
memory = "16M"

[range.buf]
within = "slice"
size = "64K"

[[phase]]
name = "one"

[[phase.step]]
op = "write"
range = "buf"
pattern = "0x10+vcpu"

[[phase.step]]
op = "verify"
range = "buf"
pattern = "0x10+vcpu"
"""


def line_of(text: str, needle: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def broken(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


def test_the_good_file_parses() -> None:
    scn = load_text(GOOD, "t.toml")
    assert scn.name == "t" and scn.vcpus == 2 and len(scn.phases[0].steps) == 2
    plan = make_plan(scn)
    assert plan.pieces("buf", 1) == [((1 << 32) + 8 * (1 << 20), 64 * 1024)]


@pytest.mark.parametrize("old, new, needle, field, words", [
    ('op = "verify"', 'op = "verfiy"', 'op = "verfiy"', "phase[1].step[2].op", "unknown op"),
    ('range = "buf"\npattern = "0x10+vcpu"\n\n[[',
     'range = "bfu"\npattern = "0x10+vcpu"\n\n[[',
     'range = "bfu"', "phase[1].step[1].range", "unknown range 'bfu'"),
    ('pattern = "0x10+vcpu"\n\n[[phase.step]]', 'pattern = 300\n\n[[phase.step]]', "pattern = 300",
     "phase[1].step[1].pattern", "byte"),
    ('size = "64K"', 'size = "64Q"', 'size = "64Q"', "range.buf.size", "cannot read"),
    ('vcpus = 2', 'vcpus = "two"', 'vcpus = "two"', "scenario.vcpus", "expected an integer"),
    ('name = "one"', 'name = "one"\nrepeats = 3', "repeats = 3", "phase[1].repeats", "unknown key 'repeats'"),
    ('within = "slice"', 'within = "slise"', 'within = "slise"', "range.buf.within", "unknown range"),
    ('memory = "16M"', 'memory = "16M"\nflavours = ["sw-protected", "sev"]', "flavours =",
     "scenario.flavours", "'sev' is unknown"),
])
def test_errors_name_file_line_field(old: str, new: str, needle: str, field: str, words: str) -> None:
    text = broken(old, new)
    with pytest.raises(ScenarioError) as ei:
        load_text(text, "t.toml")
    err = ei.value
    assert (err.file, err.line, err.field) == ("t.toml", line_of(text, needle), field)
    assert words in err.message
    assert str(err).startswith(f"t.toml:{err.line}: {field}: ")


def test_toml_syntax_error_has_a_line() -> None:
    text = broken('vcpus = 2', 'vcpus = = 2')
    with pytest.raises(ScenarioError) as ei:
        load_text(text, "t.toml")
    assert ei.value.line == line_of(text, "vcpus = = 2") and "not valid TOML" in ei.value.message


def test_sizes_checked_when_memory_is_known() -> None:
    """A range that fits the scenario's memory but not the one asked for on the command line."""
    text = broken('size = "64K"', 'size = "6M"')
    scn = load_text(text, "t.toml")
    make_plan(scn)  # 16M / 2 vCPUs: 8M slices, fits
    with pytest.raises(ScenarioError) as ei:
        make_plan(scn, memory=8 << 20)
    assert (ei.value.line, ei.value.field) == (line_of(text, 'size = "6M"'), "range.buf.size")
    assert "does not fit" in ei.value.message and "4M" in ei.value.message


@pytest.mark.parametrize("kwargs, field, words", [
    ({"memory": 3 << 10}, "--memory", "positive multiple of 2M"),
    ({"memory": 2 << 20, "vcpus": 4}, "--memory", "too small for 4 vCPUs"),
    ({"vcpus": 0}, "--vcpus", "1..256"),
])
def test_impossible_command_line_sizes(kwargs: dict[str, int], field: str, words: str) -> None:
    with pytest.raises(ScenarioError) as ei:
        make_plan(load_text(GOOD, "t.toml"), **kwargs)
    assert ei.value.field == field and words in ei.value.message and ei.value.file is None


def test_setup_steps_cannot_use_per_vcpu_ranges() -> None:
    text = GOOD + '\n[[phase.setup]]\nop = "convert"\nrange = "buf"\nto = "private"\n'
    with pytest.raises(ScenarioError) as ei:
        load_text(text, "t.toml")
    assert ei.value.field == "phase[1].setup[1].range" and "per vCPU" in ei.value.message
    assert ei.value.line == len(text.splitlines()) - 1


def test_item_ranges_need_a_foreach() -> None:
    text = GOOD.replace('range = "buf"\npattern = "0x10+vcpu"\n\n[[phase.step]]',
                        'range = "{item}"\npattern = 1\n\n[[phase.step]]', 1)
    with pytest.raises(ScenarioError, match="no foreach") as ei:
        load_text(text, "t.toml")
    assert ei.value.line == line_of(text, 'range = "{item}"')


def test_range_cycles_are_refused() -> None:
    text = GOOD + '\n[range.a]\nwithin = "b"\nsize = "4K"\n\n[range.b]\nwithin = "a"\nsize = "4K"\n'
    with pytest.raises(ScenarioError, match="cycle"):
        load_text(text, "t.toml")


def test_files_and_names(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(broken('op = "verify"', 'op = 7'))
    with pytest.raises(ScenarioError) as ei:
        load(str(path))
    assert ei.value.file == str(path) and ei.value.field == "phase[1].step[2].op"
    with pytest.raises(ScenarioError, match="unknown scenario 'nope'"):
        load("nope")
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load(str(tmp_path / "missing.toml"))
