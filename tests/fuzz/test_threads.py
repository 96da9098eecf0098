"""The concurrent driver, bounded: vCPUs write/verify under PRESERVE conversions while other
threads allocate, punch, convert, pin and read, with the invariants checked alongside."""

from __future__ import annotations

import pytest

from guestmem.fuzz.threads import run_threads


@pytest.mark.parametrize("order", [0, 9])
def test_concurrent_without_pins(order: int) -> None:
    rep = run_threads(1.0, seed=order, pins=False, gmem_folio_order=order)
    assert rep.ok, rep.summary() + "\n" + "\n".join(rep.errors + rep.lost_writes + rep.invariant_errors)
    assert rep.ops["vcpu.program"] > 0 and rep.ops["convert"] > 0 and rep.ops["check"] > 0


def test_concurrent_with_pins() -> None:
    rep = run_threads(1.0, seed=1, pins=True)
    assert rep.ok, rep.summary() + "\n" + "\n".join(rep.errors + rep.lost_writes + rep.invariant_errors)
