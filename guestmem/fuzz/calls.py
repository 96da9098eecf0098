"""Steps for the file, mm and NUMA calls: memfd, fcntl/lseek/dup/reopen/fstat/fsync/fchmod/sendfile,
the raw ioctl on every fd object, ``Kvm.mmap``, ``Mapping.mprotect/madvise/mbind/get_mempolicy/
page_nodes/mmap_fixed``, ``Kvm.set_mempolicy/numa_nodes/fork`` and ``Vm.get_dirty_log``.

A mixin of :class:`guestmem.fuzz.machine.StepGen` (kept apart so each module stays readable).  The
oracle rules here are only those the kernel makes unambiguous, each with where it comes from:

* ``fcntl``: an unknown command is EINVAL (``do_fcntl``'s default); F_ADD_SEALS with bits outside
  F_ALL_SEALS is EINVAL and a guest_memfd has no seals (``memfd_fcntl``: not shmem/hugetlbfs,
  EINVAL);
* ``lseek``: whence past SEEK_MAX is EINVAL before the file is asked (``ksys_lseek``); guest_memfd
  has no ``llseek``, so no FMODE_LSEEK: ESPIPE; a resulting SEEK_SET offset below 0 is EINVAL
  (``vfs_setpos``);
* ``reopen`` of a guest_memfd: ENXIO (its anonymous inode has no open path);
* ``fsync``/``fdatasync`` of a guest_memfd: EINVAL (no ``fsync`` in ``kvm_gmem_fops``,
  ``vfs_fsync_range``);
* raw ioctl: a number no handler knows is ENOTTY (``do_vfs_ioctl`` falls through to the file's
  ``unlocked_ioctl``, which a guest_memfd and a memfd do not have; kvm_*_ioctl default -ENOTTY or
  -EINVAL, so those are only "refused");
* ``mmap``: an unaligned offset is EINVAL before the fd is looked up; length 0 and a map type other
  than SHARED/PRIVATE/SHARED_VALIDATE are EINVAL (``do_mmap``); guest_memfd without
  GUEST_MEMFD_FLAG_MMAP is ENODEV and needs MAP_SHARED (``kvm_gmem_mmap``);
* ``mprotect``: an unaligned start is EINVAL; length 0 succeeds (before the prot check); bits other
  than READ|WRITE|EXEC are EINVAL (``do_mprotect_pkey``, x86 ``arch_validate_prot``);
* ``madvise``: an advice the kernel does not know is EINVAL before the start is looked at
  (``madvise_behavior_valid``); an unaligned start is EINVAL;
* ``mbind``/``set_mempolicy``: a mode past MPOL_MAX, STATIC with RELATIVE, unknown mbind flags,
  an unaligned start, MPOL_DEFAULT with nodes, BIND/INTERLEAVE with none: EINVAL
  (``sanitize_mpol_flags``, ``do_mbind``, ``mpol_new``); ``get_mempolicy`` flags outside
  NODE|ADDR|MEMS_ALLOWED are EINVAL;
* ``get_dirty_log``: an address space or slot id out of range is EINVAL, no such slot or a slot
  that does not log is ENOENT (``kvm_get_dirty_log``).

A closed object is EBADF unless the kernel refuses the arguments before it looks the object up;
where both apply the errno is not pinned (any KvmError will do).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from guestmem import fileabi as fa
from guestmem import mman
from guestmem import uapi as u
from guestmem.fuzz import oracle as o
from guestmem.fuzz.oracle import Arg, Expect, expect_for, make_arg

if TYPE_CHECKING:
    import random

    from guestmem.fuzz.machine import Session, Step

PS = u.PAGE_SIZE
# Every advice include/uapi/asm-generic/mman-common.h defines (0..26 with gaps, 100..103): any
# other number fails madvise_behavior_valid.
MADV_KNOWN = frozenset(range(27)) | frozenset(range(100, 104))


def _step(code: str, kind: str, uses: tuple[str, ...], exp: Any = None, atomic: bool = True) -> Step:
    from guestmem.fuzz.machine import Step

    return Step(code, kind, uses, exp, atomic)


def closed_after(e: Expect, closed: bool, early: bool = False) -> Expect:
    """Add a closed object to an expectation built from the arguments alone.  ``early``: the kernel
    checked the failing arguments before it looked the object up, so EBADF cannot win; otherwise
    the order is the interface's (EBADF first) unless the arguments already fail, then any errno."""
    if not closed or e.must in ("TypeError", "OverflowError"):
        return e
    if e.must is None:
        return Expect("KvmError", errno.EBADF, "closed object", converted=e.converted)
    if not early:
        e.errno = None
    return e


class FileCallsMixin:
    """Step generators for the calls added with the file ABI and the mm/NUMA interface."""

    # StepGen provides these: the seeded source, ``arg`` (good or hostile) and ``pick``.
    rng: random.Random
    arg: Any
    pick: Any

    # --- memfd and the file calls -------------------------------------------------------------------
    def memfd_create(self, s: Session) -> Step:
        size = self.rng.choice([PS, 4 * PS, 16 * PS, 2 << 20])
        flags = self.rng.choice([1, 3, 3, 2, 0, 0x9, 0x11, 0x19, 0x40])
        a_size, a_flags = self.arg(size, o.S64), self.arg(flags, o.U32)
        name = s.fresh("f")

        def exp(ss: Session) -> Expect:
            e = expect_for({"size": a_size, "flags": a_flags}, False)
            if a_size.good and a_flags.good:
                fl = a_flags.conv
                if fl & ~fa.MFD_ALL_FLAGS or (fl & fa.MFD_EXEC and fl & fa.MFD_NOEXEC_SEAL):
                    e.bad("unknown or conflicting memfd_create flags", errno.EINVAL)
                if a_size.conv < 0:
                    e.bad("negative size (ftruncate)", errno.EINVAL)
            return closed_after(e, ss.is_closed("kvm"))
        return _step(f"{name} = kvm.memfd_create({a_size.code}, {a_flags.code})", "kvm.memfd_create",
                     ("kvm",), exp)

    def _file(self, s: Session) -> str | None:
        return self.pick(s.names("g") + s.names("f"))

    def file_call(self, s: Session) -> Step | None:
        f = self._file(s)
        if f is None:
            return None
        gmem = f.startswith("g")
        op = self.rng.choice(["fcntl", "fcntl", "fcntl", "lseek", "lseek", "dup", "reopen", "fstat",
                              "fstatfs", "fsync", "fdatasync", "fchmod", "sendfile"])
        if op == "fcntl":
            return self._fcntl(f, gmem)
        if op == "lseek":
            return self._lseek(s, f, gmem)
        if op == "dup":
            return _step(f"{s.fresh(f[0])} = {f}.dup()", "file.dup", (f,),
                         lambda ss: expect_for({}, ss.is_closed(f)))
        if op == "reopen":
            flags = self.rng.choice([fa.O_RDWR, 0, 1, fa.O_RDWR | fa.O_APPEND, fa.O_RDWR | fa.O_CLOEXEC,
                                     fa.O_RDWR | fa.O_DIRECT])
            a = self.arg(flags, o.U32)
            if a.good and a.conv & ~fa.REOPEN_FLAGS:
                a = make_arg(flags, None, o.U32)  # other open flags are a ValueError by the interface

            def exp_reopen(ss: Session) -> Expect:
                e = expect_for({"flags": a}, False)
                if e.must is None and ss.is_closed(f):
                    return Expect("KvmError", errno.ENOENT, "/proc/self/fd/N of a closed fd")
                if e.must is None and gmem:
                    e.bad("guest_memfd has no open path", errno.ENXIO)
                return e
            return _step(f"{s.fresh(f[0])} = {f}.reopen({a.code})", "file.reopen", (f,), exp_reopen)
        if op in ("fstat", "fstatfs"):
            return _step(f"_ = {f}.{op}()", f"file.{op}", (f,), lambda ss: expect_for({}, ss.is_closed(f)))
        if op in ("fsync", "fdatasync"):
            def exp_sync(ss: Session) -> Expect:
                e = expect_for({}, ss.is_closed(f))
                if gmem:
                    e.bad("guest_memfd has no fsync", errno.EINVAL)
                return e
            return _step(f"{f}.{op}()", f"file.{op}", (f,), exp_sync)
        if op == "fchmod":
            a = self.arg(self.rng.choice([0o600, 0o644, 0o755, 0o7777, 0o100644]), o.U32)

            def exp_chmod(ss: Session) -> Expect:
                e = expect_for({"mode": a}, ss.is_closed(f))
                if gmem and e.must is None:
                    e.must, e.why = "refused", "kvm_gmem_setattr refuses every attribute change"
                return e
            return _step(f"{f}.fchmod({a.code})", "file.fchmod", (f,), exp_chmod)
        # sendfile: out = f, in = another file (or itself)
        src = self._file(s) or f
        if not gmem and s.ns[src].__dict__ is s.ns[f].__dict__:
            return None  # a copy within one memfd overlapping itself is not modelled (documented)
        off = self.rng.choice([None, 0, PS, -1])
        a_off = make_arg(0, "None", o.S64) if off is None else self.arg(off, o.S64)
        if a_off.code == "None":  # None is a valid offset here (NULL: the file position is used)
            off, a_off = None, make_arg(0, "None", o.S64)
        a_cnt = self.arg(self.rng.choice([16, PS, 0, 3 * PS]), o.SIZE_T)
        uses = (f,) if src == f else (f, src)

        def exp_send(ss: Session) -> Expect:
            args = {"count": a_cnt} if off is None else {"offset": a_off, "count": a_cnt}
            # do_sendfile looks at the input first (EBADF, ESPIPE without pread), then the output.
            e = expect_for(args, ss.is_closed(src))
            if e.must is None and ss.is_closed(f):
                e.bad("closed output file (after the input's checks)")
            if e.must is None and a_off.good and off is not None and a_off.conv < 0:
                # rw_verify_area's EINVAL, or ESPIPE first for an input without pread
                e.bad("negative input offset")
            return e
        return _step(f"_ = {f}.sendfile({src}, {a_off.code}, {a_cnt.code})", "file.sendfile", uses,
                     exp_send, atomic=False)  # a copy that faults part way has copied the pages before

    def _fcntl(self, f: str, gmem: bool) -> Step:
        cmd = self.rng.choice([fa.F_GETFD, fa.F_SETFD, fa.F_GETFL, fa.F_SETFL, fa.F_GET_SEALS,
                               fa.F_ADD_SEALS, fa.F_ADD_SEALS, 9999, 2000])
        if cmd == fa.F_ADD_SEALS:
            arg = self.rng.choice([fa.F_SEAL_GROW, fa.F_SEAL_SHRINK, fa.F_SEAL_WRITE, fa.F_SEAL_SEAL,
                                   fa.F_SEAL_FUTURE_WRITE, fa.F_SEAL_EXEC, 0x40, fa.F_ALL_SEALS])
        elif cmd == fa.F_SETFL:
            arg = self.rng.choice([0, fa.O_NONBLOCK, fa.O_APPEND, fa.O_DIRECT, fa.O_NOATIME | fa.O_RDWR])
        else:
            arg = self.rng.choice([0, 1])
        a_cmd, a_arg = self.arg(cmd, o.U32), self.arg(arg, o.ULONG)
        if a_cmd.good and (a_cmd.conv in fa.FCNTL_NEW_FD or a_cmd.conv in fa.FCNTL_UNMODELLED):
            a_cmd = make_arg(cmd, None, o.U32)  # made on purpose: dup() / not in the model

        def exp(ss: Session) -> Expect:
            e = expect_for({"cmd": a_cmd, "arg": a_arg}, ss.is_closed(f))
            if not (a_cmd.good and a_arg.good):
                return e
            c, v = a_cmd.conv, a_arg.conv & 0xFFFF_FFFF
            if c not in fa.FCNTL_MODELLED:
                e.bad("unknown fcntl command", errno.EINVAL)
            if c == fa.F_ADD_SEALS and gmem:
                e.must = "KvmError" if e.must is None else e.must
                e.bad("guest_memfd has no seals (or unknown seal bits)")
            elif c == fa.F_GET_SEALS and gmem:
                e.bad("guest_memfd has no seals", errno.EINVAL)
            elif c == fa.F_ADD_SEALS and v & ~fa.F_ALL_SEALS:
                e.bad("unknown seal bits")  # EPERM first on a read-only description
            return e
        return _step(f"_ = {f}.fcntl({a_cmd.code}, {a_arg.code})", "file.fcntl", (f,), exp)

    def _lseek(self, s: Session, f: str, gmem: bool) -> Step:
        whence = self.rng.choice([0, 1, 2, 3, 4, 0, 5, 1 << 31])
        off = self.rng.choice([0, PS, 17, -1, -PS, 1 << 40])
        a_off, a_wh = self.arg(off, o.S64), self.arg(whence, o.U32)

        def exp(ss: Session) -> Expect:
            e = expect_for({"offset": a_off, "whence": a_wh}, ss.is_closed(f))
            if not (a_off.good and a_wh.good):
                return e
            if a_wh.conv > fa.SEEK_MAX:
                e.bad("whence past SEEK_MAX", errno.EINVAL)
            elif gmem:
                e.bad("guest_memfd has no llseek", errno.ESPIPE)
            elif a_wh.conv == fa.SEEK_SET and a_off.conv < 0:
                e.bad("negative SEEK_SET offset", errno.EINVAL)
            return e
        return _step(f"_ = {f}.lseek({a_off.code}, {a_wh.code})", "file.lseek", (f,), exp)

    # --- raw ioctl on every fd object ---------------------------------------------------------------
    def raw_ioctl(self, s: Session) -> Step | None:
        pool = s.names("g") * 2 + s.names("f") * 2 + s.names("vm") + ["kvm"]
        n = self.pick(pool)
        if n is None:
            return None
        file_like = n[0] in "gf"
        req = self.rng.choice([fa.FIONREAD, fa.FIOCLEX, fa.FIONCLEX, fa.FIOQSIZE, fa.FIGETBSZ,
                               fa.FIONBIO, 0xDEADBEEF, u.KVM_CREATE_VM])
        size = fa.arg_size(req)
        arg_code = f"bytes({size})" if size else "0"
        a_req = self.arg(req, o.U32)
        if not a_req.good or a_req.conv not in (req,):
            a_req = make_arg(req, None, o.U32)  # other numbers: ValueError or NotImplementedError
        # 0xDEADBEEF: no handler anywhere; KVM_CREATE_VM: a /dev/kvm ioctl on the wrong fd kind.
        unknown = req == 0xDEADBEEF or (req == u.KVM_CREATE_VM and n != "kvm")

        def exp(ss: Session) -> Expect:
            e = expect_for({"request": a_req}, ss.is_closed(n))
            if unknown and n.startswith("f"):
                e.bad("no handler for the number (shmem has no unlocked_ioctl)", errno.ENOTTY)
            elif unknown:
                e.bad("no handler for the number on this fd kind")
            return e
        if not file_like and not unknown:
            return None  # /dev/kvm and VM fds: only numbers no handler takes (others may not be modelled)
        kind = "file" if file_like else n.rstrip("0123456789")
        return _step(f"_ = {n}.ioctl({a_req.code}, {arg_code})", f"{kind}.ioctl", (n,), exp)

    # --- mmap ---------------------------------------------------------------------------------------
    def kvm_mmap(self, s: Session) -> Step:
        src = self.pick(s.names("g") + s.names("f") + ["None"] * 2) or "None"
        fd_code = src
        if src != "None" and self.rng.random() < 0.15:
            fd_code = f"{src}.fd"
        size = s.ns[src].size if src != "None" else self.rng.choice([PS, 4 * PS, 2 << 20])
        size = max(PS, min(int(size), 4 << 20)) if isinstance(size, int) else PS
        length = self.rng.choice([size, PS, size, 0])
        prot = self.rng.choice([3, 3, 1, 0, 7, 0x100])
        flags = self.rng.choice([mman.MAP_SHARED, mman.MAP_SHARED, mman.MAP_PRIVATE,
                                 mman.MAP_SHARED | mman.MAP_ANONYMOUS, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS,
                                 0, mman.MAP_SHARED_VALIDATE, mman.MAP_SHARED | mman.MAP_POPULATE])
        off = self.rng.choice([0, 0, PS, 17])
        a_len, a_prot, a_flags, a_off = (self.arg(length, o.SIZE_T), self.arg(prot, o.S32),
                                         self.arg(flags, o.S32), self.arg(off, o.S64))
        if a_flags.good and a_flags.conv & (mman.MAP_FIXED | mman.MAP_FIXED_NOREPLACE):
            a_flags = make_arg(flags, None, o.S32)  # MAP_FIXED is mmap_fixed's (ValueError here)
        gmem_flags = s.ns[src].flags if src.startswith("g") else 0
        uses = ("kvm",) if src == "None" else ("kvm", src)

        def exp(ss: Session) -> Expect:
            e = expect_for({"length": a_len, "prot": a_prot, "flags": a_flags, "offset": a_off}, False)
            if e.must is not None:
                return e
            fl = a_flags.conv
            anon = src == "None" or fl & mman.MAP_ANONYMOUS
            if ss.is_closed("kvm"):
                return Expect("KvmError", errno.EBADF, "closed object", converted=e.converted)
            if a_off.conv % PS:
                return Expect("KvmError", errno.EINVAL, "mmap offset unaligned (checked first)")
            closed = not anon and ss.is_closed(src)
            if a_len.conv == 0:
                e.bad("mmap of zero length", errno.EINVAL)
            if fl & mman.MAP_TYPE not in (mman.MAP_SHARED, mman.MAP_PRIVATE, mman.MAP_SHARED_VALIDATE):
                e.bad("bad mapping type", errno.EINVAL)
            if not anon and (a_off.conv < 0 or a_off.conv + a_len.conv >= 1 << 63):
                # file_mmap_ok: a file's offset + length must stay within MAX_LFS_FILESIZE (an
                # anonymous mapping's offset is not a file position and is not checked)
                e.bad("negative file offset, or offset + length past loff_t (EINVAL/EOVERFLOW)")
            if a_len.conv >= 1 << 46:
                # ENOMEM where it cannot fit, which the kernel may find before or after the
                # checks above, and near half the address space it may or may not fit.
                if e.must is None:
                    return closed_after(e, not anon and ss.is_closed(src))
                e.errno = None
                return e
            if not anon and src.startswith("g") and e.must is None:
                if a_prot.good and a_prot.conv & mman.PROT_EXEC:
                    # guest_memfd's mount is noexec (kvm_gmem_init: MNT_NOEXEC): do_mmap's
                    # path_noexec check refuses PROT_EXEC before the file's own mmap.
                    e.bad("guest_memfd is on a noexec mount", errno.EPERM)
                elif not gmem_flags & u.GUEST_MEMFD_FLAG_MMAP:
                    e.bad("guest_memfd without MMAP", errno.ENODEV)
                elif fl & mman.MAP_TYPE == mman.MAP_PRIVATE:
                    e.bad("guest_memfd needs MAP_SHARED", errno.EINVAL)
            return closed_after(e, closed)
        code = (f"{s.fresh('m')} = kvm.mmap({a_len.code}, {a_prot.code}, {a_flags.code}, {fd_code}, "
                f"{a_off.code})")
        populate = flags & mman.MAP_POPULATE
        return _step(code, "kvm.mmap", uses, exp, atomic=not populate)

    # --- mm calls on a mapping ----------------------------------------------------------------------
    def _range(self, s: Session, m: str) -> tuple[int, int]:
        length = max(PS, s.ns[m].length)
        npages = -(-length // PS)
        start = self.rng.randrange(npages)
        n = self.rng.randint(0, npages - start)
        off = start * PS + self.rng.choice([0, 0, 0, 0, 17])
        return off, self.rng.choice([n * PS, n * PS, n * PS + 5, (npages + 1) * PS])

    def mm_call(self, s: Session) -> Step | None:
        m = self.pick(s.names("m"))
        if m is None:
            return None
        op = self.rng.choice(["mprotect", "mprotect", "madvise", "madvise", "mbind", "get_mempolicy",
                              "page_nodes"])
        off, ln = self._range(s, m)
        a_off, a_len = self.arg(off, o.SIZE_T), self.arg(ln, o.SIZE_T)
        if op == "mprotect":
            a_p = self.arg(self.rng.choice([0, 1, 3, 3, 7, 5, 8, mman.PROT_GROWSDOWN | 1]), o.S32)

            def exp_prot(ss: Session) -> Expect:
                e = expect_for({"offset": a_off, "length": a_len, "prot": a_p}, False)
                if e.must is not None:
                    return e
                if ss.is_closed(m):
                    return closed_after(e, True)
                n = -(-a_len.conv // PS) * PS
                if a_off.conv % PS:
                    e.bad("mprotect start unaligned", errno.EINVAL)
                elif a_len.conv == 0:
                    return e  # do_mprotect_pkey: an empty range succeeds before prot is looked at
                elif a_off.conv + n >= 1 << 64:
                    e.bad("mprotect range wraps", errno.ENOMEM)
                elif a_p.conv & ~7:
                    e.bad("protection bits outside READ|WRITE|EXEC", errno.EINVAL)
                return e
            return _step(f"{m}.mprotect({a_off.code}, {a_len.code}, {a_p.code})", "mapping.mprotect",
                         (m,), exp_prot)
        if op == "madvise":
            adv = self.rng.choice([*sorted(mman.MADV_SUPPORTED), 999, -1])
            a_adv = self.arg(adv, o.S32)
            populate = adv in (mman.MADV_POPULATE_READ, mman.MADV_POPULATE_WRITE, mman.MADV_WILLNEED)

            def exp_adv(ss: Session) -> Expect:
                e = expect_for({"offset": a_off, "length": a_len, "advice": a_adv}, False)
                if e.must is not None:
                    return e
                if a_adv.conv not in mman.MADV_SUPPORTED and a_adv.conv not in MADV_KNOWN:
                    # madvise_behavior_valid comes before anything else (the interface's own
                    # EINVAL for kernel advices it does not offer is not judged here)
                    e.bad("advice the kernel does not know", errno.EINVAL)
                    return closed_after(e, ss.is_closed(m), early=True)
                if a_adv.conv not in mman.MADV_SUPPORTED:
                    # a kernel advice the interface does not offer: the model's EINVAL, the kernel
                    # backend passes it through; only "a closed mapping refuses" is judged
                    if ss.is_closed(m):
                        e.must, e.why = "refused", "closed mapping"
                    return e
                if a_off.conv % PS:
                    e.bad("madvise start unaligned", errno.EINVAL)
                return closed_after(e, ss.is_closed(m), early=False)
            return _step(f"{m}.madvise({a_off.code}, {a_len.code}, {a_adv.code})", "mapping.madvise",
                         (m,), exp_adv, atomic=not populate)
        if op == "mbind":
            return self._mbind(m, a_off, a_len)
        if op == "get_mempolicy":
            a_fl = self.arg(self.rng.choice([mman.MPOL_F_ADDR, mman.MPOL_F_ADDR,
                                             mman.MPOL_F_ADDR | mman.MPOL_F_NODE, 8]), o.U64)

            def exp_get(ss: Session) -> Expect:
                e = expect_for({"offset": a_off, "flags": a_fl}, False)
                fl = a_fl.conv
                if e.must is None and (fl & ~7 or not fl & mman.MPOL_F_ADDR or fl & mman.MPOL_F_MEMS_ALLOWED):
                    # do_get_mempolicy: unknown flags; MEMS_ALLOWED with ADDR; an address without
                    # MPOL_F_ADDR: EINVAL, all before any address is looked up
                    e.bad("bad get_mempolicy flags", errno.EINVAL)
                    return closed_after(e, ss.is_closed(m), early=True)
                return closed_after(e, ss.is_closed(m), early=False)
            return _step(f"_ = {m}.get_mempolicy({a_off.code}, {a_fl.code})", "mapping.get_mempolicy",
                         (m,), exp_get, atomic=False)  # MPOL_F_NODE faults the page in
        # The answer is a list of npages entries on both backends, so a huge count (a hostile
        # integer, or -1 as 2**64-1) is a memory hog by construction: only wrong types are drawn.
        a_n = make_arg(self.rng.choice([1, 4, 16]), None, o.U64)
        if self.rng.random() < 0.1:
            a_n = make_arg(None, "None", o.U64)
        return _step(f"_ = {m}.page_nodes({a_off.code}, {a_n.code})", "mapping.page_nodes", (m,),
                     lambda ss: expect_for({"offset": a_off, "npages": a_n}, ss.is_closed(m)))

    def _policy_args(self) -> tuple[Arg, str, Arg, int | None]:
        mode = self.rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 2 | mman.MPOL_F_STATIC_NODES,
                                2 | mman.MPOL_F_STATIC_NODES | mman.MPOL_F_RELATIVE_NODES,
                                1 | mman.MPOL_F_NUMA_BALANCING])
        nodes = self.rng.choice([None, 1, 1, 3, 0x2, 0xF, 0])
        maxnode = self.rng.choice([64, 64, 2, 1])
        return self.arg(mode, o.S32), repr(nodes), self.arg(maxnode, o.U64), nodes

    @staticmethod
    def _policy_rules(e: Expect, a_mode: Arg, nodes: int | None, maxnode: int,
                      sanitize_only: bool = False) -> None:
        """``sanitize_mpol_flags`` + ``get_nodes`` + ``mpol_new``'s unambiguous refusals (EINVAL);
        ``sanitize_only``: the call returns before ``mpol_new`` (an empty mbind range)."""
        mode = a_mode.conv
        base, fl = mode & ~mman.MPOL_MODE_FLAGS, mode & mman.MPOL_MODE_FLAGS
        if base < 0 or base >= mman.MPOL_MAX:
            e.bad("unknown policy mode", errno.EINVAL)
            return
        if fl & mman.MPOL_F_STATIC_NODES and fl & mman.MPOL_F_RELATIVE_NODES:
            e.bad("STATIC with RELATIVE nodes", errno.EINVAL)
        if fl & mman.MPOL_F_NUMA_BALANCING and base not in (mman.MPOL_BIND, mman.MPOL_PREFERRED_MANY):
            e.bad("NUMA_BALANCING outside BIND/PREFERRED_MANY", errno.EINVAL)
        bits = (maxnode - 1) % (1 << 64)  # get_nodes: --maxnode on an unsigned long
        if nodes is not None and bits > PS * 8:
            e.bad("maxnode beyond a page of bits", errno.EINVAL)
            return
        mask = 0 if nodes is None or bits == 0 else nodes & ((1 << bits) - 1)
        if sanitize_only:
            return
        if base == mman.MPOL_DEFAULT and mask:
            e.bad("MPOL_DEFAULT with nodes", errno.EINVAL)
        if base in (mman.MPOL_BIND, mman.MPOL_INTERLEAVE, mman.MPOL_PREFERRED_MANY,
                    mman.MPOL_WEIGHTED_INTERLEAVE) and not mask:
            e.bad("a policy that needs nodes without any", errno.EINVAL)

    def _mbind(self, m: str, a_off: Arg, a_len: Arg) -> Step:
        a_mode, nodes_code, a_max, nodes = self._policy_args()
        a_fl = self.arg(self.rng.choice([0, 0, mman.MPOL_MF_MOVE, mman.MPOL_MF_STRICT, 8]), o.U32)

        def exp(ss: Session) -> Expect:
            e = expect_for({"offset": a_off, "length": a_len, "mode": a_mode, "maxnode": a_max,
                            "flags": a_fl}, False)
            if e.must is not None:
                return e
            # do_mbind returns 0 for an empty range before mpol_new looks at the nodes.
            # (a length PAGE_ALIGN rounds up to 0 is empty too)
            empty = -(-a_len.conv // PS) * PS in (0, 1 << 64) and not a_off.conv % PS
            self._policy_rules(e, a_mode, nodes, a_max.conv, sanitize_only=empty)
            if a_fl.conv & ~mman.MPOL_MF_VALID:
                e.bad("unknown mbind flags", errno.EINVAL)
            if a_off.conv % PS:
                e.bad("mbind start unaligned", errno.EINVAL)
            return closed_after(e, ss.is_closed(m), early=False)
        code = (f"{m}.mbind({a_off.code}, {a_len.code}, {a_mode.code}, {nodes_code}, {a_max.code}, "
                f"{a_fl.code})")
        # MOVE with STRICT may report EIO after moving what it could.
        return _step(code, "mapping.mbind", (m,), exp, atomic=not a_fl.good or a_fl.conv & 3 != 3)

    def set_mempolicy(self, s: Session) -> Step:
        a_mode, nodes_code, a_max, nodes = self._policy_args()

        def exp(ss: Session) -> Expect:
            e = expect_for({"mode": a_mode, "maxnode": a_max}, False)
            if e.must is None:
                self._policy_rules(e, a_mode, nodes, a_max.conv)
            return closed_after(e, ss.is_closed("kvm"), early=False)
        return _step(f"kvm.set_mempolicy({a_mode.code}, {nodes_code}, {a_max.code})", "kvm.set_mempolicy",
                     ("kvm",), exp)

    def mmap_fixed(self, s: Session) -> Step | None:
        m = self.pick(s.names("m"))
        if m is None or s.ns[m].closed or getattr(s.ns[m], "children", None) or s.ns[m].length < 2 * PS:
            return None
        npages = s.ns[m].length // PS
        start = self.rng.randrange(npages - 1)
        n = self.rng.randint(1, npages - start)
        prot = self.rng.choice([3, 1, 0])
        flags = self.rng.choice([mman.MAP_SHARED | mman.MAP_ANONYMOUS, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS])
        a_prot = self.arg(prot, o.S32)
        code = f"{s.fresh('m')} = {m}.mmap_fixed({start * PS:#x}, {n * PS:#x}, {a_prot.code}, {flags:#x})"
        return _step(code, "mapping.mmap_fixed", (m,),
                     lambda ss: expect_for({"prot": a_prot}, ss.is_closed(m)))

    # --- fork, NUMA nodes, dirty log ----------------------------------------------------------------
    def kvm_fork(self, s: Session) -> Step:
        return _step(f"{s.fresh('ch')} = kvm.fork()", "kvm.fork", ("kvm",))

    def child_call(self, s: Session) -> Step | None:
        ch = self.pick([c for c in s.names("ch") if hasattr(s.ns[c], "pid")])
        m = self.pick(s.names("m"))
        if ch is None or m is None:
            return None
        r = self.rng.random()
        length = max(PS, s.ns[m].length)
        off = self.rng.randrange(-(-length // PS)) * PS
        if r < 0.1:
            return _step(f"{ch}.exit()", "child.exit", (ch,))
        if r < 0.55:
            return _step(f"_ = {ch}.read({m}, {off:#x}, 0x10)", "child.read", (ch, m))
        return _step(f"{ch}.write({m}, {off:#x}, bytes([{self.rng.randrange(256)}]) * 16)", "child.write",
                     (ch, m), atomic=False)

    def numa_nodes(self, s: Session) -> Step:
        return _step("_ = kvm.numa_nodes()", "kvm.numa_nodes", ("kvm",))

    def get_dirty_log(self, s: Session) -> Step | None:
        vm = self.pick(s.names("vm"))
        if vm is None:
            return None
        slots = [sl for ms in s.ns[vm].memslots for sl in ms]
        if slots and self.rng.random() < 0.7:
            sl = self.rng.choice(slots)
            slot = sl.id | sl.as_id << 16
        else:
            slot = self.rng.choice([0, 5, u.KVM_USER_MEM_SLOTS, 1 << 16, 9 << 16])
        a = self.arg(slot, o.U32)
        nr_as = s.ns[vm].nr_as

        def exp(ss: Session) -> Expect:
            e = expect_for({"slot": a}, ss.is_closed(vm))
            if not a.good:
                return e
            as_id, sid = a.conv >> 16, a.conv & 0xFFFF
            if as_id >= nr_as or sid >= u.KVM_USER_MEM_SLOTS:
                e.bad("address space or slot id out of range", errno.EINVAL)
                return e
            cur = ss.ns[vm].memslots[as_id].get(sid)
            if cur is None or cur.dirty_bitmap is None:
                e.bad("no such slot, or it does not log", errno.ENOENT)
            return e
        return _step(f"_ = {vm}.get_dirty_log({a.code})", "vm.get_dirty_log", (vm,), exp)
