"""The ordinary file system calls on the model's guest_memfd and memfd files.

A guest_memfd and a memfd are ordinary kernel files, so userspace (and selftests) use ``fcntl``,
``lseek``, ``dup``, ``fstat``, ``fstatfs``, ``fsync``, ``fchmod``, ``sendfile``, ``read``/``write``
and the generic VFS ioctls on them.  :class:`ModelFileOps` gives both model classes those calls,
answering as Linux 6.18 (this host) does, checked by asking it (``tests/conformance/test_file_ops.py``):

* guest_memfd (``kvm_gmem_fops``: only mmap, open, release, fallocate; an anonymous inode,
  ``S_IFREG|0600``, of the anon-inode filesystem): no ``llseek`` (ESPIPE), no ``fsync`` (EINVAL),
  ``setattr`` refuses everything (EINVAL), no sealing (EINVAL), no splice (sendfile EINVAL, or
  ESPIPE with an offset), nothing accounted in ``st_blocks``, and ``O_DIRECT`` cannot be set;
* memfd (shmem, opened by ``memfd_create`` with ``FMODE_LSEEK|PREAD|PWRITE``, ``O_LARGEFILE``):
  seekable with ``SEEK_DATA``/``SEEK_HOLE`` over up-to-date pages, readable and writable (a write
  grows the file), ``st_blocks`` counts its pages, ``fsync`` does nothing and succeeds, its mode
  can change, and sealing is refused (``F_SEAL_SEAL`` is set: ``memfd_create`` without
  ``MFD_ALLOW_SEALING``).  ``memfd_create`` does not set ``FMODE_CAN_ODIRECT``, so ``F_SETFL``
  with ``O_DIRECT`` is EINVAL here too.

State lives where the kernel keeps it: the open file description (``f_flags``, ``f_pos``) in the
file object's attributes, which a :meth:`dup` shares; the close-on-exec flag per fd in the
process (``Process.fd_cloexec``); the mode and inode number with the inode.
"""

from __future__ import annotations

import errno
import itertools
from typing import Any

from guestmem import fileabi as fa
from guestmem import uapi as u
from guestmem.api import FileStat, FsStat
from guestmem.args import as_bytes, s64, u32, u64
from guestmem.errors import KvmError

PS = u.PAGE_SIZE
# guest_memfd's superblock magic: the anonymous-inode filesystem's up to 6.18 (this host); from
# 7.x guest_memfd mounts its own filesystem and fstatfs says GUEST_MEMFD_MAGIC.
GMEM_FS_MAGIC = fa.ANON_INODE_FS_MAGIC
_memfd_inodes = itertools.count(0x10000)

# Generic VFS ioctls the kernel has that the model does not implement (fs/ioctl.c's switch and,
# for a regular non-anonymous file such as a memfd, file_ioctl's).
VFS_UNMODELLED = frozenset({
    0xC0045877, 0xC0045878,  # FIFREEZE, FITHAW
    0xC020660B,  # FS_IOC_FIEMAP
    0x40049409, 0x4020940D, 0xC0189436,  # FICLONE, FICLONERANGE, FIDEDUPERANGE
    0x80086601, 0x40086602,  # FS_IOC_GETFLAGS, FS_IOC_SETFLAGS
    0x801C581F, 0x401C5820,  # FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR
    0x80111500, 0x80811501,  # FS_IOC_GETFSUUID, FS_IOC_GETFSSYSFSPATH
})
FILE_IOCTL_UNMODELLED = frozenset({
    1,  # FIBMAP
    0x40305828, 0x40305829, 0x4030582A, 0x4030582B, 0x40305839,  # FS_IOC_(UN)RESVSP(64), ZERO_RANGE
})


def vfs_ioctl_common(obj: Any, fd: int, request: int, arg: int | bytearray, regular: bool) -> int | None:
    """``do_vfs_ioctl``'s part every fd shares (close-on-exec, non-blocking, async, block size),
    for any model object; None if ``request`` is not one of them.  ``regular`` says whether the
    file is a regular, non-anonymous one (a memfd), for which the VFS answers more."""
    proc = obj.owner_process if hasattr(obj, "owner_process") else None
    if request in (fa.FIOCLEX, fa.FIONCLEX):
        if proc is not None:
            (proc.fd_cloexec.add if request == fa.FIOCLEX else proc.fd_cloexec.discard)(fd)
        return 0
    if request in (fa.FIONBIO, fa.FIOASYNC, fa.FIGETBSZ):
        if not isinstance(arg, bytearray):  # NULL: get_user/put_user fault
            raise KvmError(errno.EFAULT, "ioctl", "NULL argument")
        if request == fa.FIGETBSZ:
            arg[0:4] = PS.to_bytes(4, "little")
            return 0
        on = int.from_bytes(arg[0:4], "little", signed=True)
        if request == fa.FIONBIO:
            if isinstance(obj, ModelFileOps):
                flags = obj._f_flags()
                obj._desc()["f_flags"] = flags | fa.O_NONBLOCK if on else flags & ~fa.O_NONBLOCK
            return 0
        if on:  # FIOASYNC: none of these files has ->fasync
            raise KvmError(errno.ENOTTY, "ioctl(FIOASYNC)", "the file has no fasync")
        return 0
    if request in VFS_UNMODELLED or (regular and request in FILE_IOCTL_UNMODELLED):
        raise NotImplementedError(f"the model does not implement VFS ioctl {request:#x}")
    return None


class ModelFileOps:
    """The file system calls of a model file object (``GmemFile`` or a memfd ``ShmemBacking``).

    The class it is mixed into is an :class:`~guestmem.model.process.OpenFile` with ``kind``
    ``"guest_memfd"`` or ``"memfd"``.
    """

    kind: str
    fd: int

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def _is_gmem(self) -> bool:
        return self.kind == "guest_memfd"

    def _fops_open(self, op: str) -> None:
        """``fdget``: a closed fd is EBADF (deferred releases run first, as on every entry)."""
        proc = self.owner_process  # type: ignore[attr-defined]
        proc.run_deferred()
        if self.fd < 0:
            raise KvmError(errno.EBADF, op, "file is closed")

    def _desc(self) -> dict[str, Any]:
        """The open file description (``f_flags``, ``f_pos``, ``f_mode``): the file's own, shared
        by every dup of it; a :meth:`reopen` has its own (kept in its slot)."""
        own = getattr(self, "_own_desc", None)
        if own is not None:
            return own  # type: ignore[no-any-return]
        desc: dict[str, Any] = self.__dict__.setdefault("_fops_desc", {})
        return desc

    def _f_flags(self) -> int:
        return int(self._desc().get("f_flags", fa.O_RDWR | fa.O_LARGEFILE))

    def _f_pos(self) -> int:
        return int(self._desc().get("f_pos", 0))

    def _set_pos(self, pos: int) -> None:
        self._desc()["f_pos"] = pos

    def _fmode(self, want: str) -> bool:
        """FMODE_READ/FMODE_WRITE from the access mode the description was opened with."""
        acc = self._f_flags() & 3
        return acc in (0, 2) if want == "read" else acc in (1, 2)

    def _can_odirect(self) -> bool:
        """FMODE_CAN_ODIRECT: neither memfd_create nor KVM_CREATE_GUEST_MEMFD set it; opening a
        memfd again through /proc (shmem_file_open) does."""
        return bool(self._desc().get("can_odirect", False))

    def _i_size(self) -> int:
        return int(self.inode.size if self._is_gmem else self.size)  # type: ignore[attr-defined]

    def _i_mode(self) -> int:
        if self._is_gmem:
            return fa.S_IFREG | 0o600
        return int(self.__dict__.get("_fops_i_mode", fa.S_IFREG | 0o777))

    def _i_ino(self) -> int:
        if self._is_gmem:
            return int(self.inode.ino)  # type: ignore[attr-defined]
        if "_fops_i_ino" not in self.__dict__:
            self.__dict__["_fops_i_ino"] = next(_memfd_inodes)
        return int(self.__dict__["_fops_i_ino"])

    def _i_blocks(self) -> int:
        """512-byte blocks accounted to the inode: shmem charges every page it holds (allocated or
        fallocated); guest_memfd charges none."""
        if self._is_gmem:
            return 0
        return int(self.cache.nr_pages) * (PS // 512)  # type: ignore[attr-defined]

    # --- fcntl ------------------------------------------------------------------------------------
    def fcntl(self, cmd: int, arg: int = 0) -> int:
        cmd, arg = u32(cmd, "cmd"), u64(arg, "arg")
        if cmd in fa.FCNTL_NEW_FD:
            raise ValueError("fcntl(F_DUPFD*) makes an fd with no object to hold it: use dup()")
        self._fops_open("fcntl")
        argi = arg & 0xFFFF_FFFF
        proc = self.owner_process  # type: ignore[attr-defined]
        if cmd == fa.F_GETFD:
            return fa.FD_CLOEXEC if self.fd in proc.fd_cloexec else 0
        if cmd == fa.F_SETFD:
            (proc.fd_cloexec.add if argi & fa.FD_CLOEXEC else proc.fd_cloexec.discard)(self.fd)
            return 0
        if cmd == fa.F_GETFL:
            return self._f_flags()
        if cmd == fa.F_SETFL:
            self._setfl(argi)
            return 0
        if cmd in (fa.F_ADD_SEALS, fa.F_GET_SEALS):
            return self._seals(cmd, argi)
        if cmd in fa.FCNTL_UNMODELLED:
            raise NotImplementedError(f"the model does not implement fcntl command {cmd}")
        raise KvmError(errno.EINVAL, "fcntl", f"unknown command {cmd}")

    def _setfl(self, arg: int) -> None:
        """``setfl``: O_DIRECT needs ``FMODE_CAN_ODIRECT`` (neither file has it), FASYNC needs a
        ``->fasync`` (neither has one: the bit is dropped), the rest of SETFL_MASK is taken."""
        if arg & fa.O_DIRECT and not self._can_odirect():
            raise KvmError(errno.EINVAL, "fcntl(F_SETFL)", "O_DIRECT is not supported by this file")
        flags = self._f_flags()
        self._desc()["f_flags"] = (arg & fa.SETFL_MASK) | (flags & ~fa.SETFL_MASK)

    def _i_seals(self) -> int:
        """The memfd's seals (with the inode): F_SEAL_SEAL unless made with MFD_ALLOW_SEALING."""
        return int(self.__dict__.get("_fops_seals", fa.F_SEAL_SEAL))

    def _seals(self, cmd: int, arg: int) -> int:
        """``memfd_fcntl``: a guest_memfd has no seals at all (EINVAL); a memfd's F_ADD_SEALS wants
        a writable file (EPERM), known bits (EINVAL), no F_SEAL_SEAL yet (EPERM), and for
        F_SEAL_WRITE no writable mapping and no pinned page (EBUSY).  F_SEAL_EXEC on a file with
        exec bits also seals writes and size changes."""
        op = "fcntl(F_ADD_SEALS)" if cmd == fa.F_ADD_SEALS else "fcntl(F_GET_SEALS)"
        if cmd == fa.F_ADD_SEALS and not self._fmode("write"):
            raise KvmError(errno.EPERM, op, "file not open for writing")
        if cmd == fa.F_ADD_SEALS and arg & ~fa.F_ALL_SEALS:
            raise KvmError(errno.EINVAL, op, f"unknown seals {arg:#x}")
        if self._is_gmem:
            raise KvmError(errno.EINVAL, op, "guest_memfd is not a sealable (shmem/hugetlbfs) file")
        seals = self._i_seals()
        if cmd == fa.F_GET_SEALS:
            return seals
        if seals & fa.F_SEAL_SEAL:
            raise KvmError(errno.EPERM, op, "F_SEAL_SEAL is set")
        if arg & fa.F_SEAL_EXEC and self._i_mode() & 0o111:
            arg |= fa.F_SEAL_SHRINK | fa.F_SEAL_GROW | fa.F_SEAL_WRITE | fa.F_SEAL_FUTURE_WRITE
        if arg & fa.F_SEAL_WRITE and not seals & fa.F_SEAL_WRITE:
            proc = self.owner_process  # type: ignore[attr-defined]
            if proc.mapping_count(self) or self.cache.pinned(0, max(self.cache.end_index(), 1)):  # type: ignore[attr-defined]
                raise KvmError(errno.EBUSY, op, "the file is mapped writable or has pinned pages")
        self.__dict__["_fops_seals"] = seals | arg
        return 0

    def _writable_len(self, op: str, pos: int, count: int) -> int:
        """``shmem_write_begin``, page by page: F_SEAL_WRITE/FUTURE_WRITE refuse any write (EPERM);
        F_SEAL_GROW refuses the first page-sized piece that would end past ``i_size``, so a write
        that crosses the end is short, and one that starts there is EPERM."""
        seals = self._i_seals() if not self._is_gmem else 0
        if seals & (fa.F_SEAL_WRITE | fa.F_SEAL_FUTURE_WRITE):
            raise KvmError(errno.EPERM, op, "the file is sealed against writes")
        if not seals & fa.F_SEAL_GROW:
            return count
        size, done = self._i_size(), 0
        while done < count:
            piece = min(PS - (pos + done) % PS, count - done)
            if pos + done + piece > size:
                break
            done += piece
        if done == 0:
            raise KvmError(errno.EPERM, op, "the file is sealed against growing")
        return done

    # --- lseek ------------------------------------------------------------------------------------
    def lseek(self, offset: int, whence: int) -> int:
        offset, whence = s64(offset, "offset"), u32(whence, "whence")
        self._fops_open("lseek")
        if whence > fa.SEEK_MAX:
            raise KvmError(errno.EINVAL, "lseek", f"bad whence {whence}")
        if self._is_gmem:
            raise KvmError(errno.ESPIPE, "lseek", "guest_memfd has no llseek")
        size = self._i_size()
        if whence in (fa.SEEK_DATA, fa.SEEK_HOLE):
            if offset < 0 or offset >= size:
                raise KvmError(errno.ENXIO, "lseek", "offset outside the file")
            pos = self._seek_data_hole(offset, size, whence == fa.SEEK_DATA)
        else:
            if whence == fa.SEEK_END:
                pos = offset + size
            elif whence == fa.SEEK_CUR:
                if offset == 0:
                    return self._f_pos()
                pos = offset + self._f_pos()
            else:
                pos = offset
            if pos < 0 or pos > fa.MAX_LFS_FILESIZE:
                raise KvmError(errno.EINVAL, "lseek", "resulting offset out of range")
        self._set_pos(pos)
        return pos

    def _seek_data_hole(self, offset: int, size: int, data: bool) -> int:
        """``mapping_seek_hole_data``: up-to-date pages are data, everything else (absent or only
        fallocated) is a hole; the end of the file is a hole."""
        cache = self.cache  # type: ignore[attr-defined]
        first, last = offset // PS, (size + PS - 1) // PS
        for s, e in cache.uptodate(first, last):
            if data:
                return max(offset, s * PS)
            if s * PS > offset:
                return offset
            return min(e * PS, size) if e * PS > offset else offset
        if data:
            raise KvmError(errno.ENXIO, "lseek", "no data at or after the offset")
        return offset

    # --- dup --------------------------------------------------------------------------------------
    def dup(self) -> Any:
        """``dup(2)``: a new fd on the same open file: the returned object shares the offset, the
        flags and every other state of this one; the file lives until both are closed."""
        self._fops_open("dup")
        return make_dup(self)

    def reopen(self, flags: int) -> Any:
        """``open("/proc/self/fd/N", flags)``: a new open file description of the same inode (its
        own offset and flags).  guest_memfd cannot be opened that way (ENXIO: its anonymous inode
        has no open path); a memfd can, and then (``shmem_file_open``) with O_DIRECT."""
        flags = fa.check_reopen_flags(flags)
        self.owner_process.run_deferred()  # type: ignore[attr-defined]
        if self.fd < 0:
            raise KvmError(errno.ENOENT, "open", "/proc/self/fd/N: no such fd")
        if self._is_gmem:
            raise KvmError(errno.ENXIO, "open", "guest_memfd cannot be reopened")
        desc = {"f_flags": (flags & ~fa.O_CLOEXEC) | fa.O_LARGEFILE, "f_pos": 0, "can_odirect": True}
        view = make_dup(self, desc)
        if flags & fa.O_CLOEXEC:
            self.owner_process.fd_cloexec.add(view.fd)  # type: ignore[attr-defined]
        return view

    # --- fstat / fstatfs --------------------------------------------------------------------------
    def fstat(self) -> FileStat:
        self._fops_open("fstat")
        return FileStat(st_mode=self._i_mode(), st_size=self._i_size(), st_blocks=self._i_blocks(),
                        st_blksize=PS, st_nlink=1 if self._is_gmem else 0, st_ino=self._i_ino())

    def fstatfs(self) -> FsStat:
        self._fops_open("fstatfs")
        magic = GMEM_FS_MAGIC if self._is_gmem else fa.TMPFS_MAGIC
        return FsStat(f_type=magic, f_bsize=PS, f_blocks=0, f_namelen=255, f_frsize=PS,
                      f_flags=fa.ST_VALID)

    # --- fsync / fchmod ---------------------------------------------------------------------------
    def fsync(self) -> None:
        self._fops_open("fsync")
        if self._is_gmem:
            raise KvmError(errno.EINVAL, "fsync", "guest_memfd has no fsync")

    def fdatasync(self) -> None:
        self._fops_open("fdatasync")
        if self._is_gmem:
            raise KvmError(errno.EINVAL, "fdatasync", "guest_memfd has no fsync")

    def fchmod(self, mode: int) -> None:
        mode = u32(mode, "mode")
        self._fops_open("fchmod")
        if self._is_gmem:
            raise KvmError(errno.EINVAL, "fchmod", "kvm_gmem_setattr refuses every change")
        if self._i_seals() & fa.F_SEAL_EXEC and (mode ^ self._i_mode()) & 0o111:
            raise KvmError(errno.EPERM, "fchmod", "F_SEAL_EXEC: the exec bits cannot change")
        self.__dict__["_fops_i_mode"] = (mode & fa.S_IALLUGO) | (self._i_mode() & ~fa.S_IALLUGO)

    # --- sendfile ---------------------------------------------------------------------------------
    def sendfile(self, in_file: Any, offset: int | None, count: int) -> int:
        """``sendfile(self.fd, in_file.fd, offset, count)`` (``do_sendfile``), in its order of checks."""
        # The integer rule in the order of the signature: the offset, then the count.
        if offset is not None:
            offset = s64(offset, "offset")
        count = u64(count, "count")
        src = resolve_file(self.owner_process, in_file)  # type: ignore[attr-defined]
        op = "sendfile"
        if src is None:
            raise KvmError(errno.EBADF, op, "in_fd is not open")
        if not src._fmode("read"):
            raise KvmError(errno.EBADF, op, "in_fd not open for reading")
        pos = src._f_pos() if offset is None else offset
        if offset is not None and src._is_gmem:
            raise KvmError(errno.ESPIPE, op, "in_fd cannot pread (guest_memfd)")
        verify_rw_area(op, pos, count)
        count = min(count, fa.MAX_RW_COUNT)
        self._fops_open(op)
        if not self._fmode("write"):
            raise KvmError(errno.EBADF, op, "out_fd not open for writing")
        if pos + count > fa.MAX_LFS_FILESIZE:  # both filesystems' s_maxbytes
            if pos >= fa.MAX_LFS_FILESIZE:
                raise KvmError(errno.EOVERFLOW, op, "offset at the maximum file size")
            count = fa.MAX_LFS_FILESIZE - pos
        out_pos = self._f_pos()
        verify_rw_area(op, out_pos, count)
        if self._f_flags() & fa.O_APPEND:
            raise KvmError(errno.EINVAL, op, "out_fd is O_APPEND")
        if src._is_gmem:
            raise KvmError(errno.EINVAL, op, "in_fd cannot splice (guest_memfd is not seekable)")
        if count == 0:
            return 0
        if self._is_gmem:
            if src._read_at(pos, 1):
                raise KvmError(errno.EINVAL, op, "out_fd has no splice_write (guest_memfd)")
            return 0  # nothing read, so nothing to refuse
        n = self._splice_copy(op, src, pos, out_pos, count)
        self._set_pos(out_pos + n)
        if offset is None:
            src._set_pos(pos + n)
        return n

    def _splice_copy(self, op: str, src: ModelFileOps, pos: int, out_pos: int, count: int) -> int:
        """``splice_direct_to_actor`` between two memfds: chunks of at most 16 pipe buffers (page
        pieces) read from ``src`` at ``pos``, each written whole to this file at ``out_pos``.  The
        pipe holds the source's pages themselves, so when both ends are one inode a later byte is
        read after an earlier one was written (a forward copy), while a page that was a hole when
        the chunk was read stays zeros.  A copy within one inode whose destination lies less than a
        page after its source depends on how memcpy moves overlapping bytes: NotImplementedError."""
        same = src.__dict__ is self.__dict__
        dist = out_pos - pos
        if same and 0 < dist < PS and count > dist:
            raise NotImplementedError("sendfile within one memfd to less than a page ahead of the "
                                      "source (overlapping memcpy) is not modelled")
        total = 0
        while total < count:
            size = src._i_size()
            if pos + total >= size:
                break
            at = pos + total
            n = min(count - total, size - at, (PS - at % PS) + 15 * PS)
            try:
                allowed = self._writable_len(op, out_pos + total, n)
            except KvmError:
                if total:
                    break  # what was copied stays copied: the count so far is returned
                raise
            holes = src.cache.holes(at // PS, (at + n + PS - 1) // PS)  # type: ignore[attr-defined]
            step = dist if same and 0 < dist < allowed else allowed
            done = 0
            while done < allowed:
                piece = min(step, allowed - done)
                data = bytearray(src._read_at(at + done, piece))
                for hs, he in holes:  # read as ZERO_PAGE when the chunk was taken
                    lo, hi = max(hs * PS, at + done), min(he * PS, at + done + piece)
                    if lo < hi:
                        data[lo - at - done : hi - at - done] = bytes(hi - lo)
                self._write_at(out_pos + total + done, bytes(data))
                done += piece
            total += allowed
            if allowed < n:
                break
        return total

    # --- read/write on a memfd (guest_memfd overrides them) ---------------------------------------
    def read(self, length: int, offset: int | None = None) -> bytes:
        op = "read" if offset is None else "pread"
        length = u64(length, "length")
        if offset is not None and s64(offset, "offset") < 0:
            raise KvmError(errno.EINVAL, op, "negative offset")  # ksys_pread64, before the fd
        self._fops_open(op)
        if not self._fmode("read"):
            raise KvmError(errno.EBADF, op, "file not open for reading")
        pos = self._f_pos() if offset is None else s64(offset, "offset")
        length = min(length, fa.MAX_RW_COUNT)  # what a buffer could hold: the backends clamp alike
        verify_rw_area(op, pos, length)
        data = self._read_at(pos, length)
        if offset is None:
            self._set_pos(pos + len(data))
        return data

    def write(self, data: Any, offset: int | None = None) -> int:
        op = "write" if offset is None else "pwrite"
        buf = as_bytes(data, "data")
        if offset is not None and s64(offset, "offset") < 0:
            raise KvmError(errno.EINVAL, op, "negative offset")
        self._fops_open(op)
        if not self._fmode("write"):
            raise KvmError(errno.EBADF, op, "file not open for writing")
        count = len(buf)
        pos = self._f_pos() if offset is None else s64(offset, "offset")
        verify_rw_area(op, pos, count)
        count = min(count, fa.MAX_RW_COUNT)
        if self._f_flags() & fa.O_APPEND:
            pos = self._i_size()  # even pwrite appends on an O_APPEND file (Linux)
        if count == 0:
            return 0
        if pos >= fa.MAX_LFS_FILESIZE:
            raise KvmError(errno.EFBIG, op, "offset at the maximum file size")
        count = min(count, fa.MAX_LFS_FILESIZE - pos)
        count = self._writable_len(op, pos, count)
        n = self._write_at(pos, bytes(buf[:count]))
        if offset is None:
            self._set_pos(pos + n)
        return n

    def _read_at(self, pos: int, count: int) -> bytes:
        """shmem_file_read_iter: up to EOF; holes and not-up-to-date pages read as zeros."""
        size = self._i_size()
        if pos >= size or count == 0:
            return b""
        return bytes(self.cache.read(pos, min(count, size - pos)))  # type: ignore[attr-defined]

    def _write_at(self, pos: int, data: bytes) -> int:
        """shmem_file_write_iter at ``pos``: allocates the pages, marks them up to date, and grows
        ``i_size`` to cover what was written."""
        end = pos + len(data)
        if end > self._i_size():
            self.size = end  # i_size grows (a memfd: ShmemBacking.size)
        self.cache.write(pos, data, order=self.folio_order,  # type: ignore[attr-defined]
                         limit=(end + PS - 1) // PS)
        return len(data)

    # --- the generic ioctls (the raw escape hatch's file part) ------------------------------------
    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        from guestmem.model.kvm.rawioctl import file_ioctl

        return file_ioctl(self, request, arg)


def verify_rw_area(op: str, pos: int, count: int) -> None:
    """``rw_verify_area``: a count that is negative as ``ssize_t``, a negative position, or one the
    count would carry past ``LLONG_MAX`` is EINVAL (these files have no FMODE_UNSIGNED_OFFSET)."""
    if count >= 1 << 63 or pos < 0 or pos + count >= 1 << 63:
        raise KvmError(errno.EINVAL, op, "bad position or count")


def resolve_file(process: Any, obj: Any) -> ModelFileOps | None:
    """The open model file behind ``obj`` (a file object of this interface, or an fd number), or
    None where the kernel's ``fdget`` would find nothing.  Anything else is a TypeError.  (An fd
    number resolves to the file the fd table holds, whose description a dup shares; pass the
    object of a :meth:`ModelFileOps.reopen` to use its own offset and flags.)"""
    if isinstance(obj, ModelFileOps):
        return obj if obj.fd >= 0 else None
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise TypeError(f"in_file must be a GuestMemfd, HostFile or fd, not {type(obj).__name__}")
    fd = s64(obj, "in_file")
    found = process.fget(fd) if 0 <= fd < 1 << 31 else None
    if found is None:
        return None
    if not isinstance(found, ModelFileOps):
        raise NotImplementedError(f"sendfile from fd {fd} ({type(found).__name__}) is not modelled")
    return found


# --- dup: a second fd on the same struct file ----------------------------------------------------------
_dup_classes: dict[type, type] = {}


def _dup_close(self: Any) -> None:
    fd = self._dup_fd
    if fd >= 0:
        self._dup_fd = -1
        proc = self._dup_of.owner_process
        proc.close_fd(fd)
        proc.fd_cloexec.discard(fd)
        self._dup_of.put_file()


def _dup_class(cls: type) -> type:
    """A subclass of ``cls`` whose instances share a file's state but have their own fd number
    (kept in a slot, outside the shared ``__dict__``)."""
    if cls not in _dup_classes:
        def get_fd(self: Any) -> int:
            return int(self._dup_fd)

        def set_fd(self: Any, value: int) -> None:
            self._dup_fd = value

        ns = {"__slots__": ("_dup_fd", "_dup_of", "_own_desc"), "fd": property(get_fd, set_fd),
              "close": _dup_close,
              "__doc__": f"A dup(2) or reopen of a {cls.__name__}: its own fd, the inode shared."}
        _dup_classes[cls] = type(cls.__name__, (cls,), ns)
    return _dup_classes[cls]


def make_dup(file: Any, desc: dict[str, Any] | None = None) -> Any:
    """Install ``file``'s struct file at a new fd (close-on-exec clear, as ``dup`` gives) and return
    an object of the same class for it.  The fd table maps the new fd to the original file, so every
    ``fget`` (e.g. binding a memslot by fd) finds the one struct file.  ``desc`` gives the new fd
    its own open file description (a reopen); by default it shares ``file``'s."""
    orig = getattr(file, "_dup_of", file)
    if desc is None:
        desc = getattr(file, "_own_desc", None)
    proc = orig.owner_process
    fd = proc.install(orig)
    proc.fd_cloexec.discard(fd)
    orig.get_file()
    cls = _dup_class(type(orig))
    view: Any = object.__new__(cls)
    view.__dict__ = orig.__dict__
    view._dup_of = orig
    view._dup_fd = fd
    view._own_desc = desc
    return view
