"""One thread per vCPU, and a run that always ends.

Each vCPU thread loops ``run()`` -> handle the exit, until its guest halts or the run is stopped.
Whatever goes wrong on one thread -- a guest assertion, an exit the VMM cannot resolve, an
exception in a host action or in the backend -- is caught there, recorded with the vCPU and the
reason, and stops the whole run: the stop flag is set and the ``on_stop`` callbacks run (a
scenario breaks its barriers with them), so no other thread waits forever.  The caller waits at
most ``timeout_s``; a thread still busy after the grace period is reported as stuck instead of
hanging the process (the threads are daemons).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from guestmem.api import Exit, ExitHypercall, ExitMemoryFault, ExitSync, Vcpu
from guestmem.vmm.exits import CONTINUE, Action, ExitHandler
from guestmem.vmm.trace import EXIT, GUEST, EventTrace

Status = Literal["halted", "failed", "stopped", "stuck"]
STOP_GRACE_S = 10.0


@dataclass
class VcpuResult:
    vcpu: int
    status: Status = "stopped"
    exits: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    detail: str | None = None  # traceback tail for exceptions


@dataclass
class RunResult:
    vcpus: list[VcpuResult]
    wall_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(v.status == "halted" for v in self.vcpus)

    @property
    def error(self) -> str | None:
        """The first failure, in a form that names the vCPU."""
        for v in self.vcpus:
            if v.status == "failed":
                return f"vCPU {v.vcpu}: {v.error}"
        for v in self.vcpus:
            if v.status == "stuck":
                return f"vCPU {v.vcpu}: {v.error}"
        if self.timed_out:
            return "the run timed out"
        return None

    @property
    def exits(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for v in self.vcpus:
            total.update(v.exits)
        return total


_EXIT_NAME = Exit.name  # the property every exit class inherits: its name follows from its class
_names: dict[type, str] = {}  # exit class -> name (one dict lookup per exit instead of a property call)


def _exit_args(ex: Exit) -> dict[str, object]:
    if isinstance(ex, ExitMemoryFault):
        return {"gpa": hex(ex.gpa), "size": ex.size, "private": ex.private}
    if isinstance(ex, ExitHypercall):
        return {"nr": ex.nr, "gpa": hex(ex.args[0]), "npages": ex.args[1], "attrs": hex(ex.args[2])}
    if isinstance(ex, ExitSync):
        return {"value": ex.value}
    return {}


def run_vcpus(vcpus: Mapping[int, Vcpu], handler: ExitHandler, trace: EventTrace, *,
              timeout_s: float = 600.0, on_stop: list[Callable[[], None]] | None = None,
              on_exit: Callable[[int, Exit], None] | None = None, grace_s: float = STOP_GRACE_S
              ) -> RunResult:
    """Run every vCPU on its own thread until all halt, one fails, or ``timeout_s`` passes."""
    stop = threading.Event()
    results = {vid: VcpuResult(vid) for vid in vcpus}
    stop_callbacks = list(on_stop or [])
    stop_lock = threading.Lock()

    def request_stop() -> None:
        with stop_lock:
            if stop.is_set():
                return
            stop.set()
        for cb in stop_callbacks:
            try:
                cb()
            except Exception:  # a failing stop hook must not mask the first failure
                continue

    def body(vid: int, vcpu: Vcpu) -> None:
        res = results[vid]
        exits = res.exits
        handle = handler.handle
        try:
            tracing = trace.enabled  # fixed for the run: no argument formatting when off
            while not stop.is_set():
                t0 = trace.now() if tracing else 0
                ex = vcpu.run()
                cls = ex.__class__
                name = _names.get(cls)
                if name is None:
                    name = ex.name
                    if cls.name is _EXIT_NAME:  # the name is the class's: remember it
                        _names[cls] = name
                exits[name] += 1
                if tracing:
                    trace.complete(GUEST, "guest", vid, t0)
                    trace.instant(EXIT, ex.name, vid, **_exit_args(ex))
                if on_exit is not None:
                    on_exit(vid, ex)
                verdict = handle(vid, vcpu, ex)
                if verdict is CONTINUE:  # the shared verdict of every exit that keeps running
                    continue
                if verdict.action is Action.HALT:
                    res.status = "halted"
                    return
                if verdict.action is Action.FAIL:
                    res.status, res.error = "failed", verdict.reason
                    request_stop()
                    return
            res.status = "stopped"
        except BaseException as exc:  # the thread must report, whatever it was
            if stop.is_set():
                # Another vCPU failed first and broke the barriers this one waited on.
                res.status = "stopped"
                res.error = f"stopped after another vCPU failed ({type(exc).__name__})"
                return
            res.status = "failed"
            res.error = f"{type(exc).__name__}: {exc}"
            res.detail = "".join(traceback.format_exception(exc)[-6:])
            request_stop()

    threads = []
    for vid, vcpu in vcpus.items():
        trace.name_thread(vid, f"vCPU {vid}")
        t = threading.Thread(target=body, args=(vid, vcpu), name=f"vcpu{vid}", daemon=True)
        threads.append((vid, t))
    start = time.monotonic()
    for _, t in threads:
        t.start()
    deadline = start + timeout_s
    timed_out = False
    for _, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            timed_out = True
            break
    if timed_out:
        request_stop()
        grace = time.monotonic() + grace_s
        for _, t in threads:
            t.join(max(0.0, grace - time.monotonic()))
    for vid, t in threads:
        if t.is_alive():
            results[vid].status = "stuck"
            results[vid].error = (f"did not stop within {timeout_s:g}s + {grace_s:g}s grace "
                                  "(still inside KVM_RUN or a host action)")
    wall = time.monotonic() - start
    return RunResult([results[vid] for vid in vcpus], wall, timed_out)
