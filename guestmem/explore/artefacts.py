"""Findings as artefacts: the numbered interleaving, the replay file, the Perfetto trace.

The replay file (JSON) holds the race, the mutant, the schedule (thread chosen at each step) and
the steps it produced; ``guestmem explore --replay FILE`` runs the schedule again and checks that
every step comes out identical.  The trace is Chrome trace-event JSON written by
:mod:`guestmem.report.tracefile`, one track per model thread, one slice per step (a step is one
unit of time, since a schedule has no wall clock), the violation as an instant on its thread.
"""

from __future__ import annotations

import json
from typing import Any

from guestmem.explore.scheduler import Violation
from guestmem.explore.strategies import Outcome
from guestmem.report.tracefile import trace_json
from guestmem.vmm.trace import VMM_TID, EventTrace

FORMAT = "guestmem-explore-replay/1"
STEP_NS = 1000


def interleaving(out: Outcome) -> list[str]:
    """The schedule as numbered lines: step, thread, the point it passed (and what it saw there),
    the point it stopped at, the model state after; ``*`` marks a preemption."""
    lines = []
    width = max((len(s.thread) for s in out.steps), default=6)
    for s in out.steps:
        mark = "*" if s.preemption else " "
        info = f" [{s.info}]" if s.info else ""
        lines.append(f"{s.index:4d}{mark} {s.thread:<{width}}  {s.point}{info} -> {s.reached}   ({s.saw})")
    v = out.violation
    if v is not None:
        lines.append(f"      !! {v.kind}: {v.message}" + (f" (thread {v.thread})" if v.thread else ""))
    return lines


def replay_doc(race: str, mutant: str | None, out: Outcome, strategy: str) -> dict[str, Any]:
    return {"format": FORMAT, "race": race, "mutant": mutant, "strategy": strategy,
            "preemptions": out.preemptions, "choices": list(out.choices),
            "violation": None if out.violation is None else out.violation.to_json(),
            "steps": [s.to_json() for s in out.steps]}


def load_replay(text: str) -> dict[str, Any]:
    """Parse and validate a replay file; ValueError on anything malformed."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if not isinstance(doc.get("race"), str) or not isinstance(doc.get("choices"), list) or not all(
            isinstance(c, str) for c in doc["choices"]):
        raise ValueError("race and choices are required")
    if doc.get("mutant") is not None and not isinstance(doc["mutant"], str):
        raise ValueError("mutant must be a name or null")
    return doc


def same_run(doc: dict[str, Any], out: Outcome) -> str | None:
    """None if ``out`` reproduces the recorded run step for step, else where it diverged."""
    steps = [s.to_json() for s in out.steps]
    recorded = doc.get("steps", [])
    for i, (a, b) in enumerate(zip(recorded, steps, strict=False)):
        if a != b:
            return f"step {i} differs: recorded {a}, got {b}"
    if len(recorded) != len(steps):
        return f"recorded {len(recorded)} steps, got {len(steps)}"
    got = None if out.violation is None else out.violation.to_json()
    if doc.get("violation") != got:
        return f"violation differs: recorded {doc.get('violation')}, got {got}"
    return None


class _StepClock(EventTrace):
    """An event trace whose clock is the step counter."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0
        del self.thread_names[VMM_TID]

    def now(self) -> int:
        return self.clock


def perfetto(race: str, mutant: str | None, out: Outcome) -> str:
    """Chrome trace-event JSON for the schedule: a track per thread, a slice per step."""
    tr = _StepClock()
    tids: dict[str, int] = {}
    for s in out.steps:
        tids.setdefault(s.thread, len(tids))
    for name, tid in tids.items():
        tr.name_thread(tid, name)
    for s in out.steps:
        tr.clock = (s.index + 1) * STEP_NS
        tr.complete("preemption" if s.preemption else "step", s.point, tids[s.thread],
                    s.index * STEP_NS, step=s.index, info=s.info, reached=s.reached, saw=s.saw,
                    preemption=s.preemption)
    v: Violation | None = out.violation
    if v is not None:
        tr.clock = len(out.steps) * STEP_NS
        tid = tids.get(v.thread or "", tids[out.steps[-1].thread] if out.steps else 0)
        tr.instant("violation", v.kind, tid, message=v.message)
    return trace_json(tr, process=f"guestmem explore {race}" + (f" --mutant {mutant}" if mutant else ""),
                      meta={"race": race, "mutant": mutant, "choices": out.choices})
