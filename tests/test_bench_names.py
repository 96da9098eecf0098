"""The CLI's list of bench names is the bench module's (kept twice so parsing stays light)."""

from guestmem import bench, cli


def test_bench_names_match() -> None:
    assert cli.BENCH_NAMES == bench.BENCH_NAMES
    assert set(bench._benches(quick=True)) == set(bench.BENCH_NAMES)
