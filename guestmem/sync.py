"""Named locks with the kernel's lock order, so vCPU threads and host threads can share the model.

Every lock of the model is taken through here: ``slots_lock`` (a mutex per VM),
``filemap_invalidate_lock`` (an rwsem per guest_memfd inode), ``mmu_lock`` (per VM).  Each lock
has a rank; taking a lock of lower-or-equal rank while holding a higher one is a lock-order
violation (the kernel's order is slots_lock -> filemap_invalidate_lock -> mmu_lock) and raises at
once, the way lockdep would splat, instead of deadlocking some day.  Re-entrant acquisition of the
same lock instance is allowed (the model's code paths nest naturally).

The locks are plain classes used as ``with lock():`` / ``with sem.read():`` — the call returns a
preallocated guard, so an acquisition makes no object and runs no generator (the fault path takes
a dozen locks; a ``contextlib`` generator per acquisition cost a tenth of a fault).  What this
thread holds is one per-thread list, outermost first, each lock once and in strictly increasing
rank (every push is checked against the top), so the order check is one comparison with the top;
re-entries are counted on a second per-thread list and undo nothing when they end.

Scheduling points.  :mod:`guestmem.explore` runs the model's threads one at a time under a
controller and switches only at scheduling points: every acquisition and release of a lock here,
and the explicit :func:`schedule_point` calls the model makes where upstream has a window (between
reading ``mmu_invalidate_seq`` and taking ``mmu_lock``, ...).  The controller is installed with
:func:`set_explorer`; when none is installed a point costs one global check, and nothing in the
model imports the explorer (floor 5) — it only calls these hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

RANK = {"slots_lock": 10, "filemap_invalidate_lock": 20, "mmu_lock": 30}

_get_ident = threading.get_ident


class _Held(threading.local):
    """This thread's locks: ``stack`` holds each lock once, outermost first; ``again`` holds one
    entry per re-entrant acquisition still open."""

    def __init__(self) -> None:
        self.stack: list[NamedLock | RwSem] = []
        self.again: list[NamedLock | RwSem] = []


_held = _Held()


def holds_locks() -> bool:
    """Whether this thread holds any named lock (deferred work must wait until it holds none)."""
    return bool(_held.stack)


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


def _enter(lock: NamedLock | RwSem) -> bool:
    """Bookkeeping before taking ``lock``: True if this thread already holds it (a re-entry, now
    counted); raise :class:`LockOrderError` if a lock of the same or higher rank is held."""
    held = _held
    st = held.stack
    if st:
        if lock in st:
            held.again.append(lock)
            return True
        top = st[-1]
        if top.rank >= lock.rank:
            raise LockOrderError(f"taking {lock.name} while holding {top.name}")
    return False


def _leave(lock: NamedLock | RwSem) -> bool:
    """Bookkeeping when ``lock`` is let go: True if that ends the outermost acquisition (the
    caller releases it for real), False if it ends a re-entry."""
    held = _held
    again = held.again
    if again:
        if again[-1] is lock:
            again.pop()
            return False
        for i in range(len(again) - 2, -1, -1):  # released out of order (explicit __exit__ calls)
            if again[i] is lock:
                del again[i]
                return False
    st = held.stack
    if st[-1] is lock:
        st.pop()
    else:
        st.remove(lock)
    return True


class NamedLock:
    """A re-entrant mutex with a name and a rank; ``with lock():`` takes it (``lock()`` returns
    the lock itself)."""

    __slots__ = ("_acquire_point", "_lock", "_release_point", "name", "owner", "rank")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = RANK[name]
        self._lock = threading.Lock()
        self.owner: int | None = None  # thread ident of the holder (the explorer's view)
        self._acquire_point = "acquire " + name
        self._release_point = "release " + name

    def _free(self) -> bool:
        return self.owner is None

    def __call__(self) -> NamedLock:
        return self

    def __enter__(self) -> None:
        held = _held
        st = held.stack
        if st:  # _enter(), inlined: this is the most frequent acquisition of the model
            if self in st:
                held.again.append(self)
                return
            if st[-1].rank >= self.rank:
                raise LockOrderError(f"taking {self.name} while holding {st[-1].name}")
        if _explorer is not None:
            _explorer.point(self._acquire_point, self._free, ())
        self._lock.acquire()
        st.append(self)
        self.owner = _get_ident()

    def __exit__(self, *exc: object) -> None:
        held = _held
        st = held.stack
        if not held.again and st[-1] is self:
            st.pop()  # _leave()'s common case, inlined
        elif not _leave(self):
            return
        self.owner = None
        self._lock.release()
        if _explorer is not None:
            _explorer.point(self._release_point, None, ())

    def held(self) -> bool:
        return self in _held.stack


class _ReadGuard:
    """``RwSem.read()``: shared."""

    __slots__ = ("_sem",)

    def __init__(self, sem: RwSem) -> None:
        self._sem = sem

    def __enter__(self) -> None:
        sem = self._sem
        st = _held.stack
        if st and _enter(sem):
            return
        if _explorer is not None:
            _explorer.point(sem._acquire_shared, sem._readable, ())
        with sem._mutex:
            while sem._writer is not None or sem._waiting_writers:
                sem._sleepers += 1
                sem._cond.wait()
                sem._sleepers -= 1
            sem._readers += 1
        st.append(sem)

    def __exit__(self, *exc: object) -> None:
        sem = self._sem
        held = _held
        st = held.stack
        if not held.again and st[-1] is sem:
            st.pop()  # _leave()'s common case, inlined (every guest_memfd fault)
        elif not _leave(sem):
            return
        with sem._mutex:
            sem._readers -= 1
            if sem._sleepers:
                sem._cond.notify_all()
        if _explorer is not None:
            _explorer.point(sem._release_shared, None, ())


class _WriteGuard:
    """``RwSem.write()``: exclusive."""

    __slots__ = ("_sem",)

    def __init__(self, sem: RwSem) -> None:
        self._sem = sem

    def __enter__(self) -> None:
        sem = self._sem
        if _enter(sem):
            return
        if _explorer is not None:
            _explorer.point(sem._acquire, sem._writable, ())
        me = _get_ident()
        with sem._mutex:
            sem._waiting_writers += 1
            while sem._writer is not None or sem._readers:
                sem._sleepers += 1
                sem._cond.wait()
                sem._sleepers -= 1
            sem._waiting_writers -= 1
            sem._writer = me
        _held.stack.append(sem)

    def __exit__(self, *exc: object) -> None:
        sem = self._sem
        if not _leave(sem):
            return
        with sem._mutex:
            sem._writer = None
            if sem._sleepers:
                sem._cond.notify_all()
        if _explorer is not None:
            _explorer.point(sem._release, None, ())


class RwSem:
    """A reader/writer semaphore (``read()`` shared, ``write()`` exclusive), writer-preferring.

    A thread holding it (either way) may take it again either way: the inner acquisition is a
    no-op, as the model's nested paths (e.g. punch -> invalidate -> get state) need; the outermost
    acquisition decides how it is held, and its end releases exactly that.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = RANK[name]
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer: int | None = None
        self._waiting_writers = 0
        self._sleepers = 0  # threads waiting on the condition (what tests wait for; no notify if 0)
        self._read = _ReadGuard(self)
        self._write = _WriteGuard(self)
        self._acquire, self._release = "acquire " + name, "release " + name
        self._acquire_shared = self._acquire + " (shared)"
        self._release_shared = self._release + " (shared)"

    def _readable(self) -> bool:
        return self._writer is None and not self._waiting_writers

    def _writable(self) -> bool:
        return self._writer is None and not self._readers

    @property
    def writer(self) -> int | None:
        """Thread ident of the exclusive holder, if any."""
        return self._writer

    def read(self) -> _ReadGuard:
        return self._read

    def write(self) -> _WriteGuard:
        return self._write

    def held(self) -> bool:
        return self in _held.stack
