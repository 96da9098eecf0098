"""The ordinary-file ABI both backends speak on a guest_memfd or a memfd, and the raw ioctl rule.

A guest_memfd and a memfd are kernel files; users and selftests poke them with ``fcntl``,
``lseek``, ``fstat``, ``sendfile`` and generic VFS ioctls.  The numbers here are x86-64 Linux's
(``include/uapi/asm-generic/fcntl.h``, ``ioctls.h``, ``linux/fs.h``, ``linux/magic.h``).

The second half is the rule for :meth:`ioctl` (the raw escape hatch every fd object has), kept here
so that both backends refuse exactly the same arguments before any call: see :func:`raw_argument`.
"""

from __future__ import annotations

from typing import Final

from guestmem import uapi as u
from guestmem.args import as_bytes, u32, u64

# --- open file description flags (f_flags) ------------------------------------------------------------
O_RDWR: Final = 0o2
O_APPEND: Final = 0o2000
O_NONBLOCK: Final = 0o4000
FASYNC: Final = 0o20000
O_DIRECT: Final = 0o40000
O_LARGEFILE: Final = 0o100000
O_NOATIME: Final = 0o1000000
O_CLOEXEC: Final = 0o2000000
REOPEN_FLAGS: Final = 3 | O_APPEND | O_NONBLOCK | O_DIRECT | O_LARGEFILE | O_NOATIME | O_CLOEXEC
SETFL_MASK: Final = O_APPEND | O_NONBLOCK | O_DIRECT | O_NOATIME  # O_NDELAY is O_NONBLOCK on x86

# --- fcntl commands ------------------------------------------------------------------------------------
F_DUPFD: Final = 0
F_GETFD: Final = 1
F_SETFD: Final = 2
F_GETFL: Final = 3
F_SETFL: Final = 4
FD_CLOEXEC: Final = 1
F_LINUX_SPECIFIC_BASE: Final = 1024
F_DUPFD_CLOEXEC: Final = F_LINUX_SPECIFIC_BASE + 6
F_ADD_SEALS: Final = F_LINUX_SPECIFIC_BASE + 9
F_GET_SEALS: Final = F_LINUX_SPECIFIC_BASE + 10
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20
F_ALL_SEALS: Final = 0x3F
FCNTL_MODELLED: Final = frozenset({F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_ADD_SEALS, F_GET_SEALS})
# fcntl commands that make a new fd: the interface's dup() does that, with an object to hold it.
FCNTL_NEW_FD: Final = frozenset({F_DUPFD, F_DUPFD_CLOEXEC})
# Commands the kernel has (locks, owners, leases, pipes, hints) that the model does not implement.
FCNTL_UNMODELLED: Final = frozenset(
    set(range(5, 17)) | {36, 37, 38} | set(range(F_LINUX_SPECIFIC_BASE, F_LINUX_SPECIFIC_BASE + 6))
    | {F_LINUX_SPECIFIC_BASE + 7, F_LINUX_SPECIFIC_BASE + 8} | set(range(F_LINUX_SPECIFIC_BASE + 11,
                                                                          F_LINUX_SPECIFIC_BASE + 18))
)

# --- memfd_create flags ------------------------------------------------------------------------------
MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_HUGETLB, MFD_NOEXEC_SEAL, MFD_EXEC = 0x1, 0x2, 0x4, 0x8, 0x10
MFD_ALL_FLAGS: Final = 0x1F


def check_memfd_flags(flags: object) -> int:
    """``memfd_create``'s flags as both backends take them: an ``unsigned int``; MFD_HUGETLB (and
    its size bits) is not offered by the interface (ValueError: the model has no hugetlbfs); the
    kernel's own refusals (unknown bits, MFD_EXEC with MFD_NOEXEC_SEAL: EINVAL) are left to it."""
    value = u32(flags, "flags")
    valid = MFD_ALL_FLAGS | (0x3F << 26)  # with MFD_HUGETLB, the page-size bits are allowed too
    both = MFD_EXEC | MFD_NOEXEC_SEAL
    if value & MFD_HUGETLB and not value & ~valid and value & both != both:
        raise ValueError("MFD_HUGETLB is not offered by the interface")
    return value


# --- lseek -----------------------------------------------------------------------------------------------
SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA, SEEK_HOLE = 0, 1, 2, 3, 4
SEEK_MAX: Final = SEEK_HOLE

# --- limits -----------------------------------------------------------------------------------------------
MAX_LFS_FILESIZE: Final = (1 << 63) - 1
MAX_RW_COUNT: Final = 0x7FFFF000  # INT_MAX & PAGE_MASK: the most one read/write/sendfile moves
S_IFREG: Final = 0o100000
S_IALLUGO: Final = 0o7777

# --- filesystem magics (f_type) -------------------------------------------------------------------------
TMPFS_MAGIC: Final = 0x01021994
HUGETLBFS_MAGIC: Final = 0x958458F6
ANON_INODE_FS_MAGIC: Final = 0x09041934  # guest_memfd's filesystem up to 6.18 (this host)
GUEST_MEMFD_MAGIC: Final = 0x474D454D  # "GMEM": guest_memfd's own filesystem (7.x)
ST_VALID: Final = 0x20  # statfs f_flags: the flags are valid

# --- generic VFS ioctls (do_vfs_ioctl answers these on every fd) ----------------------------------------
FIONREAD: Final = 0x541B
FIONBIO: Final = 0x5421
FIONCLEX: Final = 0x5450
FIOCLEX: Final = 0x5451
FIOASYNC: Final = 0x5452
FIOQSIZE: Final = 0x5460
FIGETBSZ: Final = 0x0002  # _IO(0x00, 2), though it writes an int through the pointer
# The legacy numbers carry no size in their encoding; this is what each reads or writes.
LEGACY_ARG_SIZE: Final = {FIONREAD: 4, FIONBIO: 4, FIOASYNC: 4, FIOQSIZE: 8, FIGETBSZ: 4,
                          FIONCLEX: 0, FIOCLEX: 0}


def check_reopen_flags(flags: object) -> int:
    """The open(2) flags :meth:`reopen` takes (an access mode, O_DIRECT, O_APPEND, O_NONBLOCK,
    O_NOATIME, O_CLOEXEC, O_LARGEFILE); anything else (O_CREAT, O_TRUNC, O_PATH, ...) is a
    ValueError on both backends."""
    value = u32(flags, "flags")
    if value & ~REOPEN_FLAGS:
        raise ValueError(f"reopen takes {REOPEN_FLAGS:#o} only, not {value:#o}")
    return value



def _ioc_bits(request: int) -> tuple[int, int, int, int]:
    """``(dir, type, nr, size)`` of an ioctl number."""
    return (request >> u._IOC_DIRSHIFT) & 3, (request >> u._IOC_TYPESHIFT) & 0xFF, request & 0xFF, (
        request >> u._IOC_SIZESHIFT) & ((1 << u._IOC_SIZEBITS) - 1)


def ioc_type(request: int) -> int:
    return _ioc_bits(request)[1]


def arg_size(request: int) -> int:
    """How many bytes the kernel copies through the argument of ``request`` (0: the argument is a
    value, not a pointer).  ``_IOC_SIZE`` for encoded numbers, the table above for legacy ones."""
    if request in LEGACY_ARG_SIZE:
        return LEGACY_ARG_SIZE[request]
    direction, _, _, size = _ioc_bits(request)
    return size if direction != u._IOC_NONE else 0


def raw_argument(request: object, arg: object) -> tuple[int, int | bytearray]:
    """The raw ioctl rule, applied before any call on both backends.

    * ``request`` is the ``unsigned int`` command (:func:`guestmem.args.u32`);
    * an int ``arg`` is the ``unsigned long`` argument itself (:func:`guestmem.args.u64`).  For a
      command that copies a struct through a pointer only 0 (NULL, which the kernel answers with
      EFAULT when it copies) is accepted: any other number would be an address in this process
      that the kernel would read or overwrite, so it is a ``ValueError``;
    * a bytes-like ``arg`` is copied into a fresh buffer whose address is passed.  It must hold at
      least the ``_IOC_SIZE`` bytes the kernel copies (the kernel would read past a shorter one:
      whatever lies there, or EFAULT): a shorter buffer is a ``ValueError``.  A longer one is fine;
      its tail is never touched.  A buffer for a command that takes a value, not a pointer, is a
      ``TypeError`` (its address would be the value);
    * anything else is a ``TypeError``.

    Returns ``(request, value_or_buffer)``.
    """
    req = u32(request, "request")
    size = arg_size(req)
    if _is_integral(arg):
        value = u64(arg, "arg")
        if size and value != 0:
            raise ValueError(f"ioctl {req:#x} copies {size} bytes through its argument: pass a buffer "
                             "(or 0 for NULL), not an address")
        return req, value
    buf = bytearray(as_bytes(arg, "arg"))
    if size == 0 and (ioc_type(req) == u.KVMIO or req in LEGACY_ARG_SIZE):
        raise TypeError(f"ioctl {req:#x} takes a value, not a buffer")
    if len(buf) < size:
        raise ValueError(f"ioctl {req:#x} copies {size} bytes; the buffer has {len(buf)}")
    return req, buf


def _is_integral(value: object) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
