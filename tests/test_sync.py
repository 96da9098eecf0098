"""The named locks as plain classes: re-entry, the kernel's lock order, reader/writer exclusion,
and ``held()``/``holds_locks()`` as every caller relies on them."""

from __future__ import annotations

import threading

import pytest

from guestmem.sync import LockOrderError, NamedLock, RwSem, holds_locks


def test_reentry_and_held() -> None:
    slots, mmu = NamedLock("slots_lock"), NamedLock("mmu_lock")
    assert not holds_locks()
    with slots():
        with slots(), mmu():
            assert slots.held() and mmu.held()
        assert slots.held() and not mmu.held()
    assert not slots.held() and not holds_locks()


def test_order_violation_raises_and_leaves_nothing_held() -> None:
    slots, mmu = NamedLock("slots_lock"), NamedLock("mmu_lock")
    sem = RwSem("filemap_invalidate_lock")
    with mmu():
        with pytest.raises(LockOrderError), slots():
            pass
        with pytest.raises(LockOrderError), sem.read():
            pass
        assert mmu.held() and not slots.held() and not sem.held()
    assert not holds_locks()


def test_rwsem_nesting_either_way() -> None:
    sem = RwSem("filemap_invalidate_lock")
    with sem.write():
        with sem.read():  # re-entry is a no-op, whichever way
            assert sem.held()
        assert sem.held()
    with sem.read(), sem.write():
        pass
    assert not sem.held()
    # Released for real: another thread can take it for writing.
    done = threading.Event()

    def writer() -> None:
        with sem.write():
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    t.join(10)
    assert done.is_set()


def _until_sleeping(sem: RwSem, n: int) -> None:
    """Wait (yielding, no clock) until ``n`` threads sleep on ``sem``."""
    for _ in range(10**7):
        if sem._sleepers >= n:
            return
        threading.Event().wait(0.001)
    raise AssertionError("the other thread never waited")


def test_rwsem_excludes_writer_while_read() -> None:
    sem = RwSem("filemap_invalidate_lock")
    got = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with sem.write():
            got.set()
            release.wait(10)

    with sem.read():
        t = threading.Thread(target=writer)
        t.start()
        _until_sleeping(sem, 1)
        assert not got.is_set()  # the writer sleeps while a reader holds it
    assert got.wait(10)  # and gets it once the reader is gone
    reader_in = threading.Event()

    def reader() -> None:
        with sem.read():
            reader_in.set()

    r = threading.Thread(target=reader)
    r.start()
    _until_sleeping(sem, 1)
    assert not reader_in.is_set()  # readers wait for the writer
    release.set()
    t.join(10)
    r.join(10)
    assert reader_in.is_set()


def test_mutex_excludes_other_threads() -> None:
    lock = NamedLock("mmu_lock")
    counter = [0]

    def work() -> None:
        for _ in range(2000):
            with lock():
                v = counter[0]
                counter[0] = v + 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counter[0] == 8000


def test_reentry_below_the_top_keeps_the_order_check() -> None:
    """Re-entering a lower-ranked lock while a higher one is held is allowed, and does not let a
    lock ranked in between be taken afterwards."""
    slots, mmu = NamedLock("slots_lock"), NamedLock("mmu_lock")
    sem = RwSem("filemap_invalidate_lock")
    with slots(), mmu():
        with slots():
            with pytest.raises(LockOrderError), sem.write():
                pass
            assert slots.held() and mmu.held()
        assert slots.held() and mmu.held()
    assert not holds_locks()


class _Recorder:
    """A stand-in explorer: records every scheduling point and whether the lock could be taken."""

    def __init__(self) -> None:
        self.points: list[tuple[str, bool | None]] = []

    def point(self, name: str, ready: object, info: tuple[object, ...]) -> None:
        self.points.append((name, ready() if callable(ready) else None))


def test_explorer_sees_every_outermost_acquire_and_release() -> None:
    from guestmem import sync

    slots, sem = NamedLock("slots_lock"), RwSem("filemap_invalidate_lock")
    rec = _Recorder()
    old = sync.set_explorer(rec)  # type: ignore[arg-type]
    try:
        with slots(), slots(), sem.read(), sem.write():
            assert slots.owner == threading.get_ident()
        with sem.write():
            pass
    finally:
        sync.set_explorer(old)
    assert rec.points == [
        ("acquire slots_lock", True), ("acquire filemap_invalidate_lock (shared)", True),
        ("release filemap_invalidate_lock (shared)", None), ("release slots_lock", None),
        ("acquire filemap_invalidate_lock", True), ("release filemap_invalidate_lock", None)]
    assert slots.owner is None and sem.writer is None
    # With no explorer installed nothing is recorded.
    with slots():
        pass
    assert len(rec.points) == 6
