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
