"""The deterministic scheduler: run a configuration's threads one at a time, switching only at
scheduling points, with a strategy choosing who runs next.

Every model thread is a real ``threading.Thread``, but only one is ever released at a time: a
thread reaching a scheduling point (:func:`guestmem.sync.schedule_point`, any named lock's acquire
or release) parks on its own semaphore and hands control back to the controller, which runs the
oracle and asks the :class:`Chooser` which parked thread goes next.  A thread parked at a lock
acquisition is *enabled* only if the lock is free, so the controller knows when everyone is
blocked (a deadlock) instead of hanging.  With the same choices the same threads pass the same
points with the same model state: a schedule (the list of choices) replays bit for bit.

Every wait has a timeout: a thread that blocks outside the explorer's primitives is reported, and
threads are always joined with timeouts, so a broken run cannot hang the machine.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from guestmem import sync

STEP_TIMEOUT = 10.0  # seconds a released thread may take to reach its next point
JOIN_TIMEOUT = 5.0
MAX_STEPS = 3000  # a schedule longer than this is a livelock


class Abort(BaseException):
    """Unwinds a parked thread when its execution is abandoned (not an Exception, so the model's
    error handling cannot swallow it)."""


@dataclass
class Violation:
    """What the oracle (or a thread) found."""

    kind: str  # "invariant 2", "deadlock", "LockOrderError", "postcondition", ...
    message: str
    step: int
    thread: str | None = None
    trace: str = ""

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "step": self.step, "thread": self.thread}


@dataclass
class Step:
    """One scheduling decision: ``thread`` ran from the point it was parked at (``point``) to its
    next one (``reached``); ``saw`` is the model state after (seq/in_progress), ``info`` what the
    point reported."""

    index: int
    thread: str
    point: str
    info: str
    reached: str
    saw: str
    enabled: tuple[str, ...]
    preemption: bool

    def to_json(self) -> dict[str, object]:
        return {"step": self.index, "thread": self.thread, "point": self.point, "info": self.info,
                "reached": self.reached, "saw": self.saw, "enabled": list(self.enabled),
                "preemption": self.preemption}


class Chooser(Protocol):
    """A strategy's per-execution decision maker."""

    def choose(self, step: int, enabled: list[str], current: str | None, yielding: frozenset[str]) -> str:
        """Pick the next thread among ``enabled`` (names in round-robin order after ``current``,
        which ran the previous step); ``yielding`` are those parked at a yield point."""


@dataclass
class _Thread:
    name: str
    fn: Callable[[], object]
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    point: str = "start"
    ready: Callable[[], bool] | None = None
    info: tuple[object, ...] = ()
    finished: bool = False
    aborting: bool = False
    result: object = None
    error: BaseException | None = None
    error_trace: str = ""
    thread: threading.Thread | None = None


_tls = threading.local()


# What the values a scheduling point reports mean (see the schedule_point calls in the model).
POINT_LABELS = {
    "fault: mmu_seq read": ("gfn", "mmu_seq", "private"),
    "fault: pfn resolved": ("gfn", "end", "mmu_seq"),
    "yield: fault retry": ("gfn",),
    "convert: refcount checked": ("index", "end"),
    "host: access": ("file", "index", "end", "write"),
    "host: pin": ("file", "index", "end"),
}


def format_info(point: str, info: tuple[object, ...]) -> str:
    labels = POINT_LABELS.get(point, ())
    out = []
    for i, v in enumerate(info):
        if isinstance(v, bool) or v is None:
            out.append(str(v))
        elif isinstance(v, int):
            out.append(hex(v) if v > 9 else str(v))
        else:
            out.append(type(v).__name__)
        if i < len(labels):
            out[-1] = f"{labels[i]}={out[-1]}"
    return " ".join(out)


def is_preemption(choice: str, enabled: list[str], current: str | None, yielding: frozenset[str]) -> bool:
    """CHESS's cost of a choice, with its fairness rule: switching away from a running thread that
    could go on costs one preemption, and so does running a thread that waits at a yield point
    while some enabled thread does not (a yielding thread gets the CPU only when no one else
    wants it, so two retrying faults cannot starve the thread that would end their wait)."""
    if choice in yielding and any(t not in yielding for t in enabled):
        return True
    if current is None or current not in enabled or current in yielding:
        return False
    return choice != current


def default_choice(enabled: list[str], current: str | None, yielding: frozenset[str]) -> str:
    """The non-preemptive continuation: the current thread if it may go on, else the first enabled
    thread not waiting at a yield point (``enabled`` comes in round-robin order after the
    current thread), else the first other yielding thread."""
    if current in enabled and current not in yielding:
        return current
    busy = [t for t in enabled if t not in yielding]
    if busy:
        return busy[0]
    others = [t for t in enabled if t != current]
    return others[0] if others else enabled[0]


class Execution:
    """One run of a configuration's threads under a chooser.  ``run`` returns the violation (or
    None); ``steps`` is the numbered interleaving and ``choices`` the schedule that made it."""

    def __init__(self, threads: dict[str, Callable[[], object]], chooser: Chooser,
                 oracle: Callable[[Execution], Violation | None],
                 observe: Callable[[], str] = lambda: "",
                 point_check: Callable[[str, str, tuple[object, ...]], tuple[str, str] | None] | None = None,
                 max_steps: int = MAX_STEPS) -> None:
        self.threads = [_Thread(n, f) for n, f in threads.items()]
        self.by_name = {t.name: t for t in self.threads}
        self.chooser = chooser
        self.oracle = oracle
        self.observe = observe
        self.point_check = point_check
        self.max_steps = max_steps
        self.back = threading.Semaphore(0)
        self.steps: list[Step] = []
        self.choices: list[str] = []
        self.preemptions = 0
        self.violation: Violation | None = None
        self.dead = False

    # --- called on model threads ------------------------------------------------------------------
    def point(self, name: str, ready: Callable[[], bool] | None, info: tuple[object, ...]) -> None:
        t: _Thread | None = getattr(_tls, "thread", None)
        if t is None or getattr(_tls, "execution", None) is not self:
            return  # not a thread of this execution (setup, the oracle, a stray thread)
        if t.aborting:
            if name.startswith("release"):
                return
            raise Abort()
        t.point, t.ready, t.info = name, ready, info
        self.back.release()
        while not t.go.acquire(timeout=1.0):
            if self.dead:
                raise Abort()
        if t.aborting and not name.startswith("release"):
            raise Abort()

    def _body(self, t: _Thread) -> None:
        _tls.thread, _tls.execution = t, self
        try:
            self.point("start", None, ())
            t.result = t.fn()
        except Abort:
            pass
        except BaseException as e:  # every failure of a model thread is a finding
            t.error = e
            t.error_trace = traceback.format_exc()
        finally:
            t.finished = True
            _tls.thread = _tls.execution = None
            self.back.release()

    # --- the controller ---------------------------------------------------------------------------
    def _wait_back(self, who: str) -> bool:
        if self.back.acquire(timeout=STEP_TIMEOUT):
            return True
        self.violation = Violation("hang", f"{who} did not reach a scheduling point within "
                                   f"{STEP_TIMEOUT:.0f} s (blocked outside the explorer's primitives)",
                                   len(self.steps), who)
        return False

    def run(self) -> Violation | None:
        old = sync.set_explorer(self)
        try:
            for t in self.threads:
                t.thread = threading.Thread(target=self._body, args=(t,), name=f"explore-{t.name}",
                                            daemon=True)
                t.thread.start()
                if not self._wait_back(t.name):
                    return self.violation
            self._loop()
        finally:
            self._shutdown()
            sync.set_explorer(old)
        return self.violation

    def _loop(self) -> None:
        current: str | None = None
        while True:
            live = [t for t in self.threads if not t.finished]
            if not live:
                return
            enabled = [t.name for t in live if t.ready is None or t.ready()]
            # Offer the threads in round-robin order after the current one, so that "the first
            # other enabled thread" is the fair successor (two yielding threads must not
            # ping-pong past a third that would end their wait).
            if current is not None:
                k = next((i for i, t in enumerate(self.threads) if t.name == current), 0)
                rank = {t.name: (i - k - 1) % len(self.threads) for i, t in enumerate(self.threads)}
                enabled.sort(key=rank.__getitem__)
            if not enabled:
                self.violation = Violation(
                    "deadlock", "every live thread is blocked: " +
                    ", ".join(f"{t.name} at {t.point!r}" for t in live), len(self.steps))
                return
            if len(self.steps) >= self.max_steps:
                self.violation = Violation("livelock", f"no end after {self.max_steps} steps",
                                           len(self.steps))
                return
            yielding = frozenset(n for n in enabled if self.by_name[n].point.startswith("yield"))
            choice = self.chooser.choose(len(self.steps), enabled, current, yielding)
            if choice not in enabled:
                self.violation = Violation("replay", f"schedule chose {choice!r}, not enabled "
                                           f"({', '.join(enabled)})", len(self.steps))
                return
            pre = is_preemption(choice, enabled, current, yielding)
            self.preemptions += pre
            t = self.by_name[choice]
            point, info = t.point, format_info(t.point, t.info)
            if self.point_check is not None:
                bad = self.point_check(choice, t.point, t.info)
                if bad is not None:
                    self.choices.append(choice)
                    self.steps.append(Step(len(self.steps), choice, point, info, point, self.observe(),
                                           tuple(enabled), pre))
                    self.violation = Violation(bad[0], bad[1], len(self.steps) - 1, choice)
                    return
            self.choices.append(choice)
            t.go.release()
            if not self._wait_back(choice):
                return
            reached = "(done)" if t.finished else t.point
            self.steps.append(Step(len(self.steps), choice, point, info, reached, self.observe(),
                                   tuple(enabled), pre))
            current = choice
            if t.error is not None:
                e = t.error
                kind = type(e).__name__
                msg = str(e)
                if kind == "InvariantError" and msg.startswith("invariant "):
                    kind = " ".join(msg.split()[:2])
                self.violation = Violation(kind, msg or kind, len(self.steps) - 1, choice, t.error_trace)
                return
            v = self.oracle(self)
            if v is not None:
                v.step = len(self.steps) - 1
                self.violation = v
                return

    def _shutdown(self) -> None:
        """Unwind every thread still parked, one at a time, and join them all."""
        for t in self.threads:
            if t.thread is None:
                continue
            if not t.finished:
                t.aborting = True
                t.go.release()
            t.thread.join(JOIN_TIMEOUT)
        self.dead = True
        for t in self.threads:
            if t.thread is not None and t.thread.is_alive():
                t.thread.join(JOIN_TIMEOUT)

    # --- for oracles ------------------------------------------------------------------------------
    def result(self, name: str) -> object:
        return self.by_name[name].result

    def parked(self) -> list[tuple[str, str, tuple[object, ...]]]:
        return [(t.name, t.point, t.info) for t in self.threads if not t.finished]
