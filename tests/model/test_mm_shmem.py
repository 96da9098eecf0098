"""ShmemFile: tmpfs rules and errnos (checked against this host's real memfd), notifiers, flags.

The differential tests run the same calls on a model ``ShmemFile`` and on a real ``memfd`` (plain
tmpfs, no KVM needed) and compare errnos, contents, sizes and allocated blocks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.mm import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    MAX_LFS_FILESIZE,
    FramePool,
    RecordingNotifier,
    ShmemFile,
)
from guestmem.model.mm._libc import fallocate as real_fallocate
from guestmem.uapi import PAGE_SIZE

PS = PAGE_SIZE
KEEP, PUNCH = u.FALLOC_FL_KEEP_SIZE, u.FALLOC_FL_PUNCH_HOLE
MiB = 1 << 20


@pytest.fixture(scope="module")
def pool() -> Iterator[FramePool]:
    with FramePool(4 << 30) as p:
        yield p


@pytest.fixture
def small() -> Iterator[FramePool]:
    with FramePool(8 * MiB, chunk_bytes=2 * MiB) as p:
        yield p


def _host_shmem_uses_small_pages() -> bool:
    """True if this host's tmpfs allocates 4 KiB pages (so st_blocks can be compared)."""
    thp = "/sys/kernel/mm/transparent_hugepage"
    for path in [f"{thp}/shmem_enabled", *glob.glob(f"{thp}/hugepages-*/shmem_enabled")]:
        try:
            with open(path) as f:
                setting = f.read().split("[")[1].split("]")[0]
        except (OSError, IndexError):
            continue
        if setting not in ("never", "inherit", "deny"):
            return False
    return True


SMALL_PAGES = _host_shmem_uses_small_pages()


def _errno_of(fn) -> int:  # type: ignore[no-untyped-def]
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


class Pair:
    """A model file and a real memfd, driven together."""

    def __init__(self, pool: FramePool, size: int = 0) -> None:
        self.model = ShmemFile(pool, size)
        self.fd = os.memfd_create("guestmem-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        self.model.close()
        os.close(self.fd)

    def fallocate(self, mode: int, offset: int, length: int) -> tuple[int, int]:
        return (
            _errno_of(lambda: self.model.fallocate(mode, offset, length)),
            _errno_of(lambda: real_fallocate(self.fd, mode, offset, length)),
        )

    def truncate(self, size: int) -> tuple[int, int]:
        return _errno_of(lambda: self.model.truncate(size)), _errno_of(lambda: os.ftruncate(self.fd, size))

    def write(self, offset: int, data: bytes) -> tuple[int | str, int | str]:
        def run(fn):  # type: ignore[no-untyped-def]
            try:
                return fn()
            except OSError as e:
                return errno.errorcode[e.errno or 0]

        return run(lambda: self.model.write(offset, data)), run(lambda: os.pwrite(self.fd, data, offset))

    def add_seals(self, seals: int) -> tuple[int, int]:
        return (
            _errno_of(lambda: self.model.add_seals(seals)),
            _errno_of(lambda: fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)),
        )

    def check_same(self) -> None:
        st_ = os.fstat(self.fd)
        assert self.model.size == st_.st_size
        if SMALL_PAGES:
            assert self.model.blocks == st_.st_blocks
        n = min(self.model.size, 64 * PS)
        assert self.model.read(0, n) == os.pread(self.fd, n, 0)


MODES = [0, KEEP, PUNCH, PUNCH | KEEP, 0x04, 0x05, 0x07, 0x08, 0x09, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21,
         0x40, 0x41, 0x80, 0x81, 0x100]
RANGES = [(0, PS), (-1, PS), (0, 0), (0, -1), (1, 1), (2**62, 2**62), (2**63 - 2, 1), (2**63 - PS, PS),
          (100, 3 * PS), (9 * PS, PS)]


@pytest.mark.parametrize("mode", MODES, ids=hex)
def test_fallocate_errnos_match_the_kernel(pool: FramePool, mode: int) -> None:
    for offset, length in RANGES:
        p = Pair(pool, 8 * PS)
        try:
            model, real = p.fallocate(mode, offset, length)
            names = errno.errorcode.get(model), errno.errorcode.get(real)
            assert model == real, (hex(mode), offset, length, names)
            p.check_same()
        finally:
            p.close()


def test_seals_match_the_kernel(pool: FramePool) -> None:
    p = Pair(pool, 5000)
    try:
        assert p.add_seals(0x1000) == (errno.EINVAL,) * 2
        assert p.add_seals(F_SEAL_GROW) == (0, 0)
        assert p.write(100, b"x" * 8192) == (3996, 3996)  # stops at the last page boundary in i_size
        assert p.write(4096, b"x" * 10) == (10, 10)
        assert p.write(4096, b"x" * 1000) == ("EPERM", "EPERM")
        assert p.write(4500, b"y" * 100) == (100, 100)
        assert p.fallocate(KEEP, 0, 3 * PS) == (errno.EPERM,) * 2
        assert p.fallocate(0, 0, PS) == (0, 0)
        assert p.truncate(10000) == (errno.EPERM,) * 2
        assert p.truncate(4000) == (0, 0)
        assert p.add_seals(F_SEAL_SHRINK) == (0, 0)
        assert p.truncate(100) == (errno.EPERM,) * 2
        assert p.truncate(4000) == (0, 0)
        assert p.add_seals(F_SEAL_WRITE) == (0, 0)
        assert p.write(0, b"z") == ("EPERM", "EPERM")
        assert p.write(0, b"") == (0, 0)
        assert p.fallocate(PUNCH | KEEP, 0, PS) == (errno.EPERM,) * 2
        assert p.fallocate(PUNCH | KEEP, -1, PS) == (errno.EINVAL,) * 2
        assert p.fallocate(0, 0, PS) == (errno.EPERM,) * 2  # grows past i_size 4000
        assert p.fallocate(0, 0, 4000) == (0, 0)
        assert p.add_seals(F_SEAL_SEAL) == (0, 0)
        assert p.add_seals(F_SEAL_GROW) == (errno.EPERM,) * 2
        p.check_same()
    finally:
        p.close()
    unsealable = ShmemFile(pool, allow_sealing=False)
    assert unsealable.seals == F_SEAL_SEAL
    with pytest.raises(KvmError) as e:
        unsealable.add_seals(F_SEAL_GROW)
    assert e.value.errno == errno.EPERM


def test_truncate_and_io_edges_match_the_kernel(pool: FramePool) -> None:
    p = Pair(pool, 100)
    try:
        assert p.fallocate(KEEP, 0, 3 * PS) == (0, 0)  # preallocated past EOF
        p.check_same()
        assert p.truncate(100) == (0, 0)  # same size still drops pages past EOF
        p.check_same()
        assert p.write(0, b"\xff" * 8192) == (8192, 8192)
        assert p.truncate(100) == (0, 0)
        assert p.truncate(8192) == (0, 0)  # the old tail was zeroed on shrink
        p.check_same()
        assert p.truncate(-1) == (errno.EINVAL,) * 2
        assert p.truncate(MAX_LFS_FILESIZE) == (0, 0)
        assert p.write(2**63 - 2, b"ab") == ("EINVAL", "EINVAL")
        assert p.truncate(3 * PS) == (0, 0)
        assert p.fallocate(0, 8 * PS + 1, 1) == (0, 0)
        p.check_same()
    finally:
        p.close()


ops = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 20 * PS), st.integers(1, 3 * PS), st.integers(1, 255)),
    st.tuples(st.just("falloc"), st.sampled_from([0, KEEP, PUNCH | KEEP]), st.integers(0, 20 * PS),
              st.integers(1, 6 * PS)),
    st.tuples(st.just("truncate"), st.integers(0, 24 * PS)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, min_size=1, max_size=12))
def test_random_file_histories_match_the_kernel(pool: FramePool, history: list[tuple]) -> None:
    p = Pair(pool)
    try:
        for op in history:
            if op[0] == "write":
                _, off, n, byte = op
                assert p.write(off, bytes([byte]) * n) == (n, n)
            elif op[0] == "falloc":
                _, mode, off, n = op
                model, real = p.fallocate(mode, off, n)
                assert model == real == 0
            else:
                model, real = p.truncate(op[1])
                assert model == real == 0
            p.check_same()
    finally:
        p.close()


def test_punch_zeroes_partial_pages(pool: FramePool) -> None:
    f = ShmemFile(pool)
    f.write(0, b"\xff" * 3 * PS)
    f.fallocate(PUNCH | KEEP, 100, 2 * PS)
    data = f.read(0, 3 * PS)
    assert data == b"\xff" * 100 + bytes(2 * PS) + b"\xff" * (PS - 100)
    assert f.cache.nr_pages == 2 and f.blocks == 16
    f.fallocate(PUNCH | KEEP, 10, 20)  # inside one page: zeroed, kept
    assert f.read(0, 40) == b"\xff" * 10 + bytes(20) + b"\xff" * 10 and f.cache.nr_pages == 2
    f.fallocate(PUNCH | KEEP, 100 * PS, PS)  # beyond EOF: a no-op
    f.close()


def test_read_write_pread_semantics(pool: FramePool) -> None:
    f = ShmemFile(pool)
    assert f.read(0, 10) == b""
    assert f.write(PS + 10, b"abc") == 3 and f.size == PS + 13
    assert f.read(PS + 8, 100) == b"\0\0abc"  # short at EOF
    assert f.read(f.size, 1) == b"" and f.read(10**9, 1) == b""
    assert f.cache.nr_pages == 1  # the hole before it was not allocated
    for bad in (lambda: f.read(-1, 1), lambda: f.write(-1, b"x")):
        with pytest.raises(KvmError) as e:
            bad()
        assert e.value.errno == errno.EINVAL
    f.close()


def test_range_notifier_brackets_removal(pool: FramePool) -> None:
    f = ShmemFile(pool, 64 * PS)
    seen: list[tuple[str, int, int, int]] = []

    class Probe(RecordingNotifier):
        def invalidate_begin(self, start: int, end: int) -> None:
            seen.append(("begin", start, end, f.cache.allocated_count(start, end)))

        def invalidate_end(self, start: int, end: int) -> None:
            seen.append(("end", start, end, f.cache.allocated_count(start, end)))

    rec = RecordingNotifier()
    f.add_notifier(Probe())
    f.add_notifier(rec)
    f.fallocate(0, 0, 64 * PS)
    assert seen == [] and rec.calls == []  # allocation invalidates nothing
    f.fallocate(PUNCH | KEEP, 4 * PS + 1, 4 * PS)  # whole pages 5..7 go
    assert seen == [("begin", 5, 8, 3), ("end", 5, 8, 0)]
    assert rec.calls == [("begin", 5, 8), ("end", 5, 8)]
    f.fallocate(PUNCH | KEEP, 100, 200)  # no whole page: nothing to invalidate
    assert len(rec.calls) == 2
    seen.clear()
    f.truncate(10 * PS + 5)
    assert seen == [("begin", 11, 64, 53), ("end", 11, 64, 0)]
    assert f.stats.invalidate_begin == 4 and f.stats.invalidate_end == 4
    assert f.stats.invalidate_folio == 0 and f.stats.punched_pages == 56
    f.close()
    assert seen[-2:] == [("begin", 0, 11, 8), ("end", 0, 11, 0)]
    assert f.cache.nr_pages == 0
    with pytest.raises(KvmError) as e:
        f.read(0, 1)
    assert e.value.errno == errno.EBADF


def test_folio_notifier_one_call_per_folio(pool: FramePool) -> None:
    f = ShmemFile(pool, 4 * 512 * PS, folio_order=9, invalidate_granularity="folio")
    rec = RecordingNotifier()
    f.add_notifier(rec)
    f.fallocate(0, 0, 4 * 512 * PS)
    assert f.cache.folio(700)[2] == 9 and f.cache.nr_pages == 2048  # type: ignore[index]
    f.fallocate(PUNCH | KEEP, 0, 2 * 512 * PS)  # two whole 2 MiB folios
    assert rec.calls == [("folio", 0, 9), ("folio", 512, 9)]
    rec.clear()
    f.fallocate(PUNCH | KEEP, (1024 + 100) * PS, 3 * PS)  # part of a folio: split, then per page
    assert rec.calls == [("folio", 1124, 0), ("folio", 1125, 0), ("folio", 1126, 0)]
    assert f.cache.stats.splits == 1
    rec.clear()
    f.fallocate(PUNCH | KEEP, 0, 4 * 512 * PS)  # holes get no call; 509 small pages + one 2 MiB folio
    assert len(rec.calls) == 509 + 1 and ("folio", 1536, 9) in rec.calls
    assert f.stats.invalidate_folio == 2 + 3 + 510
    assert f.stats.invalidate_begin == 0


def test_range_mode_on_a_huge_file_is_one_call(pool: FramePool) -> None:
    f = ShmemFile(pool, 4 * 512 * PS, folio_order=9)
    rec = RecordingNotifier()
    f.add_notifier(rec)
    f.fallocate(0, 0, 4 * 512 * PS)
    f.fallocate(PUNCH | KEEP, 0, 4 * 512 * PS)
    assert rec.calls == [("begin", 0, 2048), ("end", 0, 2048)]


def test_pinned_page_in_a_huge_folio_survives_partial_punch(pool: FramePool) -> None:
    f = ShmemFile(pool, 512 * PS, folio_order=9, invalidate_granularity="folio")
    rec = RecordingNotifier()
    f.add_notifier(rec)
    f.write(0, b"\x77" * 512 * PS)
    f.cache.add_ref(0, 1)
    f.fallocate(PUNCH | KEEP, 10 * PS, 5 * PS)
    assert rec.calls == [] and f.cache.nr_pages == 512  # cannot split: zeroed in place
    assert f.read(10 * PS, 5 * PS) == bytes(5 * PS) and f.read(15 * PS, 1) == b"\x77"
    with pytest.raises(KvmError) as e:
        f.add_seals(F_SEAL_WRITE)  # memfd_wait_for_pins
    assert e.value.errno == errno.EBUSY


def test_fallocate_enomem_undoes(small: FramePool) -> None:
    f = ShmemFile(small, 0)
    f.fallocate(0, 0, 1000 * PS)
    with pytest.raises(KvmError) as e:
        f.fallocate(0, 2000 * PS, 1100 * PS)
    assert e.value.errno == errno.ENOMEM and e.value.operation == "fallocate"
    assert f.size == 1000 * PS and f.cache.nr_pages == 1000 == small.allocated
    with pytest.raises(KvmError) as e:
        f.write(5000 * PS, b"x" * 1100 * PS)
    assert e.value.errno == errno.ENOMEM and f.size == 1000 * PS


def test_migrate_and_merge(pool: FramePool) -> None:
    f = ShmemFile(pool, 512 * PS)
    rec = RecordingNotifier()
    f.add_notifier(rec)
    f.write(0, b"a" * 256 * PS)
    pool.alloc()  # break physical contiguity
    f.write(256 * PS, b"b" * 256 * PS)
    old = f.cache.lookup(3)[0]  # type: ignore[index]
    new = f.migrate(3)
    assert new != old and f.read(3 * PS, 2) == b"aa"
    assert rec.calls == [("begin", 3, 4), ("end", 3, 4)]
    rec.clear()
    assert f.merge(0) is True  # by migration: contents copied, users invalidated
    assert f.cache.folio(300)[2] == 9 and rec.calls == [("begin", 0, 512), ("end", 0, 512)]  # type: ignore[index]
    assert f.read(255 * PS, 2 * PS) == b"a" * PS + b"b" * PS
    f.cache.add_ref(0, 1)
    with pytest.raises(KvmError) as e:
        f.migrate(0)
    assert e.value.errno == errno.EAGAIN
    with pytest.raises(KvmError) as e:
        f.migrate(9999)
    assert e.value.errno == errno.ENOENT


def test_unmovable_refuses_migration(pool: FramePool) -> None:
    f = ShmemFile(pool, 512 * PS, unevictable=True, unmovable=True)
    assert f.flags() == {"unevictable": True, "unmovable": True}
    f.fallocate(0, 0, 256 * PS)
    pool.alloc()
    f.fallocate(0, 256 * PS, 256 * PS)
    with pytest.raises(KvmError) as e:
        f.migrate(0)
    assert e.value.errno == errno.EINVAL
    assert f.merge(0) is False  # would need migration
    f.truncate(0)
    f.truncate(512 * PS)
    f.fallocate(0, 0, 512 * PS)
    f.cache.split(0, 512)
    assert f.merge(0) is (f.cache.range_count() == 1 and f.cache.lookup(0)[0] % 512 == 0)  # type: ignore[index]


def test_writable_mappings_block_write_seal(pool: FramePool) -> None:
    f = ShmemFile(pool)
    f.map_writable()
    with pytest.raises(KvmError) as e:
        f.add_seals(F_SEAL_WRITE)
    assert e.value.errno == errno.EBUSY
    f.add_seals(F_SEAL_FUTURE_WRITE)  # allowed with mappings; blocks new ones
    with pytest.raises(KvmError) as e:
        f.map_writable()
    assert e.value.errno == errno.EPERM
    f.unmap_writable()
    f.add_seals(F_SEAL_WRITE)
    with contextlib.suppress(ValueError):
        f.unmap_writable()


def test_get_folio_allocates_within_size(pool: FramePool) -> None:
    f = ShmemFile(pool, 600 * PS, folio_order=9)
    head, pfn, order = f.get_folio(5)  # type: ignore[misc]
    assert (head, order) == (0, 9) and pfn % 512 == 0
    assert f.get_folio(520)[2] == 0  # type: ignore[index]  # block [512,1024) passes i_size
    assert f.get_folio(2000, create=False) is None
    assert not f.cache.is_uptodate(5) and f.cache.prepare(0, 512) == 512


def test_failing_notifier_still_gets_balanced_ends(pool: FramePool) -> None:
    f = ShmemFile(pool, 8 * PS)
    f.fallocate(0, 0, 8 * PS)
    first = RecordingNotifier()

    class Broken(RecordingNotifier):
        def invalidate_begin(self, start: int, end: int) -> None:
            raise RuntimeError("boom")

    f.add_notifier(first)
    f.add_notifier(Broken())
    with pytest.raises(RuntimeError):
        f.fallocate(PUNCH | KEEP, 0, PS)
    assert first.calls == [("begin", 0, 1), ("end", 0, 1)]
    assert f.cache.nr_pages == 8  # nothing was removed
