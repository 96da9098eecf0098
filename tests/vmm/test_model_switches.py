"""Every model switch is reachable from a scenario file ([model]) and the command line
(--model NAME=VALUE), checked like guestmem.open checks it, and a scenario that needs a switch
says which one instead of blaming a host."""

from __future__ import annotations

import pytest

from guestmem.cli import main
from guestmem.errors import ModelSwitchOff
from guestmem.scenarios import ScenarioError, load, load_text
from guestmem.scenarios.run import model_options, open_backend, run_scenario

GOOD = """\
[scenario]
name = "t"
description = "a test"
memory = "16M"

[[phase]]
name = "one"

[[phase.step]]
op = "write"
range = "slice"
pattern = "0x10"
"""


def test_model_table_reaches_the_model() -> None:
    scn = load_text(GOOD + '\n[model]\nattributes = "gmem"\ngmem_folio_order = 9\nvm_types = ["default", '
                    '"sw-protected"]\n', "t.toml")
    assert scn.model == {"attributes": "gmem", "gmem_folio_order": 9, "vm_types": (0, 1)}
    kvm = open_backend("model", scn, model={"gmem_folio_order": 18})
    assert kvm.options.attributes == "gmem" and kvm.options.gmem_folio_order == 18  # CLI wins
    kvm.close()


@pytest.mark.parametrize("body, needle", [
    ("bogus = 1", "unknown key 'bogus'"),
    ("gmem_folio_order = 3", "gmem_folio_order must be one of 0, 9, 18"),
    ('tdp_mmu = "yes"', "tdp_mmu must be true or false"),
    ("phys_bits = 99", "phys_bits must be in 36..52"),
    ('vm_types = ["nope"]', "vm_types"),
])
def test_model_table_errors_name_file_line_and_switch(body: str, needle: str) -> None:
    text = GOOD + "\n[model]\n" + body + "\n"
    with pytest.raises(ScenarioError) as info:
        load_text(text, "t.toml")
    message = str(info.value)
    assert needle in message and "t.toml:" in message and "model" in message


def test_inplace_backing_implies_gmem_attributes() -> None:
    assert model_options(load("inplace-hugepage"))["attributes"] == "gmem"


def test_a_switch_turned_off_is_named() -> None:
    with pytest.raises(ModelSwitchOff, match=r"attributes='vm'.*--model attributes=gmem"):
        run_scenario(load("inplace-hugepage"), model={"attributes": "vm"})


def test_cli_model_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "inplace-hugepage", "--model", "gmem_folio_order=0", "--json"]) == 0
    assert main(["run", "inplace-hugepage", "--model", "attributes=vm"]) == 2
    assert "set `attributes = \"gmem\"`" in capsys.readouterr().err
    for bad in ("nonsense", "tdp_mmu=maybe", "bogus=1"):
        assert main(["run", "boot", "--model", bad]) == 2
