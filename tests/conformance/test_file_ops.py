"""A guest_memfd and a memfd are files: fcntl, lseek, dup, fstat, fstatfs, fsync, fchmod, sendfile
and read/write, written once and run on both backends (issue 11 §1a).

Every expected answer here is what this host's kernel (6.18) says; the kernel backend asks it, the
model must agree.  guest_memfd's ``kvm_gmem_fops`` has only mmap/open/release/fallocate, so most
calls are refused (each with its own errno); a memfd is an ordinary shmem file.  Hostile input:
bad whence, negative offsets, bad fcntl commands and flags, wrong types (TypeError before any state
change), closed objects (EBADF in the kernel's order), and "changes nothing" after each refusal.
"""

from __future__ import annotations

import errno

import pytest

import guestmem.fileabi as fa
import guestmem.uapi as u
from guestmem.api import Kvm

from .support import PAGE, raises_errno

SIZE = 16 * PAGE
MMAP_SHARED = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
RDWR_LARGEFILE = fa.O_RDWR | fa.O_LARGEFILE


def _gmem(backend: Kvm):  # type: ignore[no-untyped-def]
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    return vm, vm.create_guest_memfd(SIZE, 0)


def _file(backend: Kvm, kind: str):  # type: ignore[no-untyped-def]
    """A fresh file of ``kind`` (and what keeps it alive)."""
    if kind == "guest_memfd":
        return _gmem(backend)
    return None, backend.memfd_create(SIZE)


KINDS = ["guest_memfd", "memfd"]


# --- fcntl -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_fcntl_status_flags(backend: Kvm, kind: str) -> None:
    _keep, f = _file(backend, kind)
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE
    assert f.fcntl(fa.F_SETFL, fa.O_NONBLOCK) == 0
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE | fa.O_NONBLOCK
    # Neither file can do O_DIRECT (no FMODE_CAN_ODIRECT): EINVAL, and the flags stay as they were.
    with raises_errno(errno.EINVAL):
        f.fcntl(fa.F_SETFL, fa.O_DIRECT)
    with raises_errno(errno.EINVAL):
        f.fcntl(fa.F_SETFL, 0xFFFF_FFFF)
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE | fa.O_NONBLOCK
    # SETFL replaces the settable bits; FASYNC needs ->fasync, which neither has: dropped.
    f.fcntl(fa.F_SETFL, fa.O_APPEND | fa.FASYNC)
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE | fa.O_APPEND
    f.fcntl(fa.F_SETFL, fa.O_NOATIME | fa.O_RDWR | 0o100)  # access mode and O_CREAT are ignored
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE | fa.O_NOATIME
    f.fcntl(fa.F_SETFL, 0)
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE


@pytest.mark.parametrize("kind", KINDS)
def test_fcntl_fd_flags(backend: Kvm, kind: str) -> None:
    _keep, f = _file(backend, kind)
    # KVM_CREATE_GUEST_MEMFD installs without O_CLOEXEC; the interface's memfd uses MFD_CLOEXEC.
    assert f.fcntl(fa.F_GETFD) == (0 if kind == "guest_memfd" else fa.FD_CLOEXEC)
    f.fcntl(fa.F_SETFD, 0)
    assert f.fcntl(fa.F_GETFD) == 0
    f.fcntl(fa.F_SETFD, 0xFF)  # only FD_CLOEXEC exists
    assert f.fcntl(fa.F_GETFD) == fa.FD_CLOEXEC


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cmd", [9999, -1, 0x7FFF_FFFF, fa.F_LINUX_SPECIFIC_BASE + 100])
def test_fcntl_unknown_command_is_einval(backend: Kvm, kind: str, cmd: int) -> None:
    _keep, f = _file(backend, kind)
    with raises_errno(errno.EINVAL):
        f.fcntl(cmd)
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE


def test_seals(backend: Kvm) -> None:
    """guest_memfd has no sealing at all (memfd_fcntl: EINVAL); the interface's memfd was made
    without MFD_ALLOW_SEALING, so it carries F_SEAL_SEAL: EPERM, after the unknown-bits EINVAL."""
    _vm, g = _gmem(backend)
    m = backend.memfd_create(SIZE)
    for cmd, arg in [(fa.F_GET_SEALS, 0), (fa.F_ADD_SEALS, 0), (fa.F_ADD_SEALS, fa.F_SEAL_WRITE),
                     (fa.F_ADD_SEALS, 0x1000)]:
        with raises_errno(errno.EINVAL):
            g.fcntl(cmd, arg)
    assert m.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_SEAL
    with raises_errno(errno.EPERM):
        m.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_WRITE)
    with raises_errno(errno.EINVAL):
        m.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_WRITE | 0x1000)
    assert m.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_SEAL
    m.write(b"still writable", 0)


@pytest.mark.parametrize("kind", KINDS)
def test_fcntl_new_fd_commands_and_types(backend: Kvm, kind: str) -> None:
    _keep, f = _file(backend, kind)
    for cmd in (fa.F_DUPFD, fa.F_DUPFD_CLOEXEC):
        with pytest.raises(ValueError):
            f.fcntl(cmd, 0)
    for bad in (1.0, "3", None, True):
        with pytest.raises(TypeError):
            f.fcntl(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            f.fcntl(fa.F_SETFL, bad)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        f.fcntl(fa.F_SETFL, 1 << 64)
    assert f.fcntl(fa.F_GETFL) == RDWR_LARGEFILE


# --- lseek -----------------------------------------------------------------------------------------
def test_lseek_guest_memfd_is_espipe(backend: Kvm) -> None:
    _vm, g = _gmem(backend)
    for whence in range(5):
        for offset in (0, PAGE, -1, SIZE + 1):
            with raises_errno(errno.ESPIPE):
                g.lseek(offset, whence)
    with raises_errno(errno.EINVAL):  # ksys_lseek checks whence before asking the file
        g.lseek(0, 5)


def test_lseek_memfd(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE)
    assert m.lseek(PAGE, fa.SEEK_SET) == PAGE
    assert m.lseek(1, fa.SEEK_CUR) == PAGE + 1
    assert m.lseek(0, fa.SEEK_CUR) == PAGE + 1
    assert m.lseek(0, fa.SEEK_END) == SIZE
    assert m.lseek(-1, fa.SEEK_END) == SIZE - 1
    assert m.lseek(100, fa.SEEK_END) == SIZE + 100  # past the end is fine
    assert m.lseek(fa.MAX_LFS_FILESIZE, fa.SEEK_SET) == fa.MAX_LFS_FILESIZE
    for offset, whence in [(1, fa.SEEK_CUR), (-1, fa.SEEK_SET), (fa.MAX_LFS_FILESIZE, fa.SEEK_END),
                           (0, 5), (0, 0xFFFF_FFFF), (-SIZE - 1, fa.SEEK_END)]:
        with raises_errno(errno.EINVAL):
            m.lseek(offset, whence)
        assert m.lseek(0, fa.SEEK_CUR) == fa.MAX_LFS_FILESIZE  # nothing moved


def test_lseek_memfd_data_and_holes(backend: Kvm) -> None:
    """SEEK_DATA/SEEK_HOLE over the pages a write made up to date; ENXIO at or past the end."""
    m = backend.memfd_create(SIZE)
    with raises_errno(errno.ENXIO):
        m.lseek(0, fa.SEEK_DATA)  # nothing written: all hole
    assert m.lseek(0, fa.SEEK_HOLE) == 0
    m.write(b"a", 5 * PAGE + 7)
    m.write(b"b" * PAGE, 9 * PAGE)
    assert m.lseek(0, fa.SEEK_DATA) == 5 * PAGE
    assert m.lseek(5 * PAGE + 100, fa.SEEK_DATA) == 5 * PAGE + 100
    assert m.lseek(5 * PAGE + 100, fa.SEEK_HOLE) == 6 * PAGE
    assert m.lseek(6 * PAGE, fa.SEEK_DATA) == 9 * PAGE
    assert m.lseek(PAGE, fa.SEEK_HOLE) == PAGE
    with raises_errno(errno.ENXIO):
        m.lseek(10 * PAGE, fa.SEEK_DATA)
    assert m.lseek(10 * PAGE, fa.SEEK_HOLE) == 10 * PAGE
    assert m.lseek(0, fa.SEEK_CUR) == 10 * PAGE  # a successful SEEK_DATA/HOLE moves the position
    for offset in (SIZE, SIZE + 1, -1):
        for whence in (fa.SEEK_DATA, fa.SEEK_HOLE):
            with raises_errno(errno.ENXIO):
                m.lseek(offset, whence)
    assert m.lseek(0, fa.SEEK_CUR) == 10 * PAGE


# --- dup -------------------------------------------------------------------------------------------
def test_dup_memfd_shares_the_open_file(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE)
    d = m.dup()
    assert d.fd != m.fd
    assert d.fcntl(fa.F_GETFD) == 0  # dup(2) clears close-on-exec on the new fd
    assert m.fcntl(fa.F_GETFD) == fa.FD_CLOEXEC
    m.lseek(100, fa.SEEK_SET)
    assert d.lseek(0, fa.SEEK_CUR) == 100  # one offset
    d.fcntl(fa.F_SETFL, fa.O_NONBLOCK)
    assert m.fcntl(fa.F_GETFL) & fa.O_NONBLOCK  # one set of flags
    d.write(b"via dup")
    assert m.read(7, 100) == b"via dup"
    assert m.lseek(0, fa.SEEK_CUR) == 107
    m.close()
    assert d.read(7, 100) == b"via dup"  # the file lives on through the dup
    assert d.fstat().st_size == SIZE
    d.close()
    with raises_errno(errno.EBADF):
        d.fstat()


def test_dup_guest_memfd_binds_and_outlives_the_original(backend: Kvm) -> None:
    vm, g = _gmem(backend)
    d = g.dup()
    assert d.fd != g.fd and d.size == g.size
    d.fcntl(fa.F_SETFL, fa.O_NONBLOCK)
    assert g.fcntl(fa.F_GETFL) == RDWR_LARGEFILE | fa.O_NONBLOCK
    g.close()
    with raises_errno(errno.EBADF):
        g.fstat()
    d.allocate(0, PAGE)  # the same file, still open through the dup
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 1 << 32, SIZE, 0, d, 0)
    assert d.fstat().st_size == SIZE
    d.close()


# --- fstat / fstatfs -------------------------------------------------------------------------------
def test_fstat_guest_memfd(backend: Kvm) -> None:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    if backend.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) & MMAP_SHARED != MMAP_SHARED:
        pytest.skip("host lacks guest_memfd MMAP|INIT_SHARED")
    g = vm.create_guest_memfd(SIZE, MMAP_SHARED)
    st = g.fstat()
    assert (st.st_mode, st.st_size, st.st_blocks, st.st_blksize, st.st_nlink) == (
        fa.S_IFREG | 0o600, SIZE, 0, PAGE, 1)
    assert st.st_ino == g.stat()[2]
    g.allocate(0, 3 * PAGE)
    with g.mmap() as mapping:
        mapping.write(8 * PAGE, b"x")
    assert g.fstat().st_blocks == 0  # guest_memfd accounts nothing to its inode


def test_fstat_memfd_counts_allocated_pages(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE)
    st = m.fstat()
    assert (st.st_mode, st.st_size, st.st_blocks, st.st_blksize, st.st_nlink) == (
        fa.S_IFREG | 0o777, SIZE, 0, PAGE, 0)
    m.write(b"a", 5 * PAGE + 7)
    assert m.fstat().st_blocks == PAGE // 512
    m.read(PAGE, 0)  # reading a hole allocates nothing
    m.write(b"b" * (2 * PAGE), 0)
    assert m.fstat().st_blocks == 3 * PAGE // 512
    m.write(b"c", 1 << 43)  # far away: the file grows, one more page
    st = m.fstat()
    assert (st.st_size, st.st_blocks) == ((1 << 43) + 1, 4 * PAGE // 512)


def test_fstatfs(backend: Kvm) -> None:
    _vm, g = _gmem(backend)
    m = backend.memfd_create(SIZE)
    fs = g.fstatfs()
    assert fs.f_type in (fa.ANON_INODE_FS_MAGIC, fa.GUEST_MEMFD_MAGIC)
    assert fs.f_type == fa.ANON_INODE_FS_MAGIC  # 6.18 (this host); 7.x has GUEST_MEMFD_MAGIC
    assert (fs.f_bsize, fs.f_namelen, fs.f_flags & fa.ST_VALID) == (PAGE, 255, fa.ST_VALID)
    assert m.fstatfs().f_type == fa.TMPFS_MAGIC


# --- fsync / fchmod --------------------------------------------------------------------------------
def test_fsync_and_fchmod(backend: Kvm) -> None:
    _vm, g = _gmem(backend)
    m = backend.memfd_create(SIZE)
    for call in (g.fsync, g.fdatasync, lambda: g.fchmod(0o644), lambda: g.fchmod(0o600)):
        with raises_errno(errno.EINVAL):
            call()
    assert g.fstat().st_mode == fa.S_IFREG | 0o600  # kvm_gmem_setattr changed nothing
    m.fsync()
    m.fdatasync()
    m.fchmod(0o600)
    assert m.fstat().st_mode == fa.S_IFREG | 0o600
    m.fchmod(0o7777)
    assert m.fstat().st_mode == fa.S_IFREG | 0o7777
    m.fchmod(0o170640)  # only the permission bits are taken
    assert m.fstat().st_mode == fa.S_IFREG | 0o640
    for bad in (0o600.__float__(), "0600", None):
        with pytest.raises(TypeError):
            m.fchmod(bad)  # type: ignore[arg-type]
    assert m.fstat().st_mode == fa.S_IFREG | 0o640


# --- read / write on a memfd -----------------------------------------------------------------------
def test_memfd_read_write(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE)
    assert m.read(10) == bytes(10)
    assert m.lseek(0, fa.SEEK_CUR) == 10
    assert m.write(b"hello") == 5
    assert m.lseek(0, fa.SEEK_CUR) == 15
    assert m.read(5, 10) == b"hello"
    assert m.read(3, SIZE + PAGE) == b""
    assert m.read(1 << 40, SIZE - 2) == bytes(2)  # clamped to what is there
    assert m.write(b"z", 20 * PAGE) == 1
    assert m.fstat().st_size == 20 * PAGE + 1
    for call in (lambda: m.read(1, -1), lambda: m.write(b"x", -1),
                 lambda: m.write(b"x", fa.MAX_LFS_FILESIZE)):
        with raises_errno(errno.EINVAL):
            call()
    assert m.fstat().st_size == 20 * PAGE + 1
    m.fcntl(fa.F_SETFL, fa.O_APPEND)
    assert m.write(b"Q", 0) == 1  # pwrite on an O_APPEND file appends (Linux)
    assert m.fstat().st_size == 20 * PAGE + 2
    assert m.read(1, 20 * PAGE + 1) == b"Q" and m.read(1, 0) == b"\0"
    m.write(b"R")
    assert m.lseek(0, fa.SEEK_CUR) == 20 * PAGE + 3
    for bad in ("x", 1, None):
        with pytest.raises(TypeError):
            m.write(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        m.read(1, 1.0)  # type: ignore[arg-type]
    assert m.fstat().st_size == 20 * PAGE + 3


# --- sendfile --------------------------------------------------------------------------------------
def test_sendfile_memfd_to_memfd(backend: Kvm) -> None:
    src, dst = backend.memfd_create(SIZE), backend.memfd_create(SIZE)
    src.write(b"0123456789" * 10, 0)
    src.lseek(0, fa.SEEK_SET)
    assert dst.sendfile(src, 5, 10) == 10  # with an offset: the source position stays
    assert src.lseek(0, fa.SEEK_CUR) == 0
    assert dst.lseek(0, fa.SEEK_CUR) == 10
    assert dst.sendfile(src, None, 20) == 20  # without: it advances
    assert src.lseek(0, fa.SEEK_CUR) == 20
    assert dst.read(30, 0) == b"5678901234" + b"01234567890123456789"
    assert dst.sendfile(src, 0, 0) == 0
    assert dst.sendfile(src, SIZE + PAGE, 10) == 0  # past the end: nothing to send
    assert dst.sendfile(src.fd, 0, 4) == 4  # an fd number works too
    assert dst.sendfile(src, SIZE - 3, 100) == 3
    with raises_errno(errno.EINVAL):
        dst.sendfile(src, -1, 10)
    dst.fcntl(fa.F_SETFL, fa.O_APPEND)
    with raises_errno(errno.EINVAL):
        dst.sendfile(src, 0, 10)
    assert dst.lseek(0, fa.SEEK_CUR) == 37 and src.lseek(0, fa.SEEK_CUR) == 20


def test_sendfile_guest_memfd_is_neither_end(backend: Kvm) -> None:
    _vm, g = _gmem(backend)
    m = backend.memfd_create(SIZE)
    m.write(b"data", 0)
    m.lseek(0, fa.SEEK_SET)
    with raises_errno(errno.EINVAL):
        g.sendfile(m, 0, 100)  # no splice_write
    with raises_errno(errno.EINVAL):
        g.sendfile(m, None, 100)
    assert m.lseek(0, fa.SEEK_CUR) == 0  # nothing was consumed
    assert g.sendfile(m, SIZE, 100) == 0  # nothing read, so nothing to refuse
    assert g.sendfile(m, 0, 0) == 0
    with raises_errno(errno.ESPIPE):
        m.sendfile(g, 0, 100)  # no FMODE_PREAD
    with raises_errno(errno.EINVAL):
        m.sendfile(g, None, 100)  # not seekable: splice_direct refuses it
    with raises_errno(errno.ESPIPE):
        g.sendfile(g, 0, 100)
    with raises_errno(errno.ESPIPE):
        m.sendfile(g, -1, 100)  # ESPIPE comes before the offset check
    with raises_errno(errno.EINVAL):
        g.sendfile(m, -1, 100)
    assert m.read(4, 0) == b"data"


def test_sendfile_closed_ends(backend: Kvm) -> None:
    """do_sendfile looks the source up first, then checks it, then the destination."""
    _vm, g = _gmem(backend)
    m, closed = backend.memfd_create(SIZE), backend.memfd_create(SIZE)
    closed.close()
    for out, src, off in [(m, closed, 0), (closed, m, 0), (closed, closed, 0), (g, closed, 0)]:
        with raises_errno(errno.EBADF):
            out.sendfile(src, off, 10)
    with raises_errno(errno.ESPIPE):
        closed.sendfile(g, 0, 10)  # the source's ESPIPE before the destination's EBADF
    with raises_errno(errno.EINVAL):
        closed.sendfile(m, -1, 10)
    with pytest.raises(TypeError):
        m.sendfile("3", 0, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        m.sendfile(m, 0.0, 10)  # type: ignore[arg-type]


# --- closed objects and types ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_closed_file_is_ebadf_in_the_kernels_order(backend: Kvm, kind: str) -> None:
    _keep, f = _file(backend, kind)
    f.close()
    calls = [lambda: f.fcntl(fa.F_GETFL), lambda: f.fcntl(9999), lambda: f.lseek(0, 9),
             lambda: f.lseek(0, 0), f.dup, f.fstat, f.fstatfs, f.fsync, f.fdatasync,
             lambda: f.fchmod(0o600), lambda: f.read(1), lambda: f.write(b"x"),
             lambda: f.ioctl(fa.FIOCLEX)]
    for call in calls:
        with raises_errno(errno.EBADF):
            call()
    with raises_errno(errno.EINVAL):  # pread/pwrite check a negative offset before the fd
        f.read(1, -1)
    with pytest.raises(TypeError):  # and the argument rule comes before everything
        f.lseek("0", 0)  # type: ignore[arg-type]


# --- reopen and O_DIRECT ---------------------------------------------------------------------------
def test_reopen_memfd_with_o_direct(backend: Kvm) -> None:
    """memfd_create's file cannot take O_DIRECT (F_SETFL: EINVAL), but the same inode opened again
    through /proc can (shmem_file_open): reads and writes then need no alignment on tmpfs."""
    m = backend.memfd_create(SIZE)
    m.write(b"hello", 2 * PAGE + 3)
    d = m.reopen(fa.O_RDWR | fa.O_DIRECT)
    assert d.fcntl(fa.F_GETFL) == RDWR_LARGEFILE | fa.O_DIRECT
    assert d.fcntl(fa.F_GETFD) == 0
    assert d.fstat().st_ino == m.fstat().st_ino
    assert d.read(5, 2 * PAGE + 3) == b"hello"  # unaligned offset and length
    assert d.write(b"xyz", 7) == 3
    assert m.read(3, 7) == b"xyz"  # one inode
    assert d.read(3) == bytes(3)
    assert (d.lseek(0, fa.SEEK_CUR), m.lseek(0, fa.SEEK_CUR)) == (3, 0)  # two descriptions
    d.fcntl(fa.F_SETFL, 0)
    assert d.fcntl(fa.F_GETFL) == RDWR_LARGEFILE
    d.fcntl(fa.F_SETFL, fa.O_DIRECT)  # this description may toggle it
    assert d.fcntl(fa.F_GETFL) & fa.O_DIRECT
    with raises_errno(errno.EINVAL):
        m.fcntl(fa.F_SETFL, fa.O_DIRECT)  # the original still may not
    dd = d.dup()
    dd.lseek(5, fa.SEEK_SET)
    assert d.lseek(0, fa.SEEK_CUR) == 5  # a dup of the reopened file shares its description
    assert m.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_SEAL  # seals live with the inode
    assert m.reopen(fa.O_RDWR | fa.O_CLOEXEC).fcntl(fa.F_GETFD) == fa.FD_CLOEXEC
    m.close()
    assert d.read(5, 2 * PAGE + 3) == b"hello"  # the inode lives while any file does


def test_reopen_access_modes(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE)
    ro, wo = m.reopen(0), m.reopen(1)
    assert ro.fcntl(fa.F_GETFL) == fa.O_LARGEFILE
    assert m.reopen(3).fcntl(fa.F_GETFL) == fa.O_LARGEFILE | 3
    with raises_errno(errno.EBADF):
        ro.write(b"x")
    with raises_errno(errno.EPERM):  # memfd_add_seals wants FMODE_WRITE before anything else
        ro.fcntl(fa.F_ADD_SEALS, 0x1000)
    with raises_errno(errno.EBADF):
        ro.sendfile(m, 0, 1)
    with raises_errno(errno.EBADF):
        wo.read(1)
    with raises_errno(errno.EINVAL):
        wo.read(1, -1)  # the negative offset first
    with raises_errno(errno.EBADF):
        m.sendfile(wo, 0, 1)
    assert m.fstat().st_size == SIZE and m.fstat().st_blocks == 0


def test_reopen_refusals(backend: Kvm) -> None:
    _vm, g = _gmem(backend)
    m = backend.memfd_create(SIZE)
    with raises_errno(errno.ENXIO):
        g.reopen(fa.O_RDWR)  # an anonymous inode has no open path
    with raises_errno(errno.ENXIO):
        g.reopen(fa.O_RDWR | fa.O_DIRECT)
    for flags in (0o100, 0o1000, 0o10000000, 0o200000):  # O_CREAT, O_TRUNC, O_PATH, O_DIRECTORY
        with pytest.raises(ValueError):
            m.reopen(fa.O_RDWR | flags)
    with pytest.raises(TypeError):
        m.reopen("r")  # type: ignore[arg-type]
    m.close()
    with raises_errno(errno.ENOENT):  # /proc/self/fd/N of a closed fd
        m.reopen(fa.O_RDWR)


# --- memfd_create flags and sealing ----------------------------------------------------------------
@pytest.mark.parametrize(("flags", "mode", "seals", "cloexec"), [
    (0, 0o777, fa.F_SEAL_SEAL, 0), (fa.MFD_CLOEXEC, 0o777, fa.F_SEAL_SEAL, 1),
    (fa.MFD_ALLOW_SEALING, 0o777, 0, 0), (fa.MFD_EXEC, 0o777, fa.F_SEAL_SEAL, 0),
    (fa.MFD_NOEXEC_SEAL, 0o666, fa.F_SEAL_EXEC, 0),
    (fa.MFD_NOEXEC_SEAL | fa.MFD_ALLOW_SEALING | fa.MFD_CLOEXEC, 0o666, fa.F_SEAL_EXEC, 1),
])
def test_memfd_create_flags(backend: Kvm, flags: int, mode: int, seals: int, cloexec: int) -> None:
    m = backend.memfd_create(SIZE, flags)
    assert (m.fstat().st_mode, m.fcntl(fa.F_GET_SEALS), m.fcntl(fa.F_GETFD)) == (
        fa.S_IFREG | mode, seals, cloexec)


def test_memfd_create_refusals(backend: Kvm) -> None:
    for flags in (fa.MFD_EXEC | fa.MFD_NOEXEC_SEAL, 0x20, 1 << 31, -1):
        with raises_errno(errno.EINVAL):
            backend.memfd_create(SIZE, flags)
    with pytest.raises(ValueError):
        backend.memfd_create(SIZE, fa.MFD_HUGETLB)
    with pytest.raises(TypeError):
        backend.memfd_create(SIZE, "cloexec")  # type: ignore[arg-type]
    with raises_errno(errno.EINVAL):  # the flags first, then ftruncate's negative length
        backend.memfd_create(-1, fa.MFD_ALLOW_SEALING)


def test_seal_grow_cuts_writes_at_the_end_page_by_page(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE, fa.MFD_ALLOW_SEALING)
    m.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_GROW)
    assert m.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_GROW
    assert m.write(b"a" * 10, 0) == 10
    assert m.write(b"b" * 2 * PAGE, SIZE - PAGE) == PAGE  # the piece past the end is refused: short
    assert m.write(b"d" * 200, SIZE - 100) == 100
    assert m.write(b"e" * 3 * PAGE, SIZE - PAGE // 2) == PAGE // 2
    for offset in (SIZE, SIZE + 5 * PAGE):
        with raises_errno(errno.EPERM):
            m.write(b"c", offset)
    assert m.fstat().st_size == SIZE
    src = backend.memfd_create(SIZE)
    src.write(b"z" * 100, 0)
    m.lseek(SIZE - 4, fa.SEEK_SET)
    assert m.sendfile(src, 0, 100) == 4  # sendfile writes the same way
    assert m.lseek(0, fa.SEEK_CUR) == SIZE
    m.fcntl(fa.F_SETFL, fa.O_APPEND)
    with raises_errno(errno.EPERM):
        m.write(b"y")
    assert m.fstat().st_size == SIZE


def test_seal_write_exec_and_seal(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE, fa.MFD_ALLOW_SEALING)
    m.write(b"keep", 0)
    m.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_FUTURE_WRITE)
    with raises_errno(errno.EPERM):
        m.write(b"x", 0)
    assert m.write(b"", 0) == 0  # nothing to write: nothing refused
    src = backend.memfd_create(SIZE)
    src.write(b"z", 0)
    with raises_errno(errno.EPERM):
        m.sendfile(src, 0, 1)
    assert m.sendfile(src, 0, 0) == 0
    m.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_WRITE)
    m.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_SEAL)
    assert m.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_FUTURE_WRITE | fa.F_SEAL_WRITE | fa.F_SEAL_SEAL
    with raises_errno(errno.EPERM):
        m.fcntl(fa.F_ADD_SEALS, 0)
    with raises_errno(errno.EINVAL):  # unknown bits before F_SEAL_SEAL's EPERM
        m.fcntl(fa.F_ADD_SEALS, 0x40)
    assert m.read(4, 0) == b"keep"
    # F_SEAL_EXEC on an executable file seals writes and size too; on a 0666 one only exec bits.
    x = backend.memfd_create(SIZE, fa.MFD_ALLOW_SEALING)
    x.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_EXEC)
    assert x.fcntl(fa.F_GET_SEALS) == 0x3E
    with raises_errno(errno.EPERM):
        x.fchmod(0o644)
    assert x.fstat().st_mode == fa.S_IFREG | 0o777
    n = backend.memfd_create(SIZE, fa.MFD_ALLOW_SEALING)
    n.fchmod(0o666)
    n.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_EXEC)
    assert n.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_EXEC
    with raises_errno(errno.EPERM):
        n.fchmod(0o777)
    n.fchmod(0o600)  # the exec bits stay as they are: allowed
    assert n.fstat().st_mode == fa.S_IFREG | 0o600
    assert n.write(b"ok", 0) == 2
    # Seals live with the inode: a read-only reopen sees them, and may not add any.
    ro = m.reopen(0)
    assert ro.fcntl(fa.F_GET_SEALS) == m.fcntl(fa.F_GET_SEALS)
    with raises_errno(errno.EPERM):
        n.reopen(0).fcntl(fa.F_ADD_SEALS, fa.F_SEAL_GROW)
    assert n.fcntl(fa.F_GET_SEALS) == fa.F_SEAL_EXEC
