"""The host-behaviour catalogue's second half: the calls issue #11 §1 added to the interface.

Why a module of its own: :mod:`guestmem.conformance_record` recorded what the interface could say
before it had file syscalls, a raw ioctl, mmap prot/flags, mprotect, madvise, NUMA policy, fork and
the dirty log; each of those was a line in its ``INEXPRESSIBLE`` list.  This module generates the
behaviours for them, in the same style (small functions over :mod:`guestmem.api` returning plain
JSON), so the recorded corpus now holds what the real kernel does with each of them and the twin
has to agree.  :func:`behaviours` is appended to the catalogue in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from guestmem import fileabi as fa
from guestmem import mman as mm
from guestmem import uapi as u
from guestmem.api import Kvm
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Program, Sync, Write

PS = u.PAGE_SIZE
SZ_2M = 2 << 20
GIB4 = 1 << 32
MMAP = u.GUEST_MEMFD_FLAG_MMAP
SHARED = u.GUEST_MEMFD_FLAG_INIT_SHARED
Outcome = Any
Add = Callable[[str, str, Callable[[Kvm], Outcome]], None]


def result(fn: Callable[[], Outcome]) -> Outcome:
    """``fn()``'s result (``"ok"`` for None), or what it raised by name: the errno, the signal a
    CPU access would take (SIGBUS/SIGSEGV), or the Python exception the interface raises before
    any call (TypeError, ValueError, OverflowError; NotImplementedError where the model has no
    rule, which then shows as a disagreement)."""
    from guestmem.conformance_record import errno_name

    try:
        value = fn()
    except GuestAccessFault as err:
        return err.signal
    except KvmError as err:
        return errno_name(err.errno)
    except (TypeError, ValueError, OverflowError, NotImplementedError) as err:
        return type(err).__name__
    return "ok" if value is None else value


def _hex1(m: Any, offset: int = 0) -> Outcome:
    return result(lambda: m.read(offset, 1).hex())


# --- files: a guest_memfd (plain and mappable) and a memfd ------------------------------------------

FILES = ("gmem", "gmem-mmap", "memfd")


def _open_file(kvm: Kvm, st: ExitStack, kind: str, memfd_flags: int = fa.MFD_CLOEXEC) -> Any:
    """A 2 MiB file of ``kind`` (a memfd has its second page written with 0x5A)."""
    if kind == "memfd":
        f = kvm.memfd_create(SZ_2M, memfd_flags)
        st.callback(f.close)
        f.write(b"\x5a" * PS, PS)
        return f
    vm = st.enter_context(kvm.create_vm())
    return st.enter_context(vm.create_guest_memfd(SZ_2M, MMAP | SHARED if kind == "gmem-mmap" else 0))


def _on_file(kind: str, body: Callable[[Any, Kvm, ExitStack], Outcome],
             memfd_flags: int = fa.MFD_CLOEXEC) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            return body(_open_file(kvm, st, kind, memfd_flags), kvm, st)
    return run


FCNTL_CASES: list[tuple[str, int, int]] = [
    ("getfd", fa.F_GETFD, 0), ("setfd-cloexec", fa.F_SETFD, fa.FD_CLOEXEC), ("setfd-0", fa.F_SETFD, 0),
    ("setfd-junk", fa.F_SETFD, 0xFE), ("getfl", fa.F_GETFL, 0), ("get-seals", fa.F_GET_SEALS, 0),
    ("unknown-cmd", 9999, 0), ("negative-cmd", -1, 0),
]
SETFL_FLAGS = [0, fa.O_APPEND, fa.O_NONBLOCK, fa.O_DIRECT, fa.O_NOATIME, fa.FASYNC,
               fa.O_APPEND | fa.O_NONBLOCK, fa.O_RDWR, fa.O_CLOEXEC]
SEALS = [fa.F_SEAL_SEAL, fa.F_SEAL_SHRINK, fa.F_SEAL_GROW, fa.F_SEAL_WRITE, fa.F_SEAL_FUTURE_WRITE,
         fa.F_SEAL_EXEC, fa.F_ALL_SEALS, 0, 0x40]
WHENCES = [fa.SEEK_SET, fa.SEEK_CUR, fa.SEEK_END, fa.SEEK_DATA, fa.SEEK_HOLE, 5, -1]
SEEK_OFFSETS = [0, 1, PS, 2 * PS, SZ_2M, SZ_2M + PS, -1, -SZ_2M]


def _fcntl(cmd: int, arg: int) -> Callable[[Any, Kvm, ExitStack], Outcome]:
    def body(f: Any, kvm: Kvm, st: ExitStack) -> Outcome:
        return [result(lambda: f.fcntl(cmd, arg)), result(lambda: f.fcntl(fa.F_GETFD)),
                result(lambda: f.fcntl(fa.F_GETFL))]
    return body


def _setfl(flags: int) -> Callable[[Any, Kvm, ExitStack], Outcome]:
    def body(f: Any, kvm: Kvm, st: ExitStack) -> Outcome:
        return [result(lambda: f.fcntl(fa.F_SETFL, flags)), result(lambda: f.fcntl(fa.F_GETFL))]
    return body


def _seal(seal: int) -> Callable[[Any, Kvm, ExitStack], Outcome]:
    """Add ``seal``, then what each sealed operation does."""
    def body(f: Any, kvm: Kvm, st: ExitStack) -> Outcome:
        out = [result(lambda: f.fcntl(fa.F_ADD_SEALS, seal)), result(lambda: f.fcntl(fa.F_GET_SEALS))]
        out.append(result(lambda: f.write(b"w", 0)))
        out.append(result(lambda: f.fcntl(fa.F_ADD_SEALS, fa.F_SEAL_SHRINK)))

        def shared_map() -> Outcome:
            with kvm.mmap(PS, mm.PROT_READ | mm.PROT_WRITE, mm.MAP_SHARED, f) as m:
                return m.length
        out.append(result(shared_map))
        if hasattr(f, "truncate"):
            out += [result(lambda: f.truncate(PS)), result(lambda: f.truncate(4 * SZ_2M))]
        return out
    return body


def _lseek(offset: int, whence: int) -> Callable[[Any, Kvm, ExitStack], Outcome]:
    def body(f: Any, kvm: Kvm, st: ExitStack) -> Outcome:
        return [result(lambda: f.lseek(offset, whence)), result(lambda: f.lseek(0, fa.SEEK_CUR))]
    return body


def _file_misc(what: str) -> Callable[[Any, Kvm, ExitStack], Outcome]:
    def body(f: Any, kvm: Kvm, st: ExitStack) -> Outcome:
        if what == "fstat":
            s = f.fstat()
            return [oct(s.st_mode), s.st_size, s.st_blocks, s.st_blksize, s.st_nlink]
        if what == "fstatfs":
            s = f.fstatfs()
            return [hex(s.f_type), s.f_bsize, s.f_namelen, s.f_frsize]
        if what == "fsync":
            return [result(f.fsync), result(f.fdatasync)]
        if what.startswith("fchmod="):
            mode = int(what.split("=")[1], 8)
            return [result(lambda: f.fchmod(mode)), oct(f.fstat().st_mode)]
        if what == "dup-shares-offset-and-flags":
            d = f.dup()
            st.callback(d.close)
            return [result(lambda: d.fcntl(fa.F_SETFL, fa.O_APPEND)), result(lambda: f.fcntl(fa.F_GETFL)),
                    result(lambda: f.fcntl(fa.F_SETFD, fa.FD_CLOEXEC)), result(lambda: d.fcntl(fa.F_GETFD)),
                    result(lambda: d.lseek(PS, fa.SEEK_SET)), result(lambda: f.lseek(0, fa.SEEK_CUR)),
                    d.fd != f.fd]
        if what == "dup-outlives-original":
            d = f.dup()
            st.callback(d.close)
            f.close()
            return [result(lambda: d.read(2, PS).hex()), result(lambda: d.fstat().st_size),
                    result(lambda: f.fstat().st_size)]
        if what.startswith("reopen="):
            flags = int(what.split("=")[1], 8)

            def go() -> Outcome:
                r = f.reopen(flags)
                st.callback(r.close)
                return [result(lambda: r.fcntl(fa.F_GETFL)), result(lambda: r.read(2, PS).hex()),
                        result(lambda: r.write(b"\x01" * 512, 0)), result(lambda: r.lseek(0, fa.SEEK_CUR))]
            return result(go)
        if what == "read-write-position":
            return [result(lambda: f.write(b"ab")), result(lambda: f.lseek(0, fa.SEEK_CUR)),
                    result(lambda: f.read(3, 0).hex()), result(lambda: f.read(2).hex())]
        if what == "append-write":
            return [result(lambda: f.fcntl(fa.F_SETFL, fa.O_APPEND)), result(lambda: f.write(b"z")),
                    result(lambda: f.write(b"y", 0)), result(lambda: f.fstat().st_size)]
        if what == "closed":
            f.close()
            return [result(lambda: f.fcntl(fa.F_GETFD)), result(lambda: f.lseek(0, 0)), result(f.dup),
                    result(lambda: f.fstat()), result(lambda: f.fstatfs()), result(f.fsync),
                    result(lambda: f.fchmod(0o600)), result(lambda: f.read(1, 0)),
                    result(lambda: f.ioctl(fa.FIONREAD, bytes(4))), result(lambda: f.reopen(fa.O_RDWR))]
        raise ValueError(what)
    return body


def _sendfile(out_kind: str, in_kind: str, offset: int | None, count: int) -> Callable[[Kvm], Outcome]:
    """sendfile(out, in, offset, count) between two files of the given kinds ("closed": a closed fd)."""
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            out = _open_file(kvm, st, out_kind)
            if in_kind == "closed":
                dead = kvm.memfd_create(PS)
                src: Any = dead.fd
                dead.close()
            else:
                src = _open_file(kvm, st, in_kind)
            got = result(lambda: out.sendfile(src, offset, count))
            pos = [result(lambda: out.lseek(0, fa.SEEK_CUR))]
            if not isinstance(src, int):
                pos.append(result(lambda: src.lseek(0, fa.SEEK_CUR)))
            return [got, pos, result(lambda: out.read(2, 0).hex())]
    return run


VFS_IOCTLS: list[tuple[str, int, Any]] = [
    ("FIONREAD", fa.FIONREAD, bytes(4)), ("FIGETBSZ", fa.FIGETBSZ, bytes(4)),
    ("FIOQSIZE", fa.FIOQSIZE, bytes(8)), ("FIOCLEX", fa.FIOCLEX, 0), ("FIONCLEX", fa.FIONCLEX, 0),
    ("FIONBIO", fa.FIONBIO, b"\x01\0\0\0"), ("FIONREAD-null", fa.FIONREAD, 0),
]


def _file_behaviours(add: Add) -> None:
    for kind in FILES:
        for name, cmd, arg in FCNTL_CASES:
            add(f"file2/{kind}/fcntl/{name}", "file", _on_file(kind, _fcntl(cmd, arg)))
        for flags in SETFL_FLAGS:
            add(f"file2/{kind}/fcntl/setfl={flags:#o}", "file", _on_file(kind, _setfl(flags)))
        for whence in WHENCES:
            for off in SEEK_OFFSETS:
                add(f"file2/{kind}/lseek/whence={whence}/offset={off:#x}", "file",
                    _on_file(kind, _lseek(off, whence)))
        for what in ["fstat", "fstatfs", "fsync", "fchmod=600", "fchmod=777", "fchmod=4777",
                     "dup-shares-offset-and-flags", "dup-outlives-original", "reopen=2", "reopen=0",
                     f"reopen={fa.O_RDWR | fa.O_DIRECT:o}", f"reopen={fa.O_RDWR | fa.O_APPEND:o}",
                     "read-write-position", "append-write", "closed"]:
            add(f"file2/{kind}/{what}", "file", _on_file(kind, _file_misc(what)))
        for name, req, arg in VFS_IOCTLS:
            def vfs(f: Any, kvm: Kvm, st: ExitStack, req: int = req, arg: Any = arg) -> Outcome:
                return [result(lambda: list(_ioctl_shape(f.ioctl(req, arg)))),
                        result(lambda: f.fcntl(fa.F_GETFD)), result(lambda: f.fcntl(fa.F_GETFL))]
            add(f"file2/{kind}/ioctl/{name}", "file", _on_file(kind, vfs))
    for seal in SEALS:
        for memfd_flags in (fa.MFD_CLOEXEC, fa.MFD_CLOEXEC | fa.MFD_ALLOW_SEALING):
            add(f"file2/memfd/flags={memfd_flags:#x}/seal={seal:#x}", "file",
                _on_file("memfd", _seal(seal), memfd_flags))
        add(f"file2/gmem/seal={seal:#x}", "file", _on_file("gmem-mmap", _seal(seal)))
    for flags in [0, 2, 8, 0x10, 0x18, 0x20, 0x40, -1]:
        def create(k: Kvm, flags: int = flags) -> Outcome:
            def go() -> Outcome:
                f = k.memfd_create(PS, flags)
                try:
                    return [f.fcntl(fa.F_GET_SEALS), oct(f.fstat().st_mode & 0o777)]
                finally:
                    f.close()
            return result(go)
        add(f"file2/memfd_create/flags={flags:#x}", "file", create)
    for out_kind in FILES:
        for in_kind in (*FILES, "closed"):
            for offset, count in [(None, PS), (0, PS), (PS, 3), (None, 0), (SZ_2M, PS), (SZ_2M - 1, PS)]:
                add(f"file2/sendfile/{in_kind}-to-{out_kind}/offset={offset}/count={count}", "file",
                    _sendfile(out_kind, in_kind, offset, count))


def _ioctl_shape(res: tuple[int, bytes]) -> tuple[int, str]:
    ret, buf = res
    return ret, buf.hex()


# --- raw ioctls on every fd ---------------------------------------------------------------------------

FDS = ("kvm", "vm", "vcpu", "gmem", "memfd")


def _fd_object(kvm: Kvm, st: ExitStack, which: str) -> Any:
    if which == "kvm":
        return kvm
    vm = st.enter_context(kvm.create_vm())
    if which == "vm":
        return vm
    if which == "vcpu":
        v = vm.create_vcpu(0)
        st.callback(v.close)
        return v
    if which == "gmem":
        return st.enter_context(vm.create_guest_memfd(SZ_2M, 0))
    f = kvm.memfd_create(SZ_2M)
    st.callback(f.close)
    return f


def _region2(slot: int = 1, flags: int = 0, gpa: int = GIB4, size: int = 0, hva: int = 0) -> bytes:
    r = u.kvm_userspace_memory_region2(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size,
                                       userspace_addr=hva)
    return bytes(r)


RAW_IOCTLS: list[tuple[str, int, Any]] = [
    ("GET_API_VERSION", u.KVM_GET_API_VERSION, 0),
    ("GET_API_VERSION-arg", u.KVM_GET_API_VERSION, 7),
    ("CHECK_EXTENSION-USER_MEMORY", u.KVM_CHECK_EXTENSION, 3),
    ("CHECK_EXTENSION-GUEST_MEMFD", u.KVM_CHECK_EXTENSION, u.KVM_CAP_GUEST_MEMFD),
    ("GET_VCPU_MMAP_SIZE", u.KVM_GET_VCPU_MMAP_SIZE, 0),
    ("GET_REGS-null", u.KVM_GET_REGS, 0),
    ("SET_USER_MEMORY_REGION2-delete-absent", u.KVM_SET_USER_MEMORY_REGION2, _region2()),
    ("SET_USER_MEMORY_REGION2-null", u.KVM_SET_USER_MEMORY_REGION2, 0),
    ("SET_USER_MEMORY_REGION2-junk", u.KVM_SET_USER_MEMORY_REGION2, b"\xff" * 160),
    ("SET_USER_MEMORY_REGION2-unaligned", u.KVM_SET_USER_MEMORY_REGION2, _region2(size=PS, hva=1)),
    ("SET_USER_MEMORY_REGION2-short", u.KVM_SET_USER_MEMORY_REGION2, bytes(16)),
    ("SET_USER_MEMORY_REGION2-str", u.KVM_SET_USER_MEMORY_REGION2, "x"),
    ("CREATE_GUEST_MEMFD-zero", u.KVM_CREATE_GUEST_MEMFD, bytes(64)),
    ("CREATE_GUEST_MEMFD-junk-flags", u.KVM_CREATE_GUEST_MEMFD,
     bytes(u.kvm_create_guest_memfd(size=PS, flags=1 << 40))),
    ("SET_MEMORY_ATTRIBUTES-zero", u.KVM_SET_MEMORY_ATTRIBUTES, bytes(32)),
    ("KVMIO-unknown-nr", (0xAE << 8) | 0xFF, 0),
    ("KVMIO-wrong-size", u._iow(0x49, 8), bytes(8)),
    ("other-type", 0x12345678 & ~(3 << 30), 0),
    ("zero", 0, 0),
    ("all-ones", 0xFFFFFFFF & ~(0x3FFF << 16), 0),
]


def _raw(which: str, request: int, arg: Any) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            obj = _fd_object(kvm, st, which)
            return result(lambda: list(_ioctl_shape(obj.ioctl(request, arg))))
    return run


def _raw_behaviours(add: Add) -> None:
    for which in FDS:
        for name, req, arg in RAW_IOCTLS:
            add(f"ioctl/{which}/{name}", "ioctl", _raw(which, req, arg))

    def closed(kvm: Kvm) -> Outcome:
        vm = kvm.create_vm()
        vm.close()
        return result(lambda: vm.ioctl(u.KVM_CHECK_EXTENSION, 3))
    add("ioctl/vm/closed", "ioctl", closed)


# --- mmap prot x flags x backing, mprotect, madvise ----------------------------------------------------

BACKINGS = ("anon", "memfd", "gmem-shared", "gmem-noshared", "gmem-plain")
PROTS = [mm.PROT_NONE, mm.PROT_READ, mm.PROT_WRITE, mm.PROT_READ | mm.PROT_WRITE,
         mm.PROT_READ | mm.PROT_WRITE | mm.PROT_EXEC, 0x8, mm.PROT_GROWSDOWN | mm.PROT_READ]
# (0x4000000 is a MAP_HUGE_* size bit: legal under MAP_SHARED_VALIDATE on x86-64.)
MAP_FLAGS = [mm.MAP_SHARED, mm.MAP_PRIVATE, mm.MAP_SHARED_VALIDATE, mm.MAP_SHARED_VALIDATE | 0x4000000,
             0, mm.MAP_TYPE, mm.MAP_SHARED | mm.MAP_POPULATE, mm.MAP_PRIVATE | mm.MAP_POPULATE,
             mm.MAP_SHARED | mm.MAP_NORESERVE, mm.MAP_SHARED_VALIDATE | mm.MAP_SYNC,
             mm.MAP_FIXED | mm.MAP_SHARED]


def _backing_fd(kvm: Kvm, st: ExitStack, backing: str) -> Any:
    """The file behind ``backing`` (None: anonymous), its first page holding 0x5A where it can."""
    if backing == "anon":
        return None
    if backing == "memfd":
        f = kvm.memfd_create(SZ_2M)
        st.callback(f.close)
        f.write(b"\x5a" * PS, 0)
        return f
    vm = st.enter_context(kvm.create_vm())
    flags = {"gmem-shared": MMAP | SHARED, "gmem-noshared": MMAP, "gmem-plain": 0}[backing]
    g = st.enter_context(vm.create_guest_memfd(SZ_2M, flags))
    if backing == "gmem-shared":
        with g.mmap(PS) as m:
            m.fill(0, PS, 0x5A)
    return g


def _map(kvm: Kvm, st: ExitStack, backing: str, length: int, prot: int, flags: int, fd: Any) -> Any:
    if fd is None:
        flags |= mm.MAP_ANONYMOUS
    return st.enter_context(kvm.mmap(length, prot, flags, fd, 0))


def _mmap_case(backing: str, prot: int, flags: int) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)

            def go() -> Outcome:
                m = _map(kvm, st, backing, 2 * PS, prot, flags, fd)
                return [m.length, _hex1(m), result(lambda: m.write(0, b"\x21")), _hex1(m)]
            return result(go)
    return run


def _mmap_args(backing: str, what: str) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            anon = mm.MAP_ANONYMOUS if fd is None else 0
            if what == "offset-unaligned":
                return result(lambda: kvm.mmap(PS, 3, mm.MAP_SHARED | anon, fd, 1).close())
            if what == "offset-past-eof":
                def past() -> Outcome:
                    with kvm.mmap(PS, 3, mm.MAP_SHARED | anon, fd, 4 * SZ_2M) as m:
                        return _hex1(m)
                return result(past)
            if what == "length-0":
                return result(lambda: kvm.mmap(0, 3, mm.MAP_SHARED | anon, fd, 0).close())
            if what == "length-huge":
                return result(lambda: kvm.mmap(1 << 62, 3, mm.MAP_SHARED | anon, fd, 0).close())
            if what == "closed-fd":
                if fd is None:
                    return "n/a"
                fd.close()
                return result(lambda: kvm.mmap(PS, 3, mm.MAP_SHARED, fd.fd, 0).close())
            raise ValueError(what)
    return run


MPROTECT_PROTS = [mm.PROT_NONE, mm.PROT_READ, mm.PROT_READ | mm.PROT_WRITE,
                  mm.PROT_READ | mm.PROT_WRITE | mm.PROT_EXEC, mm.PROT_WRITE, 0x8, -1]


def _mprotect(backing: str, shared: bool, prot: int) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            flags = mm.MAP_SHARED if shared else mm.MAP_PRIVATE
            m = _map(kvm, st, backing, 2 * PS, mm.PROT_READ, flags, fd)
            return [result(lambda: m.mprotect(0, PS, prot)), _hex1(m), result(lambda: m.write(0, b"\x33")),
                    _hex1(m), _hex1(m, PS), result(lambda: m.write(PS, b"\x33"))]
    return run


def _mprotect_range(what: str) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            m = _map(kvm, st, "anon", 2 * PS, 3, mm.MAP_PRIVATE, None)
            if what == "unaligned":
                return result(lambda: m.mprotect(1, PS, 1))
            if what == "length-0":
                return [result(lambda: m.mprotect(0, 0, 0)), result(lambda: m.write(0, b"x"))]
            if what == "length-rounds-up":
                return [result(lambda: m.mprotect(0, 1, 1)), result(lambda: m.write(0, b"x")),
                        result(lambda: m.write(PS, b"x"))]
            if what == "past-end":
                return [result(lambda: m.mprotect(0, 3 * PS, 1)), result(lambda: m.write(0, b"x"))]
            if what == "closed":
                m.close()
                return result(lambda: m.mprotect(0, PS, 1))
            raise ValueError(what)
    return run


MADVICES = [mm.MADV_NORMAL, mm.MADV_RANDOM, mm.MADV_SEQUENTIAL, mm.MADV_WILLNEED, mm.MADV_DONTNEED,
            mm.MADV_FREE, mm.MADV_REMOVE, mm.MADV_DONTFORK, mm.MADV_DOFORK, mm.MADV_HUGEPAGE,
            mm.MADV_NOHUGEPAGE,
            mm.MADV_POPULATE_READ, mm.MADV_POPULATE_WRITE, mm.MADV_COLLAPSE, 12, 100, -1]


def _madvise(backing: str, shared: bool, advice: int) -> Callable[[Kvm], Outcome]:
    """Write 0x33 to the first page through the mapping (where it can), advise both pages, read."""
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            m = _map(kvm, st, backing, 2 * PS, 3, mm.MAP_SHARED if shared else mm.MAP_PRIVATE, fd)
            wrote = result(lambda: m.write(0, b"\x33"))
            return [wrote, result(lambda: m.madvise(0, 2 * PS, advice)), _hex1(m), _hex1(m, PS)]
    return run


def _mmap_fixed(backing: str, prot: int, flags: int) -> Callable[[Kvm], Outcome]:
    """Reserve four PROT_NONE pages, map ``backing`` fixed over pages 1-2 (how a VMM aligns guest
    RAM), access it through both objects, then unmap the piece: what is left there."""
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            reserve = _map(kvm, st, "anon", 4 * PS, mm.PROT_NONE, mm.MAP_PRIVATE, None)
            anon = mm.MAP_ANONYMOUS if fd is None else 0

            def place() -> Any:
                return reserve.mmap_fixed(PS, 2 * PS, prot, flags | anon, fd, 0)
            piece = result(place)
            if isinstance(piece, str):
                return piece
            out = [_hex1(reserve, PS), _hex1(piece), result(lambda: reserve.write(PS, b"\x44")),
                   _hex1(piece), _hex1(reserve, 0), _hex1(reserve, 3 * PS),
                   result(lambda: reserve.mprotect(PS, PS, mm.PROT_READ)),
                   result(lambda: piece.write(0, b"y"))]
            piece.close()
            out += [_hex1(reserve, PS), result(lambda: reserve.mmap_fixed(0, 5 * PS, 3, mm.MAP_SHARED | anon,
                                                                          fd, 0))]
            return out
    return run


def _map_behaviours(add: Add) -> None:
    for backing in BACKINGS:
        for prot in (mm.PROT_READ, mm.PROT_READ | mm.PROT_WRITE, mm.PROT_READ | mm.PROT_EXEC):
            for flags in (mm.MAP_SHARED, mm.MAP_PRIVATE):
                add(f"mmap_fixed/{backing}/prot={prot:#x}/flags={flags:#x}", "mmap",
                    _mmap_fixed(backing, prot, flags))
    for backing in BACKINGS:
        for prot in PROTS:
            for flags in MAP_FLAGS:
                add(f"mmap2/{backing}/prot={prot:#x}/flags={flags:#x}", "mmap",
                    _mmap_case(backing, prot, flags))
        for what in ["offset-unaligned", "offset-past-eof", "length-0", "length-huge", "closed-fd"]:
            add(f"mmap2/{backing}/{what}", "mmap", _mmap_args(backing, what))
    for backing in ("anon", "memfd", "gmem-shared"):
        for shared in (True, False):
            if backing.startswith("gmem") and not shared:
                continue
            kind = "shared" if shared else "private"
            for prot in MPROTECT_PROTS:
                add(f"mprotect/{backing}/{kind}/prot={prot:#x}", "mmap", _mprotect(backing, shared, prot))
    for what in ["unaligned", "length-0", "length-rounds-up", "past-end", "closed"]:
        add(f"mprotect/{what}", "mmap", _mprotect_range(what))
    for backing in ("anon", "memfd", "gmem-shared", "gmem-noshared"):
        for shared in (True, False):
            if backing.startswith("gmem") and not shared:
                continue
            kind = "shared" if shared else "private"
            for advice in MADVICES:
                add(f"madvise/{backing}/{kind}/advice={advice}", "mmap", _madvise(backing, shared, advice))


# --- NUMA on this host ---------------------------------------------------------------------------------

POLICY_MODES = [mm.MPOL_DEFAULT, mm.MPOL_PREFERRED, mm.MPOL_BIND, mm.MPOL_INTERLEAVE, mm.MPOL_LOCAL,
                mm.MPOL_PREFERRED_MANY, mm.MPOL_WEIGHTED_INTERLEAVE, 7, mm.MPOL_BIND | mm.MPOL_F_STATIC_NODES,
                mm.MPOL_BIND | mm.MPOL_F_STATIC_NODES | mm.MPOL_F_RELATIVE_NODES,
                mm.MPOL_INTERLEAVE | mm.MPOL_F_NUMA_BALANCING]
NODEMASKS: list[int | None] = [None, 0, 1, 2, 3, 1 << 1023, 1 << 1024]


def _numa(backing: str, mode: int, nodemask: int | None, flags: int) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            m = _map(kvm, st, backing, 2 * PS, 3, mm.MAP_SHARED, fd)
            got = result(lambda: m.mbind(0, 2 * PS, mode, nodemask, 2048, flags))
            return [got, result(lambda: list(m.get_mempolicy(0))), result(lambda: m.page_nodes(0, 2)),
                    result(lambda: list(m.get_mempolicy(0, mm.MPOL_F_ADDR | mm.MPOL_F_NODE)))]
    return run


def _numa_behaviours(add: Add) -> None:
    add("numa/nodes", "numa", lambda k: k.numa_nodes())
    for mode in POLICY_MODES:
        for mask in NODEMASKS:
            def task(k: Kvm, mode: int = mode, mask: int | None = mask) -> Outcome:
                return result(lambda: k.set_mempolicy(mode, mask, 2048))
            add(f"numa/set_mempolicy/mode={mode:#x}/nodemask={mask if mask is None else hex(mask)}",
                "numa", task)
    for backing in ("anon", "memfd", "gmem-shared"):
        for mode in POLICY_MODES:
            for mask in (None, 1, 2):
                add(f"numa/mbind/{backing}/mode={mode:#x}/nodemask={mask}", "numa",
                    _numa(backing, mode, mask, 0))
        for flags in [mm.MPOL_MF_STRICT, mm.MPOL_MF_MOVE, mm.MPOL_MF_MOVE_ALL, 8]:
            add(f"numa/mbind/{backing}/bind-node0/flags={flags:#x}", "numa",
                _numa(backing, mm.MPOL_BIND, 1, flags))

    def ranges(k: Kvm) -> Outcome:
        with ExitStack() as st:
            m = _map(k, st, "anon", 2 * PS, 3, mm.MAP_SHARED, None)
            return [result(lambda: m.mbind(1, PS, mm.MPOL_BIND, 1)),
                    result(lambda: m.mbind(0, 4 * PS, mm.MPOL_BIND, 1)),
                    result(lambda: m.mbind(0, 0, mm.MPOL_BIND, 1)),
                    result(lambda: m.page_nodes(0, 3)), result(lambda: list(m.get_mempolicy(3 * PS)))]
    add("numa/ranges", "numa", ranges)


# --- fork ------------------------------------------------------------------------------------------------


def _fork(backing: str, shared: bool) -> Callable[[Kvm], Outcome]:
    """Parent writes 0x11, child reads and writes 0x22, parent reads; then the child's view of a
    mapping made after the fork."""
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            m = _map(kvm, st, backing, 2 * PS, 3, mm.MAP_SHARED if shared else mm.MAP_PRIVATE, fd)
            out = [result(lambda: m.write(0, b"\x11"))]
            child = st.enter_context(kvm.fork())
            later = _map(kvm, st, "anon", PS, 3, mm.MAP_SHARED, None)
            out += [result(lambda: child.read(m, 0, 1).hex()), result(lambda: child.write(m, 0, b"\x22")),
                    _hex1(m), result(lambda: child.read(m, 0, 1).hex()),
                    result(lambda: child.fill(m, PS, 2, 0x44)), _hex1(m, PS),
                    result(lambda: child.read(later, 0, 1).hex())]
            child.exit()
            out += [_hex1(m), result(lambda: child.read(m, 0, 1).hex())]
            return out
    return run


def _fork_dontfork(backing: str, shared: bool, undo: bool) -> Callable[[Kvm], Outcome]:
    """MADV_DONTFORK on the middle page of three (then MADV_DOFORK on all when ``undo``): what a
    child reads on each page and across the boundary."""
    def run(kvm: Kvm) -> Outcome:
        with ExitStack() as st:
            fd = _backing_fd(kvm, st, backing)
            m = _map(kvm, st, backing, 3 * PS, 3, mm.MAP_SHARED if shared else mm.MAP_PRIVATE, fd)
            m.fill(0, 3 * PS, 0x11)
            out = [result(lambda: m.madvise(PS, PS, mm.MADV_DONTFORK))]
            if undo:
                out.append(result(lambda: m.madvise(0, 3 * PS, mm.MADV_DOFORK)))
            child = st.enter_context(kvm.fork())
            for o, n in [(0, 1), (PS, 1), (2 * PS, 1), (PS - 1, 2)]:
                out.append(result(lambda o=o, n=n: child.read(m, o, n).hex()))
            out += [result(lambda: child.write(m, PS, b"\x22")), _hex1(m, PS)]
            child.exit()
            return out
    return run


def _fork_behaviours(add: Add) -> None:
    for backing in ("anon", "memfd", "gmem-shared"):
        for shared in (True, False):
            if backing.startswith("gmem") and not shared:
                continue
            for undo in (False, True):
                add(f"fork/{backing}/{'shared' if shared else 'private'}/{'dofork' if undo else 'dontfork'}",
                    "fork", _fork_dontfork(backing, shared, undo))
    _fork_plain(add)


def _fork_plain(add: Add) -> None:
    for backing in BACKINGS[:4]:  # a guest_memfd without GUEST_MEMFD_FLAG_MMAP has no mapping to fork
        for shared in (True, False):
            if backing.startswith("gmem") and not shared:
                continue
            add(f"fork/{backing}/{'shared' if shared else 'private'}", "fork", _fork(backing, shared))


# --- dirty log --------------------------------------------------------------------------------------------


def _dirty(what: str) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, kvm.mmap_anonymous(SZ_2M) as anon:
            log = u.KVM_MEM_LOG_DIRTY_PAGES
            if what == "no-slot":
                return result(lambda: vm.get_dirty_log(1).hex())
            if what == "not-logging":
                vm.set_user_memory_region(1, 0, GIB4, SZ_2M, anon.addr)
                return result(lambda: vm.get_dirty_log(1).hex())
            if what in ("as-id-1", "id-past-max", "id-32767"):
                vm.set_user_memory_region(1, log, GIB4, SZ_2M, anon.addr)
                slot = {"as-id-1": (1 << 16) | 1, "id-past-max": 1 << 15, "id-32767": 32767}[what]
                return result(lambda: vm.get_dirty_log(slot).hex())
            if what == "gmem-slot":
                g = vm.create_guest_memfd(SZ_2M, MMAP | SHARED)
                try:
                    return [result(lambda: vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD | log, GIB4,
                                                                      SZ_2M, anon.addr, g, 0)),
                            result(lambda: vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GIB4, SZ_2M,
                                                                      anon.addr, g, 0)),
                            result(lambda: vm.get_dirty_log(1).hex())]
                finally:
                    g.close()
            vm.set_user_memory_region(1, log, GIB4, 4 * PS if what == "small-slot" else SZ_2M, anon.addr)
            first = result(lambda: vm.get_dirty_log(1).hex())
            if what == "host-write":
                anon.write(PS, b"x")
                return [first, result(lambda: vm.get_dirty_log(1).hex())]
            vcpu = vm.create_vcpu(0)
            # Pages 0 and 3 written before the Sync, page 1 after it.
            vcpu.load(Program([Write(GIB4, 1, 0x31), Write(GIB4 + 3 * PS + 5, 1, 0x32), Sync(1),
                               Write(GIB4 + PS, 1, 0x33)]))
            logs = [first]
            from guestmem.conformance_record import _guest_exits
            exits = _guest_exits(vcpu, on_sync=lambda: logs.append(result(lambda: vm.get_dirty_log(1).hex())))
            logs += [result(lambda: vm.get_dirty_log(1).hex()), result(lambda: vm.get_dirty_log(1).hex())]
            if what == "stop-logging":
                vm.set_user_memory_region(1, 0, GIB4, SZ_2M, anon.addr)
                logs.append(result(lambda: vm.get_dirty_log(1).hex()))
            vcpu.close()
            return {"exits": exits, "logs": logs}
    return run


def _dirty_behaviours(add: Add) -> None:
    for what in ["no-slot", "not-logging", "as-id-1", "id-past-max", "id-32767", "gmem-slot", "host-write",
                 "guest-writes", "small-slot", "stop-logging"]:
        add(f"dirty_log/{what}", "dirty-log", _dirty(what))


def behaviours() -> Iterator[tuple[str, str, Callable[[Kvm], Outcome]]]:
    """Every behaviour of this module as ``(name, area, run)``, in a stable order."""
    out: list[tuple[str, str, Callable[[Kvm], Outcome]]] = []

    def add(name: str, area: str, run: Callable[[Kvm], Outcome]) -> None:
        out.append((name, area, run))

    _file_behaviours(add)
    _raw_behaviours(add)
    _map_behaviours(add)
    _numa_behaviours(add)
    _fork_behaviours(add)
    _dirty_behaviours(add)
    return iter(out)
