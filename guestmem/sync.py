"""Named locks with the kernel's lock order, so vCPU threads and host threads can share the model.

Every lock of the model is taken through here: ``slots_lock`` (a mutex per VM),
``filemap_invalidate_lock`` (an rwsem per guest_memfd inode), ``mmu_lock`` (per VM).  Each lock
has a rank; taking a lock of lower-or-equal rank while holding a higher one is a lock-order
violation (the kernel's order is slots_lock -> filemap_invalidate_lock -> mmu_lock) and raises at
once, the way lockdep would splat, instead of deadlocking some day.  Re-entrant acquisition of the
same lock instance is allowed (the model's code paths nest naturally).

Scheduling points.  :mod:`guestmem.explore` runs the model's threads one at a time under a
controller and switches only at scheduling points: every acquisition and release of a lock here,
and the explicit :func:`schedule_point` calls the model makes where upstream has a window (between
reading ``mmu_invalidate_seq`` and taking ``mmu_lock``, ...).  The controller is installed with
:func:`set_explorer`; when none is installed a point costs one global check, and nothing in the
model imports the explorer (floor 5) — it only calls these hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

RANK = {"slots_lock": 10, "filemap_invalidate_lock": 20, "mmu_lock": 30, "pool_lock": 40}

_held = threading.local()


def holds_locks() -> bool:
    """Whether this thread holds any named lock (deferred work must wait until it holds none)."""
    return bool(getattr(_held, "stack", None))

class Explorer(Protocol):
    """What the interleaving explorer installs: called at every scheduling point of a thread."""

    def point(self, name: str, ready: Callable[[], bool] | None, info: tuple[object, ...]) -> None:
        """Park the calling thread at point ``name`` until it is scheduled; ``ready`` (for a lock
        acquisition) says whether the thread could proceed without blocking."""


_explorer: Explorer | None = None


def set_explorer(explorer: Explorer | None) -> Explorer | None:
    """Install (or, with None, remove) the explorer's controller; returns the previous one."""
    global _explorer
    old, _explorer = _explorer, explorer
    return old


def schedule_point(name: str, *info: object) -> None:
    """A window upstream has: a place where another thread may run.  ``info`` is what the thread
    saw (reported in findings).  Names starting with ``yield`` mark a thread that waits for
    another (a fault retrying an invalidation): a fair scheduler runs someone else there."""
    if _explorer is not None:
        _explorer.point(name, None, info)


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
        self.owner: int | None = None  # thread ident of the holder (the explorer's view)

    def _free(self) -> bool:
        return self.owner is None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        reentry = _check_order(self)
        if not reentry and _explorer is not None:
            _explorer.point("acquire " + self.name, self._free, ())
        try:
            with self._lock:
                if not reentry:
                    _stack().append(self)
                    self.owner = threading.get_ident()
                try:
                    yield
                finally:
                    if not reentry:
                        self.owner = None
                        _stack().remove(self)
        finally:
            if not reentry and _explorer is not None:
                _explorer.point("release " + self.name, None, ())

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
        self._sleepers = 0  # threads waiting on the condition (what tests wait for)

    def _readable(self) -> bool:
        return self._writer is None and not self._waiting_writers

    def _writable(self) -> bool:
        return self._writer is None and not self._readers

    @property
    def writer(self) -> int | None:
        """Thread ident of the exclusive holder, if any."""
        return self._writer

    @contextmanager
    def read(self) -> Iterator[None]:
        if _check_order(self):
            yield
            return
        if _explorer is not None:
            _explorer.point("acquire " + self.name + " (shared)", self._readable, ())
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._sleepers += 1
                self._cond.wait()
                self._sleepers -= 1
            self._readers += 1
        _stack().append(self)
        try:
            yield
        finally:
            _stack().remove(self)
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()
            if _explorer is not None:
                _explorer.point("release " + self.name + " (shared)", None, ())

    @contextmanager
    def write(self) -> Iterator[None]:
        if _check_order(self):
            yield
            return
        me = threading.get_ident()
        if _explorer is not None:
            _explorer.point("acquire " + self.name, self._writable, ())
        with self._cond:
            self._waiting_writers += 1
            while self._writer is not None or self._readers:
                self._sleepers += 1
                self._cond.wait()
                self._sleepers -= 1
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
            if _explorer is not None:
                _explorer.point("release " + self.name, None, ())

    def held(self) -> bool:
        return self in _stack()
