"""Where the guest's memory is: private, shared and double-backed frames, and the stated bound.

The VMM promises **resident ≤ guest size + slack**: with discard working, each guest page has at
most one populated copy (private *or* shared), plus a little slack for pages in transit.  Peer
VMMs break this silently -- no discard at all (alioth), or discard disabled while VFIO is attached
(QEMU) -- and users find out from the host's OOM killer.  Here every sample is checked and a
broken bound is reported: when, by how much, and how much of it is double-backed.

Residency is measured where the backend can tell (``guestmem.vmm.introspect``) and otherwise taken
from the VMM's own upper bound (``guestmem.vmm.state``); each number says which it is.  Full
measurements cost what the number of populated runs costs, so during conversion storms they are
rate limited; where the backend counts frames (the model) the bound is still checked after every
conversion from that count, and its exact high-water mark is checked at the end.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from guestmem import uapi as u
from guestmem.api import Exit
from guestmem.vmm import state as st
from guestmem.vmm.backing import RegionBacking, Strategy
from guestmem.vmm.introspect import Introspection, Runs
from guestmem.vmm.state import PageTracker
from guestmem.vmm.trace import ACCOUNTING, EventTrace

PAGE = u.PAGE_SIZE
MIN_SAMPLE_GAP_NS = 20_000_000  # full measurements after conversions: at most every 20 ms...
# ...and at most this share of the time: a measurement costs O(populated runs), so in a fragmented
# guest one can outlast the 20 ms gap, and a fixed gap would then measure after every conversion
# (the cliff of issue 10).  The gap after a measurement is this many times what it cost.
MEASURE_COST_FACTOR = 50


def _cost_clock() -> int:
    """The clock a measurement's cost is read on: wall time, which is cheap to read (the CPU-time
    clocks are system calls costing microseconds here) and, on a loaded host, errs towards
    measuring less often."""
    return time.perf_counter_ns()
HOST_CHECK_GAP_S = 0.02  # the process's resident set is read at most every 20 ms


class ResidentLimitExceeded(RuntimeError):
    """The VMM process itself holds more than the host bound it was given (``--max-resident``):
    the run stops here rather than let the host's OOM killer end it."""


def process_resident_bytes() -> int:
    """This process's resident set (``/proc/self/statm``), 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class Residency:
    """Pages resident per side (a double-backed page counts on both sides and in ``double``)."""

    private: int
    shared: int
    double: int
    source: str  # "measured", "tracked" or "mixed"

    @property
    def frames(self) -> int:
        return self.private + self.shared


@dataclass(frozen=True)
class RegionResidency:
    """Per-region populated runs, in gfns, for each side."""

    private: Runs
    shared: Runs
    measured_private: bool
    measured_shared: bool


@dataclass(frozen=True)
class BoundViolation:
    ts_ns: int
    at: str  # what had just happened
    resident_pages: int
    limit_pages: int
    double_pages: int

    def describe(self) -> str:
        over = (self.resident_pages - self.limit_pages) * PAGE
        return (f"resident {self.resident_pages * PAGE >> 20} MiB > guest size + slack "
                f"{self.limit_pages * PAGE >> 20} MiB by {over >> 10} KiB after {self.at} "
                f"({self.double_pages * PAGE >> 10} KiB double-backed)")


def _intersect(a: Runs, b: Runs) -> int:
    i = j = n = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            n += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return n


def _count(runs: Runs) -> int:
    return sum(e - s for s, e in runs)


class Accounting:
    """Samples residency, keeps the peak, and checks the bound."""

    def __init__(self, regions: Sequence[RegionBacking], tracker: PageTracker,
                 introspection: Introspection | None, slack_bytes: int, trace: EventTrace) -> None:
        self.regions = list(regions)
        self.tracker = tracker
        self.introspection = introspection  # (a property: also looks up the frame counter)
        self.trace = trace
        self.guest_pages = sum(r.spec.size for r in self.regions) // PAGE
        self.slack_pages = max(0, slack_bytes) // PAGE
        self.limit_pages = self.guest_pages + self.slack_pages
        self.peak = Residency(0, 0, 0, "tracked")
        self.samples = 0
        self.violations: list[BoundViolation] = []
        self._lock = threading.Lock()
        self._last_ns = -MIN_SAMPLE_GAP_NS
        self._next_full_ns = 0  # no run-time full measurement before this (see MEASURE_COST_FACTOR)
        self._measuring = False  # a run-time measurement is under way on some thread
        # The host-side bound: the guest's bound above is about pages, this one about the whole
        # process, which is what the host runs out of.  None = not checked.
        self.host_limit_bytes: int | None = None
        self.host_peak_bytes = 0
        self.host_exceeded: str | None = None  # the first crossing, described
        self._host_last = 0.0

    @property
    def introspection(self) -> Introspection | None:
        return self._introspection

    @introspection.setter
    def introspection(self, intro: Introspection | None) -> None:
        self._introspection = intro
        # The O(1) frame count, looked up once: it is read after every conversion.
        self._frames: Callable[[], tuple[int, int] | None] | None = None
        if intro is not None:
            counter = getattr(intro, "frame_counter", None)  # optional in the protocol
            self._frames = counter() if callable(counter) else intro.frames

    # --- measuring ----------------------------------------------------------------------------------
    def region_residency(self, r: RegionBacking) -> RegionResidency:
        """Populated runs per side for one region, as gfns."""
        base = r.spec.gpa // PAGE
        n = r.spec.size // PAGE
        intro = self.introspection

        def tracked(bit: int) -> Runs:
            return [(s, e) for s, e, v in self.tracker.segments(base, base + n) if v & bit]

        def shift(runs: Runs) -> Runs:
            return [(s + base, e + base) for s, e in runs]

        if r.strategy is Strategy.SEPARATE:
            priv = intro.populated(r.gmem, 0, n) if intro is not None and r.gmem is not None else None
            shared = intro.populated(r.shared, 0, n) if intro is not None else None
            return RegionResidency(shift(priv) if priv is not None else tracked(st.PRIVATE_POP),
                                   shift(shared) if shared is not None else tracked(st.SHARED_POP),
                                   priv is not None, shared is not None)
        # One backing: a populated page counts on the side its attribute names.
        pop = None
        if intro is not None:
            pop = intro.populated(r.gmem, 0, n) if r.gmem is not None else None
            if pop is None:
                pop = intro.populated(r.shared, 0, n)
        runs = shift(pop) if pop is not None else tracked(st.SHARED_POP | st.PRIVATE_POP)
        priv_runs: Runs = []
        shared_runs: Runs = []
        for s, e in runs:
            for a, b, private in self.tracker.kind_runs(s, e):
                (priv_runs if private else shared_runs).append((a, b))
        return RegionResidency(priv_runs, shared_runs, pop is not None, pop is not None)

    def measure(self) -> Residency:
        priv = shared = dbl = 0
        measured: set[bool] = set()
        for r in self.regions:
            rr = self.region_residency(r)
            priv += _count(rr.private)
            shared += _count(rr.shared)
            dbl += _intersect(rr.private, rr.shared)
            measured.update((rr.measured_private, rr.measured_shared))
        source = "measured" if measured == {True} else "tracked" if measured == {False} else "mixed"
        return Residency(priv, shared, dbl, source)

    # --- sampling and the bound ----------------------------------------------------------------------
    def check_host(self, at: str, *, force: bool = False) -> None:
        """Raise :class:`ResidentLimitExceeded` if the process holds more than ``host_limit_bytes``
        (read at most every :data:`HOST_CHECK_GAP_S` unless ``force``)."""
        if self.host_limit_bytes is None:
            return
        t = time.monotonic()
        if not force and t - self._host_last < HOST_CHECK_GAP_S:
            return
        self._host_last = t
        rss = process_resident_bytes()
        self.host_peak_bytes = max(self.host_peak_bytes, rss)
        if rss > self.host_limit_bytes:
            message = (f"the process holds {rss >> 20} MiB resident, more than the "
                       f"{self.host_limit_bytes >> 20} MiB allowed, after {at}")
            if self.host_exceeded is None:
                self.host_exceeded = message
            raise ResidentLimitExceeded(message)

    def check_host_after_exit(self, vid: int, ex: Exit) -> None:
        """:meth:`check_host` after vCPU ``vid``'s exit ``ex`` (a run loop's ``on_exit``): the
        message naming the exit is built only when a check is due, not for every exit."""
        if self.host_limit_bytes is None or time.monotonic() - self._host_last < HOST_CHECK_GAP_S:
            return
        self.check_host(f"a {ex.name} exit of vCPU {vid}")

    def sample(self, at: str, tid: int, *, force: bool = True) -> Residency | None:
        """Measure and check the bound.  With ``force=False`` (after each conversion) a full
        measurement is taken at most every :data:`MIN_SAMPLE_GAP_NS`, and never more often than
        keeps its cost under 1/:data:`MEASURE_COST_FACTOR` of the time, nor while another thread
        is taking one (that thread's figure serves both); where the backend counts frames, the
        bound is still checked every time from that O(1) count.  The process's own resident set
        is checked against ``host_limit_bytes`` too (see :meth:`check_host`)."""
        if not force:  # during the run (a conversion, a discard): stop it there
            self.check_host(at)
        now = self.trace.now()
        if not force and (now < self._next_full_ns or self._measuring):
            frames = self._frames() if self._frames is not None else None
            if frames is None or frames[0] <= self.limit_pages:
                return None  # within the bound; the full picture waits for the next sample
        return self._measure_and_check(now, at, tid, force)

    def after_conversion(self, at: str, tid: int) -> None:
        """``sample(at, tid, force=False)`` for the one-page fault path: the same checks, with the
        common answer ("within the bound, no full measurement due") in a few comparisons."""
        if self.host_limit_bytes is not None:
            self.check_host(at)
        now = self.trace.now()
        if now < self._next_full_ns or self._measuring:
            frames = self._frames
            if frames is None:
                return
            got = frames()
            if got is None or got[0] <= self.limit_pages:
                return
        self._measure_and_check(now, at, tid, False)

    def _measure_and_check(self, now: int, at: str, tid: int, force: bool) -> Residency:
        self._last_ns = now
        if not force:
            self._measuring = True
        try:
            cpu0 = _cost_clock()
            res = self.measure()
            cost = _cost_clock() - cpu0
        finally:
            if not force:
                self._measuring = False
        self._next_full_ns = now + max(MIN_SAMPLE_GAP_NS, MEASURE_COST_FACTOR * cost)
        self.trace.counter("resident pages", tid, private=res.private, shared=res.shared, double=res.double)
        with self._lock:
            self.samples += 1
            if res.frames > self.peak.frames:
                self.peak = res
            if res.frames > self.limit_pages:
                v = BoundViolation(now, at, res.frames, self.limit_pages, res.double)
                first = not self.violations
                self.violations.append(v)
                if first:
                    self.trace.instant(ACCOUNTING, "bound broken", tid, detail=v.describe())
        return res

    def frames_peak(self) -> tuple[int, str]:
        """Peak resident frames: the backend's exact high-water mark where it keeps one, else the
        highest sample."""
        if self.introspection is not None:
            got = self.introspection.frames()
            if got is not None:
                return max(got[1], self.peak.frames), "backend"
        return self.peak.frames, "sampled"

    def finish(self) -> None:
        """Final sample, and a last check of the backend's exact peak against the bound."""
        self.sample("the end of the run", -1)
        peak, source = self.frames_peak()
        if source == "backend" and peak > self.limit_pages and not self.violations:
            self.violations.append(BoundViolation(self.trace.now(), "a transient peak between samples",
                                                  peak, self.limit_pages, 0))

    @property
    def bound_ok(self) -> bool:
        return not self.violations

    def summary(self) -> dict[str, object]:
        now = self.measure()
        peak, peak_source = self.frames_peak()
        return {
            "guest_pages": self.guest_pages,
            "slack_pages": self.slack_pages,
            "limit_pages": self.limit_pages,
            "now": asdict(now),
            "peak_sample": asdict(self.peak),
            "frames_peak": peak,
            "frames_peak_source": peak_source,
            "samples": self.samples,
            "bound_ok": self.bound_ok,
            "violations": len(self.violations),
            "first_violation": self.violations[0].describe() if self.violations else None,
        }
