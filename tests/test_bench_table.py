"""``guestmem bench`` reads as a table: every number in the JSON becomes a row with its unit, the
spread where the bench repeated a figure, and the goal where one was set."""

from __future__ import annotations

from guestmem.report.benchtable import fmt_value, rows

RESULT = {
    "machine": {"cpus": 2, "python": "3.11", "kernel": "6.18"},
    "scaling": [{"guest_bytes": 1 << 30, "convert_all_s": 6.6e-05}],
    "conversion_throughput": {
        "goal_ratio": 0.25,
        "memcpy_gib_per_s": 1.9,
        "conversions": [{"flavour": "snp", "mode": "preserve", "direction": "to_private",
                         "ratio_to_memcpy": {"median": 0.5, "min": 0.4, "max": 0.6}, "meets_goal": True}],
    },
    "total_s": 12.5,
}


def test_rows_have_units_spread_and_goals() -> None:
    table = {r[0]: r[1:] for r in rows(RESULT)}
    assert table["scaling[1GiB].convert_all_s"] == ("66", "µs", "", "")
    assert table["scaling[1GiB].guest_bytes"][:2] == ("1", "GiB")
    ratio = table["conversion_throughput.conversions[snp preserve to_private].ratio_to_memcpy"]
    assert ratio == ("0.5", "×", "0.4..0.6", "met")
    assert table["conversion_throughput.memcpy_gib_per_s"][:2] == ("1.9", "GiB/s")
    assert table["total_s"] == ("12.5", "s", "", "")
    assert not any(r[0].startswith("machine") for r in rows(RESULT))


def test_units_scale() -> None:
    assert fmt_value("x_s", 0.0042) == ("4.2", "ms")
    assert fmt_value("x_bytes", 3 << 20) == ("3", "MiB")
    assert fmt_value("x_gib_per_s", 2.5) == ("2.5", "GiB/s")
