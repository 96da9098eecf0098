"""Run the fuzzer for a time budget, collect distinct findings, shrink each to a reproducer.

Sequence ``i`` of a run with seed ``S`` draws everything (model switches, steps) from
``random.Random(f"{S}:{i}")``, so ``--seed S`` replays the same sequences in the same order and a
finding is reproduced by its seed and sequence number as well as by its script.

A sequence stops at a *fatal* finding (a crash or a broken invariant: the state is no longer
trustworthy); the other categories (accepted-bad, wrong-refusal, state-changed) are counted and the
sequence goes on, so one well-known bug does not hide the ones behind it.  Findings are distinct by
key (category, the call, the rule or exception and its location); the first occurrence of each key
is shrunk (delta debugging over the steps, replayed in a fresh system, keeping a reduction only if
the same key still occurs) within a per-finding time budget.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guestmem.fuzz.machine import Finding, Session, Step, StepGen, draw_options
from guestmem.fuzz.reproducer import render, render_differential

FATAL = ("crash", "hang", "invariant")


@dataclass
class Record:
    """A distinct finding: its first occurrence (shrunk) and how often it was hit."""

    finding: Finding
    opts: dict[str, Any]
    steps: list[Step]
    seed: str
    count: int = 1
    reproducer: str = ""
    shrunk_from: int = 0


@dataclass
class Report:
    sequences: int = 0
    steps: int = 0
    seconds: float = 0.0
    records: dict[tuple[str, ...], Record] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    # Exceptions raised where nobody can catch them (a pin's release at garbage collection):
    # counted, not printed; each also shows up as an ordinary finding when the step runs.
    ignored: Counter[str] = field(default_factory=Counter)

    @property
    def findings(self) -> list[Record]:
        return sorted(self.records.values(), key=lambda r: (-r.count, r.finding.key))

    def summary(self) -> str:
        rate = self.sequences / self.seconds if self.seconds else 0.0
        srate = self.steps / self.seconds if self.seconds else 0.0
        tail = f", {sum(self.ignored.values())} exceptions at release" if self.ignored else ""
        return (f"{self.sequences} sequences, {self.steps} steps, {len(self.records)} findings "
                f"({self.seconds:.1f} s, {rate:.1f} sequences/s, {srate:.0f} steps/s{tail})")

    def groups(self) -> dict[str, list[Record]]:
        """Findings grouped by distinct cause: the integer rule and closed objects are one cause
        each whatever the call; a crash is its exception and location; the rest their key."""
        out: dict[str, list[Record]] = {}
        for r in self.findings:
            k = r.finding.key
            cause = next((c for c in k if isinstance(c, str) and c.startswith(("integer-rule",
                                                                                "closed-object"))), None)
            if r.finding.category == "differs" and cause is not None:
                g = f"differs because of the {cause.split(' (', 1)[0]}"
            elif r.finding.category == "crash" and cause is None:
                g = f"crash: {' '.join(k[1:3]) if k[1] != 'kernel' else ' '.join(k[1:4])}"
            elif cause is not None:
                g = cause.split(" (", 1)[0]
                if r.finding.category == "crash":
                    g += f" -> crash {k[1]} at {k[2]}"
            elif r.finding.category == "differs":
                g = f"differs: {k[1]} (model {k[2]}, kernel {k[3]})"
            else:
                g = f"{r.finding.category}: {' | '.join(str(x) for x in k[1:])}"
            out.setdefault(g, []).append(r)
        return dict(sorted(out.items(), key=lambda kv: -sum(r.count for r in kv[1])))

    def markdown(self, title: str, command: str) -> str:
        """The findings file: one entry per distinct cause, with its shortest reproducer."""
        lines = [f"# {title}", "", f"`{command}`: {self.summary()}", ""]
        for g, recs in self.groups().items():
            n = sum(r.count for r in recs)
            calls = sorted({r.finding.key[1] for r in recs})
            best = min(recs, key=lambda r: (len(r.reproducer.splitlines()), r.finding.key))
            lines += [f"## {g} — {n} hits, {len(recs)} distinct keys", "",
                      f"Calls: {', '.join(f'`{c}`' for c in calls)}", "",
                      f"Example ({best.finding.category}): {best.finding.message}", "",
                      "```python", best.reproducer.rstrip(), "```", ""]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences, "steps": self.steps, "seconds": round(self.seconds, 3),
            "ignored_at_release": dict(self.ignored),
            "coverage": dict(sorted(self.kinds.items())),
            "findings": [{"category": r.finding.category, "key": list(r.finding.key),
                          "message": r.finding.message, "count": r.count, "seed": r.seed,
                          "steps": len(r.steps), "shrunk_from": r.shrunk_from,
                          "reproducer": r.reproducer} for r in self.findings],
        }


def sequence_seed(seed: int, i: int) -> str:
    return f"{seed}:{i}"


def run_sequence(seed: str, max_steps: int, on_finding: Callable[[Finding, Session], bool],
                 gen_factory: Callable[[random.Random], StepGen] = StepGen,
                 session_factory: Callable[[dict[str, Any]], Session] = Session,
                 fatal: tuple[str, ...] = FATAL, coverage: Counter[str] | None = None) -> int:
    """Run one sequence; ``on_finding`` is told about each finding and returns whether to stop.
    Returns the number of steps run; ``coverage`` counts the step kinds that ran, the model
    switches and the VM types created."""
    rng = random.Random(seed)
    opts = draw_options(rng)
    s = session_factory(opts)
    gen = gen_factory(rng)
    n = rng.randint(max(1, max_steps // 4), max_steps)
    done = 0
    for _ in range(n):
        step = gen.next(s)
        f = s.run(step)
        done += 1
        if f is not None and (on_finding(f, s) or f.category in fatal):
            break
    if not any(f.category in fatal for f in [s.last_finding] if f is not None):
        # Release the pins still held, as a VMM's exit would: an unpin that fails is a finding
        # here rather than an exception ignored at garbage collection.
        for p in s.names("p"):
            f = s.run(Step(f"{p}.close(); del {p}", "mapping.unpin", (p,)))
            done += 1
            if f is not None and (on_finding(f, s) or f.category in fatal):
                break
    if coverage is not None:
        coverage.update(st.kind for st in s.ran)
        coverage.update(f"option {k}={v}" for k, v in s.opts.items() if k in (
            "attributes", "inplace_revision", "gmem_folio_order", "anon_folio_order", "tdp_mmu", "smm"))
        coverage.update(f"vm type {vm.vm_type}" for vm in getattr(s.kvm, "vms", ()))
    return done


def replay(opts: dict[str, Any], steps: list[Step], key: tuple[str, ...],
           session_factory: Callable[[dict[str, Any]], Session] = Session,
           fatal: tuple[str, ...] = FATAL) -> Session | None:
    """Run ``steps`` in a fresh system; the session if finding ``key`` occurs (it then stops
    there), else None."""
    s = session_factory(opts)
    for st in steps:
        f = s.run(st)
        if f is not None:
            if f.key == key:
                return s
            if f.category in fatal:
                return None
    return None


def shrink(opts: dict[str, Any], steps: list[Step], key: tuple[str, ...], budget_s: float = 5.0,
           session_factory: Callable[[dict[str, Any]], Session] = Session,
           fatal: tuple[str, ...] = FATAL) -> tuple[list[Step], Session]:
    """Delta debugging: drop chunks of steps (halves, quarters, ..., single steps) while the same
    finding still occurs; stops at a fixpoint or when the time budget is spent."""
    deadline = time.monotonic() + budget_s
    s = replay(opts, steps, key, session_factory, fatal)
    if s is None:  # not reproducible from a fresh start (should not happen: everything is seeded)
        s = session_factory(opts)
        for st in steps:
            s.run(st)
        return steps, s
    cur = list(s.ran)
    best = s
    chunk = max(1, len(cur) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        changed = False
        i = 0
        while i < len(cur) - 1 and time.monotonic() < deadline:  # never drop the failing step
            cand = cur[:i] + cur[i + chunk:]
            if len(cand) < len(cur) and cand and cand[-1] is cur[-1]:
                r = replay(opts, cand, key, session_factory, fatal)
                if r is not None:
                    cur, best, changed = list(r.ran), r, True
                    continue
            i += chunk
        if not changed:
            if chunk == 1:
                break
            chunk //= 2
    return cur, best


def fuzz(seconds: float, seed: int = 0, *, max_steps: int = 60, max_sequences: int | None = None,
         shrink_budget: float = 5.0, gen_factory: Callable[[random.Random], StepGen] = StepGen,
         session_factory: Callable[[dict[str, Any]], Session] = Session,
         progress: Callable[[Report], None] | None = None,
         shrink_only: Callable[[tuple[str, ...]], bool] | None = None,
         fatal: tuple[str, ...] = FATAL, backend: str = "model") -> Report:
    """Run sequences until ``seconds`` have passed (or ``max_sequences`` ran); shrink every
    distinct finding (or those whose key ``shrink_only`` accepts; the others keep their first
    occurrence unshrunk)."""
    rep = Report()
    old_hook = sys.unraisablehook

    def hook(u: Any) -> None:
        rep.ignored[f"{type(u.exc_value).__name__}: {u.exc_value}"[:120]] += 1

    sys.unraisablehook = hook
    try:
        return _fuzz(rep, seconds, seed, max_steps, max_sequences, shrink_budget, gen_factory,
                     session_factory, progress, shrink_only, fatal, backend)
    finally:
        gc.collect()  # release the last sessions while the hook still counts
        sys.unraisablehook = old_hook


def _fuzz(rep: Report, seconds: float, seed: int, max_steps: int, max_sequences: int | None,
          shrink_budget: float, gen_factory: Callable[[random.Random], StepGen],
          session_factory: Callable[[dict[str, Any]], Session],
          progress: Callable[[Report], None] | None,
          shrink_only: Callable[[tuple[str, ...]], bool] | None = None,
          fatal: tuple[str, ...] = FATAL, backend: str = "model") -> Report:
    t0 = time.monotonic()
    deadline = t0 + seconds
    pending: list[tuple[Finding, dict[str, Any], list[Step], str]] = []
    i = 0
    while time.monotonic() < deadline and (max_sequences is None or i < max_sequences):
        seq = sequence_seed(seed, i)

        def on_finding(f: Finding, s: Session, seq: str = seq) -> bool:
            rec = rep.records.get(f.key)
            if rec is not None:
                rec.count += 1
                return False
            rec = Record(f, dict(s.opts), list(s.ran[: f.step + 1]), seq)
            rep.records[f.key] = rec
            pending.append((f, rec.opts, rec.steps, seq))
            return False

        rep.steps += run_sequence(seq, max_steps, on_finding, gen_factory, session_factory, fatal,
                                  rep.kinds)
        rep.sequences += 1
        i += 1
        if progress is not None and i % 100 == 0:
            rep.seconds = time.monotonic() - t0
            progress(rep)
    rep.seconds = time.monotonic() - t0
    for f, opts, steps, seq in pending:
        rec = rep.records[f.key]
        rec.shrunk_from = len(steps)
        budget = shrink_budget if shrink_only is None or shrink_only(f.key) else 0.0
        small, sess = shrink(opts, steps, f.key, budget, session_factory, fatal)
        final = _finding_in(sess, f)
        rec.steps = small
        header = (f"seed {seq} (guestmem fuzz --seed {seq.split(':')[0]}"
                  f"{' --backend kernel' if backend == 'kernel' else ''}); "
                  f"shrunk from {len(steps)} to {len(sess.ran)} steps")
        if backend == "kernel":
            rec.reproducer = render_differential(opts, sess.ran, sess.outcomes, final, header=header)
        else:
            rec.reproducer = render(opts, sess.ran, sess.outcomes, final, header=header)
    return rep


def _finding_in(sess: Session, original: Finding) -> Finding:
    """The finding as it occurred at the end of the shrunk replay (its message may differ)."""
    return getattr(sess, "last_finding", None) or original
