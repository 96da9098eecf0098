"""A watchdog that interrupts ``KVM_RUN`` when a guest does not exit in time.

Why: a guest that never exits (a loop, or — on ``kvm_pvm`` — a ``vmcall`` the emulator re-executes
forever) would block ``KVM_RUN``, and with it a test run or the CLI, indefinitely.  One daemon thread
keeps the deadlines of all running vCPUs.  When one passes it sets ``kvm_run.immediate_exit`` (so a
vCPU that has not entered the guest yet returns at once) and sends ``WATCHDOG_SIGNAL`` to the vCPU's
thread, which makes ``KVM_RUN`` return ``EINTR`` with ``exit_reason == KVM_EXIT_INTR``.

A Python-level no-op handler for ``WATCHDOG_SIGNAL`` must exist for the signal to be harmless; it can
only be installed from the main thread, so :func:`ensure_handler` is called when a vCPU is created
or run there.  Without the handler (first use from another thread) runs simply have no watchdog.
"""

from __future__ import annotations

import contextlib
import heapq
import signal
import threading
import time
from collections.abc import Callable, Iterator

WATCHDOG_SIGNAL = signal.SIGRTMIN + 3  # type: ignore[attr-defined]

_lock = threading.Condition()
_heap: list[tuple[float, int, Callable[[], None]]] = []
_cancelled: set[int] = set()
_next_id = 0
_thread: threading.Thread | None = None
_handler_installed = False


def ensure_handler() -> bool:
    """Install the no-op handler if possible (main thread only); True when it is installed."""
    global _handler_installed
    if _handler_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(WATCHDOG_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(WATCHDOG_SIGNAL, lambda *_: None)
    _handler_installed = True
    return True


def _loop() -> None:
    while True:
        with _lock:
            while not _heap:
                _lock.wait()
            deadline, ident, fire = _heap[0]
            if ident in _cancelled:
                heapq.heappop(_heap)
                _cancelled.discard(ident)
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                _lock.wait(delay)
                continue
            heapq.heappop(_heap)
        fire()


def _arm(timeout: float, fire: Callable[[], None]) -> int:
    global _next_id, _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_loop, name="guestmem-kvm-watchdog", daemon=True)
            _thread.start()
        _next_id += 1
        heapq.heappush(_heap, (time.monotonic() + timeout, _next_id, fire))
        _lock.notify()
        return _next_id


def _disarm(ident: int) -> None:
    with _lock:
        if any(entry[1] == ident for entry in _heap):
            _cancelled.add(ident)


@contextlib.contextmanager
def armed(timeout: float | None, kick: Callable[[], None]) -> Iterator[list[bool]]:
    """While the block runs, call ``kick`` (from the watchdog thread) if ``timeout`` seconds pass.

    Yields a one-element list that is ``[True]`` once the watchdog fired.
    """
    fired = [False]
    if timeout is None or not ensure_handler():
        yield fired
        return
    target = threading.get_ident()
    active = [True]

    def fire() -> None:
        if not active[0]:
            return
        fired[0] = True
        kick()
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pthread_kill(target, WATCHDOG_SIGNAL)

    ident = _arm(timeout, fire)
    try:
        yield fired
    finally:
        active[0] = False
        _disarm(ident)
