"""Named locks with the kernel's lock order, so vCPU threads and host threads can share the model.

Every lock of the model is taken through here: ``slots_lock`` (a mutex per VM),
``filemap_invalidate_lock`` (an rwsem per guest_memfd inode), ``mmu_lock`` (per VM).  Each lock
has a rank; taking a lock of lower-or-equal rank while holding a higher one is a lock-order
violation (the kernel's order is slots_lock -> filemap_invalidate_lock -> mmu_lock) and raises at
once, the way lockdep would splat, instead of deadlocking some day.  Re-entrant acquisition of the
same lock instance is allowed (the model's code paths nest naturally).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

RANK = {"slots_lock": 10, "filemap_invalidate_lock": 20, "mmu_lock": 30, "pool_lock": 40}

_held = threading.local()


def holds_locks() -> bool:
    """Whether this thread holds any named lock (deferred work must wait until it holds none)."""
    return bool(getattr(_held, "stack", None))


class LockOrderError(RuntimeError):
    """Locks were taken against the kernel's documented order."""


def _stack() -> list[NamedLock | RwSem]:
    st = getattr(_held, "stack", None)
    if st is None:
        st = _held.stack = []
    return st


def _check_order(lock: NamedLock | RwSem) -> bool:
    """True if ``lock`` is already held by this thread (re-entry); raise on an order violation."""
    st = _stack()
    if lock in st:
        return True
    for held in st:
        if held.rank >= lock.rank and held is not lock:
            raise LockOrderError(f"taking {lock.name} while holding {held.name}")
    return False


class NamedLock:
    """A re-entrant mutex with a name and a rank."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = RANK[name]
        self._lock = threading.RLock()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        reentry = _check_order(self)
        with self._lock:
            if not reentry:
                _stack().append(self)
            try:
                yield
            finally:
                if not reentry:
                    _stack().remove(self)

    def held(self) -> bool:
        return self in _stack()


class RwSem:
    """A reader/writer semaphore (``read()`` shared, ``write()`` exclusive), writer-preferring.

    A thread holding it (either way) may take it again either way: the inner acquisition is a
    no-op, as the model's nested paths (e.g. punch -> invalidate -> get state) need.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = RANK[name]
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        if _check_order(self):
            yield
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        _stack().append(self)
        try:
            yield
        finally:
            _stack().remove(self)
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        if _check_order(self):
            yield
            return
        me = threading.get_ident()
        with self._cond:
            self._waiting_writers += 1
            while self._writer is not None or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = me
        _stack().append(self)
        try:
            yield
        finally:
            _stack().remove(self)
            with self._cond:
                self._writer = None
                self._cond.notify_all()

    def held(self) -> bool:
        return self in _stack()
