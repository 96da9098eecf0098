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

RANK = {"slots_lock": 10, "filemap_invalidate_lock": 20, "mmu_lock": 30, "pool_lock": 40}

_held = threading.local()


def holds_locks() -> bool:
    """Whether this thread holds any named lock (deferred work must wait until it holds none)."""
    return bool(getattr(_held, "stack", None))


class LockOrderError(RuntimeError):
    """Locks were taken against the kernel's documented order."""


def _stack() -> list[NamedLock | RwSem]:
    """This thread's held locks, outermost first (a re-entered lock appears once per level)."""
    try:
        return _held.stack  # type: ignore[no-any-return]
    except AttributeError:
        st: list[NamedLock | RwSem] = []
        _held.stack = st
        return st


def _check_order(lock: NamedLock | RwSem) -> bool:
    """True if ``lock`` is already held by this thread (re-entry); raise on an order violation."""
    return _check_order_in(_stack(), lock)


def _check_order_in(st: list[NamedLock | RwSem], lock: NamedLock | RwSem) -> bool:
    """:func:`_check_order` against this thread's stack ``st``, already looked up."""
    if not st:
        return False
    if lock in st:
        return True
    for held in st:
        if held.rank >= lock.rank and held is not lock:
            raise LockOrderError(f"taking {lock.name} while holding {held.name}")
    return False


def _pop(st: list[NamedLock | RwSem], lock: NamedLock | RwSem) -> bool:
    """Drop this thread's innermost entry for ``lock``; True if it held ``lock`` no more."""
    if st and st[-1] is lock:
        st.pop()
    else:  # released out of order (explicit __exit__ calls): drop the last entry for it
        for i in range(len(st) - 1, -1, -1):
            if st[i] is lock:
                del st[i]
                break
    return lock not in st


class NamedLock:
    """A re-entrant mutex with a name and a rank; ``with lock():`` takes it.

    ``lock()`` returns the lock itself: the per-thread state (which locks this thread holds, and
    how deep) is the thread's lock stack, where a re-entry is pushed again, so no object is made
    per acquisition (the fault path takes locks a dozen times; a ``contextlib`` generator per
    acquisition cost a tenth of it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = RANK[name]
        self._lock = threading.RLock()

    def __call__(self) -> NamedLock:
        return self

    def __enter__(self) -> None:
        st = _stack()
        if not _check_order_in(st, self):
            self._lock.acquire()
        st.append(self)

    def __exit__(self, *exc: object) -> None:
        if _pop(_stack(), self):
            self._lock.release()

    def held(self) -> bool:
        return self in _stack()


class _ReadGuard:
    """``RwSem.read()``: shared; state lives in the thread's lock stack (see :class:`NamedLock`)."""

    __slots__ = ("_sem",)

    def __init__(self, sem: RwSem) -> None:
        self._sem = sem

    def __enter__(self) -> None:
        sem = self._sem
        st = _stack()
        if not _check_order_in(st, sem):
            with sem._mutex:  # the condition's own lock (a Condition's ``with`` is Python code)
                while sem._writer is not None or sem._waiting_writers:
                    sem._sleepers += 1
                    sem._cond.wait()
                    sem._sleepers -= 1
                sem._readers += 1
            sem._owners[threading.get_ident()] = False
        st.append(sem)

    def __exit__(self, *exc: object) -> None:
        sem = self._sem
        if _pop(_stack(), sem):
            sem._release()


class _WriteGuard:
    """``RwSem.write()``: exclusive."""

    __slots__ = ("_sem",)

    def __init__(self, sem: RwSem) -> None:
        self._sem = sem

    def __enter__(self) -> None:
        sem = self._sem
        st = _stack()
        if not _check_order_in(st, sem):
            me = threading.get_ident()
            with sem._mutex:
                sem._waiting_writers += 1
                while sem._writer is not None or sem._readers:
                    sem._sleepers += 1
                    sem._cond.wait()
                    sem._sleepers -= 1
                sem._waiting_writers -= 1
                sem._writer = me
            sem._owners[me] = True
        st.append(sem)

    def __exit__(self, *exc: object) -> None:
        sem = self._sem
        if _pop(_stack(), sem):
            sem._release()


class RwSem:
    """A reader/writer semaphore (``read()`` shared, ``write()`` exclusive), writer-preferring.

    A thread holding it (either way) may take it again either way: the inner acquisition is a
    no-op, as the model's nested paths (e.g. punch -> invalidate -> get state) need.  The outermost
    acquisition decides how it is held, and its release undoes exactly that.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rank = RANK[name]
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer: int | None = None
        self._waiting_writers = 0
        self._sleepers = 0  # threads waiting on the condition (no notify when there are none)
        self._owners: dict[int, bool] = {}  # thread id -> holds it for writing
        self._read = _ReadGuard(self)
        self._write = _WriteGuard(self)

    def read(self) -> _ReadGuard:
        return self._read

    def write(self) -> _WriteGuard:
        return self._write

    def _release(self) -> None:
        writing = self._owners.pop(threading.get_ident())
        with self._mutex:
            if writing:
                self._writer = None
            else:
                self._readers -= 1
            if self._sleepers:
                self._cond.notify_all()

    def held(self) -> bool:
        return self in _stack()
