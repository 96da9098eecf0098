"""The bench's content-mode and peak-memory figures are well formed (their values are not asserted:
they are timings and depend on the machine)."""

from __future__ import annotations

import pytest

from guestmem import bench

UNSUPPORTED = {("sw-protected", "zero", "to_private"), ("snp", "zero", "to_private"),
               ("snp", "preserve", "to_shared"), ("tdx", "zero", "to_private"),
               ("tdx", "preserve", "to_shared")}


def test_conversion_rows_carry_ratios_and_backend() -> None:
    r = bench.bench_conversion_throughput(8 * 4096, repeat=2)
    assert r["xts_backend"] in ("native", "numpy") and r["goal_ratio"] == 0.25
    assert len(r["conversions"]) == 18
    for row in r["conversions"]:
        key = (row["flavour"], row["mode"], row["direction"])
        if key in UNSUPPORTED:
            assert row["error"] == "EOPNOTSUPP" and "ratio_to_memcpy" not in row
        else:
            q = row["ratio_to_memcpy"]
            assert row["error"] is None and 0 < q["min"] <= q["median"] <= q["max"]


@pytest.mark.parametrize("flavour", ["sw-protected", "snp", "tdx"])
def test_write_peak_child_writes_everything(flavour: str) -> None:
    row = bench._write_peak_child(flavour, 1 << 20)
    assert row["ok"] and row["touched_bytes"] == 1 << 20 and row["peak_rss_bytes"] > 0


def test_c_guest_rows_are_well_formed() -> None:
    """Issue 14's figures: one row per way a guest runs; the instruction counts come from the model's
    x86 CPU and agree across flavours to within the flavour-specific paths."""
    from guestmem import bench_cguest
    from guestmem.guest import cbuild

    try:
        cbuild.build()
    except cbuild.CGuestBuildError as exc:
        pytest.skip(str(exc))
    r = bench_cguest.bench_c_guest(data_pages=1, rounds=1, rounds_lo=1, rounds_hi=5, repeat=1)
    runs = {(row["program"], row["flavour"]): row for row in r["runs"]}
    for flavour in ("snp", "tdx", "default"):
        assert ("model x86", flavour) in runs and ("model ops", flavour) in runs
    if "kernel" not in r:  # the kernel backend ran
        assert ("kernel x86", "default") in runs
    for row in runs.values():
        assert row["cpu_s"] > 0 and row["exits"] > 0 and row["mips"] > 0
        assert row["guest_instructions"] > 1000
    # the plain path runs fewer instructions than the ones that accept and convert
    plain, snp = runs[("model x86", "default")], runs[("model x86", "snp")]
    assert plain["guest_instructions"] < snp["guest_instructions"]
    # four more device round trips, four more exits, on every way of running
    assert all("per_exit_us" in row for row in runs.values())
    assert "cpu_s" in r["method"]
