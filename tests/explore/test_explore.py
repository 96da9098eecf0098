"""The interleaving explorer: the scheduler is deterministic and detects deadlock, DFS proves the
small races clean, every mutant of the museum is found on its race, findings replay step for step,
PCT does not depend on how its schedules are farmed out, and the command's exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from guestmem import sync
from guestmem.cli import main
from guestmem.explore import artefacts, fanout, mutants, races
from guestmem.explore import strategies as st
from guestmem.explore.scheduler import Execution
from guestmem.model.kvm.vm import ModelVm

# --- the scheduler ------------------------------------------------------------------------------


def test_no_explorer_installed_outside_a_run() -> None:
    """The model's hook is a single global check when nobody explores."""
    assert sync._explorer is None
    st.run_schedule(races.BY_ID["fault-vs-attr:sw"], None, st.Follow([]))
    assert sync._explorer is None


def test_all_threads_blocked_is_a_deadlock() -> None:
    def stuck() -> None:
        sync._explorer.point("wait for nothing", lambda: False, ())  # type: ignore[union-attr]

    ex = Execution({"a": stuck, "b": stuck}, st.Follow([]), lambda e: None)
    v = ex.run()
    assert v is not None and v.kind == "deadlock"
    assert all(not t.thread.is_alive() for t in ex.threads if t.thread is not None)


def test_one_thread_at_a_time_in_schedule_order() -> None:
    seen: list[str] = []

    def body(name: str) -> Callable[[], None]:
        def run() -> None:
            for i in range(3):
                seen.append(f"{name}{i}")
                sync.schedule_point("tick")
        return run

    ex = Execution({"a": body("a"), "b": body("b")}, st.Follow(["b", "a", "b", "a", "a"]), lambda e: None)
    assert ex.run() is None
    assert seen == ["b0", "a0", "b1", "a1", "a2", "b2"]


# --- DFS: the small races explore clean ------------------------------------------------------------

CLEAN = [r for r in races.RACES if not r.known and r.small]
LARGE = [r for r in races.RACES if not r.known and not r.small]
KNOWN = [r for r in races.RACES if r.known]


def test_dfs_proves_fault_vs_attr_clean_up_to_two_preemptions() -> None:
    rep = st.explore_dfs(races.BY_ID["fault-vs-attr:sw"], None, 2, st.Budget(5000, None))
    assert rep.found is None
    assert rep.proved_bound == 2 and rep.exhausted
    assert rep.per_bound[0] < rep.per_bound[1] < rep.per_bound[2]


@pytest.mark.parametrize("race", CLEAN, ids=lambda r: r.id)
def test_race_explores_clean_with_one_preemption(race: races.Race) -> None:
    rep = st.explore_dfs(race, None, 1, st.Budget(3000, None))
    assert rep.found is None, rep.found and rep.found.violation
    assert rep.proved_bound == 1


@pytest.mark.parametrize("race", LARGE, ids=lambda r: r.id)
def test_large_race_explores_clean_under_pct(race: races.Race) -> None:
    rep = st.explore_pct(race, None, 0, 3, st.Budget(150, None))
    assert rep.found is None, rep.found and rep.found.violation
    assert rep.schedules == 150


def test_no_race_has_a_recorded_model_finding_left() -> None:
    """The five model findings the explorer made (docs/explore.md) are fixed: no race carries one."""
    assert KNOWN == []


# --- the museum -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_mutant_is_found_shrunk_and_replayed(mutant: mutants.Mutant) -> None:
    race = races.BY_ID[mutant.race]
    rep = st.explore_dfs(race, mutant.name, 2, st.Budget(2000, None))
    assert rep.found is not None and rep.found.violation is not None
    assert not any(k in rep.found.violation.message for k in race.known)
    small = st.shrink(race, mutant.name, rep.found)
    assert small.violation is not None and small.violation.kind == rep.found.violation.kind
    assert small.preemptions <= rep.found.preemptions
    doc = json.loads(json.dumps(artefacts.replay_doc(race.id, mutant.name, small, "dfs")))
    assert artefacts.same_run(doc, st.replay(race, mutant.name, doc["choices"])) is None


def _same_kind(a: races.Race, b: races.Race) -> bool:
    return a.name == b.name and (a.flavour == "sw-gmem") == (b.flavour == "sw-gmem")


@pytest.mark.parametrize(("mutant", "race"), [
    (m, r) for m in mutants.MUTANTS for r in races.RACES
    if r.id != m.race and _same_kind(r, races.BY_ID[m.race])], ids=lambda x: getattr(x, "name", None)
    or getattr(x, "id", ""))
def test_mutant_is_found_on_every_flavour_of_its_race(mutant: mutants.Mutant, race: races.Race) -> None:
    rep = st.explore_dfs(race, mutant.name, 2, st.Budget(2000, None))
    assert rep.found is not None and rep.found.violation is not None


def test_mutants_are_gone_after_use() -> None:
    """A mutant is an explore-only patch: the model is whole again afterwards."""
    before = ModelVm._delete_slot
    with mutants.applied("delete-no-wait"):
        assert ModelVm._delete_slot is not before
    assert ModelVm._delete_slot is before


# --- PCT ------------------------------------------------------------------------------------------

def test_pct_schedule_is_a_pure_function_of_seed_and_index() -> None:
    race = races.BY_ID["overlapping-conversions:sw"]
    length = st.estimate_length(race, None)
    a = st.pct_schedule(race, None, 7, 3, 3, length)
    b = st.pct_schedule(race, None, 7, 3, 3, length)
    assert a.choices == b.choices
    assert [s.to_json() for s in a.steps] == [s.to_json() for s in b.steps]


def test_pct_result_does_not_depend_on_the_number_of_workers() -> None:
    race = races.BY_ID["fault-vs-attr:sw"]
    mutant = "end-before-store"
    length = st.estimate_length(race, mutant)
    reps = []
    for workers in (1, 3):
        fn = fanout.local_mapper(race, mutant, 5, 3, length, workers)
        reps.append(st.explore_pct(race, mutant, 5, 3, st.Budget(60, None), fn, batch=4 * workers))
    assert reps[0].found is not None and reps[1].found is not None
    assert reps[0].found.choices == reps[1].found.choices
    assert reps[0].schedules == reps[1].schedules  # the same first failing index


# --- the command ------------------------------------------------------------------------------------

def test_cli_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", "--list"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == len(races.RACES)
    assert main(["explore", "--mutants"]) == 0
    out = capsys.readouterr().out
    assert all(m.name in out for m in mutants.MUTANTS)
    assert len(mutants.MUTANTS) >= 8


@pytest.mark.parametrize("argv", [
    ["explore", "no-such-race"],
    ["explore", "--mutant", "no-such-mutant"],
    ["explore", "--preemptions", "-1"],
    ["explore", "--seconds", "0"],
    ["explore", "--strategy", "bfs"],
    ["explore", "--address", "ray://x:1"],
    ["explore", "--seconds", "1", "--schedules", "3"],
])
def test_cli_bad_input_exits_2(argv: list[str]) -> None:
    assert main(argv) == 2


def test_cli_bad_replay_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{\"format\": \"something else\"}")
    assert main(["explore", "--replay", str(bad)]) == 2
    assert main(["explore", "--replay", str(tmp_path / "missing.json")]) == 2


def test_cli_clean_race_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", "prefault-vs-convert:sw", "--preemptions", "1"]) == 0
    assert "no violation with <= 1 preemptions" in capsys.readouterr().out


def test_cli_mutant_finding_then_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.json"
    assert main(["explore", "--mutant", "no-seq-recheck", "--out", str(tmp_path), "--trace", str(trace),
                 "--json"]) == 1
    report = json.loads(capsys.readouterr().out)[0]
    assert report["replayed_identically"] and report["shrunk_preemptions"] == 1
    path = Path(report["replay_file"])
    doc = json.loads(path.read_text())
    assert doc["mutant"] == "no-seq-recheck" and doc["violation"]["kind"] == "invariant 2"
    events = json.loads(trace.read_text())["traceEvents"]
    threads = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert threads == {"vcpu", "convert"}
    assert any(e["ph"] == "i" and e["cat"] == "violation" for e in events)
    assert main(["explore", "--replay", str(path)]) == 1
    assert "replayed identically" in capsys.readouterr().out


def test_cli_workers_without_ray_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        assert main(["explore", "fault-vs-attr:sw", "--strategy", "pct", "--workers", "2",
                     "--schedules", "2"]) == 2
        assert "pip install" in capsys.readouterr().err
    else:
        pytest.skip("Ray is installed")


def test_ray_workers_give_the_in_process_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With Ray installed (the [explore] extra): 1 and 2 workers find what in-process PCT finds."""
    pytest.importorskip("ray")
    answers = []
    for workers in ([], ["--workers", "1"], ["--workers", "2"]):
        assert main(["explore", "fault-vs-attr:sw", "--mutant", "end-before-store", "--strategy", "pct",
                     "--schedules", "200", "--seed", "5", "--json", "--out", str(tmp_path), *workers]) == 1
        r = json.loads(capsys.readouterr().out)[0]
        answers.append((r["schedules"], r["violation"], r["shrunk_preemptions"]))
    assert answers[0] == answers[1] == answers[2]


def test_hugepage_alloc_vs_convert_clean_with_two_preemptions() -> None:
    """The conversion's invalidation must cover the whole folio it splits: at 2 preemptions a
    fault that resolved the folio whole used to map it huge after the split (invariant 3)."""
    rep = st.explore_dfs(races.BY_ID["hugepage-alloc-vs-convert:sw-gmem"], None, 2, st.Budget(5000, None))
    assert rep.found is None, rep.found and rep.found.violation
    assert rep.proved_bound == 2 and rep.exhausted
