"""The VMM's event trace: what happened, on which thread, when, and for how long.

Every vCPU exit, memory fault, conversion, discard (the host-side invalidations the VMM causes),
IOMMU map/unmap and host action is recorded here with a monotonic timestamp and the vCPU it ran
on (``tid`` = vCPU id; the VMM's own setup work uses :data:`VMM_TID`).  The report layer turns it
into Chrome/Perfetto trace-event JSON; tests read it directly.  Recording is thread safe and cheap
(one list append under a lock); a disabled trace records nothing and costs next to nothing: callers
on hot paths test :attr:`EventTrace.enabled` before formatting arguments.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

VMM_TID = -1  # events not caused by a vCPU thread (setup, phase barriers)

# Categories (the trace-event "cat" field).
EXIT = "exit"
FAULT = "fault"
CONVERSION = "conversion"
INVALIDATION = "invalidation"
PREFAULT = "prefault"
HOST = "host"
GUEST = "guest"
PHASE = "phase"
ACCOUNTING = "accounting"
WARNING = "warning"
COUNTER = "counter"  # a sampled value (``args`` are the series), e.g. resident frames


@dataclass(frozen=True)
class Event:
    """One event: an instant (``dur_ns`` None) or a complete span."""

    cat: str
    name: str
    tid: int
    ts_ns: int  # since the trace started
    dur_ns: int | None = None
    args: dict[str, Any] = field(default_factory=dict)


class _Span:
    """An open span (a class rather than a ``contextlib`` generator: it is on the fault path)."""

    __slots__ = ("_args", "_cat", "_name", "_start", "_tid", "_trace")

    def __init__(self, trace: EventTrace, cat: str, name: str, tid: int, args: dict[str, Any]) -> None:
        self._trace, self._cat, self._name, self._tid, self._args = trace, cat, name, tid, args

    def __enter__(self) -> dict[str, Any]:
        self._start = self._trace.now()
        return self._args

    def __exit__(self, *exc: object) -> None:
        self._trace.complete(self._cat, self._name, self._tid, self._start, **self._args)


class _NullSpan:
    """The span of a disabled trace; the args dict it gives is a fresh throwaway."""

    __slots__ = ()

    def __enter__(self) -> dict[str, Any]:
        return {}

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SPAN = _NullSpan()


class EventTrace:
    """A thread-safe, append-only list of :class:`Event`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._t0 = time.perf_counter_ns()
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self.thread_names: dict[int, str] = {VMM_TID: "vmm"}

    def now(self) -> int:
        return time.perf_counter_ns() - self._t0

    def instant(self, cat: str, name: str, tid: int, **args: Any) -> None:
        if self.enabled:
            ev = Event(cat, name, tid, self.now(), None, args)
            with self._lock:
                self._events.append(ev)

    def complete(self, cat: str, name: str, tid: int, start_ns: int, **args: Any) -> None:
        """Record a span that began at ``start_ns`` (from :meth:`now`) and ends now."""
        if self.enabled:
            ev = Event(cat, name, tid, start_ns, max(0, self.now() - start_ns), args)
            with self._lock:
                self._events.append(ev)

    def counter(self, name: str, tid: int, **values: int | float) -> None:
        """Record sampled values (one series per keyword) at this moment."""
        if self.enabled:
            ev = Event(COUNTER, name, tid, self.now(), None, dict(values))
            with self._lock:
                self._events.append(ev)

    def span(self, cat: str, name: str, tid: int, **args: Any) -> _Span | _NullSpan:
        """Record a span around the block; the dict ``with`` gives may gain args while it runs.
        A disabled trace hands out one shared do-nothing span: no clock read, no record."""
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, cat, name, tid, args)

    def name_thread(self, tid: int, name: str) -> None:
        self.thread_names[tid] = name

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def counts(self) -> Counter[str]:
        """Events per ``cat/name``."""
        return Counter(f"{e.cat}/{e.name}" for e in self.events())

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
