"""Running schedules and searching for bad ones: DFS with iterative preemption bounding (CHESS),
PCT randomized scheduling, replay, and shrinking a failing schedule to the fewest preemptions.

A schedule is the list of thread names chosen at each step.  Every execution is *stateless*: the
configuration is rebuilt from scratch and the threads are driven by a chooser that follows a
prefix of choices and then continues non-preemptively, so the same schedule always reproduces the
same run.

* DFS (Musuvathi and Qadeer, "Iterative context bounding for systematic testing of multithreaded
  programs", PLDI 2007): for k = 0, 1, ..., K, every schedule with at most k preemptions, depth
  first.  A preemption is switching away from a thread that could go on (or, for fairness, keeping
  a thread that yields while another could run).  When DFS finishes bound K with no violation,
  that is a proof for the configuration: no bug is reachable with <= K preemptions.
* PCT (Burckhardt et al., "A randomized scheduler with probabilistic guarantees of finding bugs",
  ASPLOS 2010): random distinct thread priorities, d-1 random priority-change points over the
  estimated schedule length; the highest-priority enabled thread always runs.  Schedule i of seed s
  draws from ``Random(f"{s}/{i}")``, so results do not depend on how schedules are farmed out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from guestmem.explore import mutants as mutants_mod
from guestmem.explore import oracle
from guestmem.explore.races import Race
from guestmem.explore.scheduler import Execution, Step, Violation, default_choice, is_preemption


@dataclass
class Outcome:
    """One executed schedule."""

    choices: list[str]
    steps: list[Step]
    violation: Violation | None
    preemptions: int
    results: dict[str, object]
    log: list[tuple[tuple[str, ...], str | None, frozenset[str], str]] = field(default_factory=list)


class Follow:
    """Follow ``prefix`` (strictly, or ``soft``: skip a suggestion that is not enabled), then
    continue non-preemptively; log every decision for the DFS to branch from."""

    def __init__(self, prefix: list[str], soft: bool = False) -> None:
        self.prefix = prefix
        self.soft = soft
        self.log: list[tuple[tuple[str, ...], str | None, frozenset[str], str]] = []

    def choose(self, step: int, enabled: list[str], current: str | None, yielding: frozenset[str]) -> str:
        if step < len(self.prefix) and (not self.soft or self.prefix[step] in enabled):
            c = self.prefix[step]
        else:
            c = default_choice(enabled, current, yielding)
        self.log.append((tuple(enabled), current, yielding, c))
        return c


class Pct:
    """PCT with depth ``depth`` over an estimated ``length`` steps."""

    def __init__(self, rng: random.Random, names: list[str], depth: int, length: int) -> None:
        values = list(range(depth, depth + len(names)))
        rng.shuffle(values)
        self.prio = dict(zip(names, values, strict=True))
        points = rng.sample(range(1, max(length, depth)), min(depth - 1, max(length, depth) - 1))
        self.change = {p: depth - 1 - i for i, p in enumerate(points)}
        self.log: list[tuple[tuple[str, ...], str | None, frozenset[str], str]] = []

    def choose(self, step: int, enabled: list[str], current: str | None, yielding: frozenset[str]) -> str:
        if current is not None:
            if step in self.change:
                self.prio[current] = self.change[step]
            if current in yielding:
                self.prio[current] = min(self.prio.values()) - 1
        c = max(enabled, key=lambda t: self.prio[t])
        self.log.append((tuple(enabled), current, yielding, c))
        return c


def run_schedule(race: Race, mutant: str | None, chooser: Follow | Pct) -> Outcome:
    """Build the race's configuration afresh and run it under ``chooser`` with the oracle."""
    with mutants_mod.applied(mutant):
        world = race.build(race.flavour)
        ex = Execution(world.threads, chooser, lambda e: oracle.step(world, e),
                       observe=lambda: oracle.observe(world), point_check=oracle.point_check)
        try:
            v = ex.run()
            results = {t.name: t.result for t in ex.threads}
            if v is None:
                v = oracle.final(world, results)
                if v is not None:
                    v.step = len(ex.steps)
        finally:
            if not any(t.thread is not None and t.thread.is_alive() for t in ex.threads):
                world.close()
    return Outcome(ex.choices, ex.steps, v, ex.preemptions, results, chooser.log)


@dataclass
class Report:
    """What a search did: schedules run, the bound proved (DFS), the first violation found."""

    race: str
    mutant: str | None
    strategy: str
    schedules: int = 0
    seconds: float = 0.0
    proved_bound: int | None = None  # DFS: every schedule with <= this many preemptions explored
    exhausted: bool = False
    found: Outcome | None = None
    per_bound: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"race": self.race, "mutant": self.mutant, "strategy": self.strategy,
                "schedules": self.schedules, "seconds": round(self.seconds, 3),
                "schedules_per_second": round(self.schedules / self.seconds, 1) if self.seconds else None,
                "proved_bound": self.proved_bound, "exhausted": self.exhausted,
                "schedules_per_bound": self.per_bound,
                "violation": None if self.found is None or self.found.violation is None
                else self.found.violation.to_json()}


class Budget:
    def __init__(self, schedules: int | None, seconds: float | None) -> None:
        self.schedules, self.seconds = schedules, seconds
        self.t0 = time.monotonic()
        self.used = 0

    def spent(self) -> bool:
        if self.schedules is not None and self.used >= self.schedules:
            return True
        return self.seconds is not None and time.monotonic() - self.t0 >= self.seconds


def dfs_bound(run: Callable[[list[str]], Outcome], bound: int) -> Iterator[Outcome]:
    """Every schedule with <= ``bound`` preemptions, depth first (stateless re-execution)."""
    prefix: list[str] = []
    done: list[set[str]] = []
    while True:
        out = run(prefix)
        yield out
        log = out.log
        done = done[:len(prefix)] + [{c} for _, _, _, c in log[len(prefix):]]
        cost = [0]
        for enabled, cur, y, c in log:
            cost.append(cost[-1] + is_preemption(c, list(enabled), cur, y))
        for i in range(len(log) - 1, -1, -1):
            enabled, cur, y, _ = log[i]
            alt = next((a for a in enabled if a not in done[i]
                        and cost[i] + is_preemption(a, list(enabled), cur, y) <= bound), None)
            if alt is not None:
                done[i].add(alt)
                done = done[:i + 1]
                prefix = [c for _, _, _, c in log[:i]] + [alt]
                break
        else:
            return


def counts(race: Race, mutant: str | None, out: Outcome, skip_known: bool = False) -> bool:
    """Does this outcome's violation count as found?  With a mutant applied (or ``skip_known``),
    the race's known model findings are skipped, so that the search reports something new."""
    v = out.violation
    if v is None:
        return False
    return not (mutant is not None or skip_known) or not any(k in v.message for k in race.known)


def explore_dfs(race: Race, mutant: str | None, max_preemptions: int, budget: Budget,
                skip_known: bool = False) -> Report:
    rep = Report(race.id, mutant, "dfs")
    t0 = time.monotonic()
    for k in range(max_preemptions + 1):
        n = 0
        finished = True
        for out in dfs_bound(lambda p: run_schedule(race, mutant, Follow(p)), k):
            n += 1
            budget.used += 1
            if counts(race, mutant, out, skip_known):
                rep.found = out
                break
            if budget.spent():
                finished = False
                break
        rep.per_bound[k] = n
        rep.schedules += n
        if rep.found is not None or not finished:
            break
        rep.proved_bound = k
    rep.exhausted = rep.proved_bound == max_preemptions
    rep.seconds = time.monotonic() - t0
    return rep


def pct_schedule(race: Race, mutant: str | None, seed: int, index: int, depth: int, length: int) -> Outcome:
    """Schedule ``index`` of PCT seed ``seed``: a pure function of its arguments."""
    names = _names(race)
    rng = random.Random(f"{seed}/{index}")
    return run_schedule(race, mutant, Pct(rng, names, depth, length))


_NAMES: dict[str, list[str]] = {}
_LENGTHS: dict[tuple[str, str | None], int] = {}


def _names(race: Race) -> list[str]:
    if race.id not in _NAMES:
        w = race.build(race.flavour)
        _NAMES[race.id] = list(w.threads)
        w.close()
    return _NAMES[race.id]


def estimate_length(race: Race, mutant: str | None) -> int:
    """PCT's k: the length of the non-preemptive schedule, doubled for slack."""
    key = (race.id, mutant)
    if key not in _LENGTHS:
        _LENGTHS[key] = 2 * max(2, len(run_schedule(race, mutant, Follow([])).steps))
    return _LENGTHS[key]


def explore_pct(race: Race, mutant: str | None, seed: int, depth: int, budget: Budget,
                map_fn: Callable[[list[int]], list[Outcome]] | None = None, batch: int = 1,
                skip_known: bool = False) -> Report:
    """PCT schedules 0, 1, ... until the budget is spent or one fails; with ``map_fn`` (Ray) the
    schedules run in batches, and the first failing index wins, so the result is the same for any
    number of workers."""
    rep = Report(race.id, mutant, "pct")
    t0 = time.monotonic()
    length = estimate_length(race, mutant)
    index = 0
    while not budget.spent():
        n = batch
        if budget.schedules is not None:
            n = min(n, budget.schedules - budget.used)
        idxs = list(range(index, index + n))
        outs = map_fn(idxs) if map_fn is not None else [pct_schedule(race, mutant, seed, i, depth, length)
                                                         for i in idxs]
        for out in outs:
            rep.schedules += 1
            budget.used += 1
            if counts(race, mutant, out, skip_known):
                rep.found = out
                break
        index += n
        if rep.found is not None:
            break
    rep.seconds = time.monotonic() - t0
    return rep


def replay(race: Race, mutant: str | None, choices: list[str]) -> Outcome:
    return run_schedule(race, mutant, Follow(choices))


def shrink(race: Race, mutant: str | None, failing: Outcome, max_runs: int = 200) -> Outcome:
    """Fewer preemptions for the same kind of violation: drop one preemption at a time (the
    choice there becomes the non-preemptive one, later choices are followed where still possible)
    while the violation stays; then keep only the prefix up to the last preemption."""
    assert failing.violation is not None
    kind = failing.violation.kind
    best = failing
    runs = 0
    improved = True
    while improved and best.preemptions and runs < max_runs:
        improved = False
        pre = [s.index for s in best.steps if s.preemption]
        for i in pre:
            log = best.log
            enabled, cur, y, _ = log[i]
            alt = default_choice(list(enabled), cur, y)
            variant = [*best.choices[:i], alt, *best.choices[i + 1:]]
            cand = run_schedule(race, mutant, Follow(variant, soft=True))
            runs += 1
            if (cand.violation is not None and cand.violation.kind == kind
                    and cand.preemptions < best.preemptions):
                best = cand
                improved = True
                break
    # Canonical form: the prefix up to the last preemption, followed strictly, then defaults.
    last = max((s.index for s in best.steps if s.preemption), default=-1)
    cand = run_schedule(race, mutant, Follow(best.choices[:last + 1]))
    if cand.violation is not None and cand.violation.kind == kind:
        best = cand
    return best
