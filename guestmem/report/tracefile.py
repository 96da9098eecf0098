"""The event trace as Chrome trace-event JSON, which Perfetto (ui.perfetto.dev) and
chrome://tracing load.

Format (the "JSON Array/Object Format" of the Trace Event spec): an object with a
``traceEvents`` list.  Spans are complete events (``ph: "X"``, ``ts`` and ``dur`` in
microseconds), moments are instant events (``ph: "i"``, thread scoped), sampled values are counter
events (``ph: "C"``), and metadata events (``ph: "M"``) name the process and one thread per vCPU
plus one for the VMM's own work.  Every event has ``pid``, ``tid``, ``ts``, ``ph`` and ``name``.
"""

from __future__ import annotations

import json
from typing import Any

from guestmem.vmm.trace import COUNTER, VMM_TID, EventTrace

PID = 1


def _tid(tid: int) -> int:
    """Trace thread ids: 0 for the VMM, vCPU n as n + 1 (Perfetto wants non-negative ids)."""
    return 0 if tid == VMM_TID else tid + 1


def _jsonable(v: object) -> object:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


def trace_events(trace: EventTrace, *, process: str = "guestmem", meta: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "ts": 0, "args": {"name": process}},
    ]
    for tid, name in sorted(trace.thread_names.items()):
        events.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": _tid(tid), "ts": 0,
                       "args": {"name": name}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": _tid(tid), "ts": 0,
                       "args": {"sort_index": _tid(tid)}})
    for e in trace.events():
        ev: dict[str, Any] = {"name": e.name, "cat": e.cat, "pid": PID, "tid": _tid(e.tid),
                              "ts": e.ts_ns / 1000.0,
                              "args": {k: _jsonable(v) for k, v in e.args.items()}}
        if e.cat == COUNTER:
            ev["ph"] = "C"
        elif e.dur_ns is None:
            ev["ph"] = "i"
            ev["s"] = "t"
        else:
            ev["ph"] = "X"
            ev["dur"] = e.dur_ns / 1000.0
        events.append(ev)
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": meta or {}}


def trace_json(trace: EventTrace, *, process: str = "guestmem", meta: dict[str, Any] | None = None) -> str:
    return json.dumps(trace_events(trace, process=process, meta=meta), separators=(",", ":"))
