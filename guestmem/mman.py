"""Host memory-management uAPI: ``mmap``/``mprotect``/``madvise`` and NUMA memory policy.

A guest_memfd, a memfd and anonymous memory are ordinary kernel objects that a VMM (and
upstream's selftests) touches with ordinary syscalls.  This module holds their constants (from
``include/uapi/asm-generic/mman*.h`` and ``include/uapi/linux/mempolicy.h``) and the argument
checks both backends apply *before* anything changes, in the kernel's order, so the model and
the kernel backend refuse the same calls with the same errno.  The kernel backend still asks the
kernel for everything past these checks.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from guestmem.args import s32, s64, u32, u64
from guestmem.errors import KvmError
from guestmem.uapi import PAGE_SIZE

PS = PAGE_SIZE

# --- mmap / mprotect ----------------------------------------------------------------------------
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_FIXED_NOREPLACE = 0x100000
MAP_SYNC = 0x80000
# What MAP_SHARED_VALIDATE accepts on an ordinary file (mm/mmap.c LEGACY_MAP_MASK, plus the
# MAP_HUGE_* size bits 26..31, which this x86-64 host takes too): anything else is EOPNOTSUPP.
LEGACY_MAP_MASK = (0x01 | 0x02 | 0x10 | 0x20 | 0x800 | 0x1000 | 0x100 | 0x2000 | 0x4000 | 0x8000
                   | 0x10000 | 0x20000 | 0x40000 | (0x3F << 26))

# --- madvise --------------------------------------------------------------------------------------
MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_COLLAPSE = 25

# The advices this interface implements on both backends (anything else: EINVAL on the model;
# the kernel backend passes it through).
MADV_SUPPORTED = frozenset({MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_DONTNEED, MADV_REMOVE,
                            MADV_DONTFORK, MADV_DOFORK, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
                            MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_COLLAPSE, MADV_WILLNEED})

# --- NUMA memory policy -----------------------------------------------------------------------------
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_PREFERRED_MANY = 5
MPOL_WEIGHTED_INTERLEAVE = 6
MPOL_MAX = 7

MPOL_F_STATIC_NODES = 1 << 15
MPOL_F_RELATIVE_NODES = 1 << 14
MPOL_F_NUMA_BALANCING = 1 << 13
MPOL_MODE_FLAGS = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING

# get_mempolicy flags
MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1
MPOL_F_MEMS_ALLOWED = 1 << 2

# mbind flags
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2
MPOL_MF_VALID = MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL

# CONFIG_NODES_SHIFT=10 (x86-64 distribution kernels): nodemask bits past this must be zero.
MAX_NUMNODES = 1024
BITS_PER_LONG = 64


@dataclass(frozen=True)
class MemPolicy:
    """A memory policy as the kernel stores it: mode, mode flags, nodes (a bit mask)."""

    mode: int
    flags: int = 0
    nodes: int = 0


MAX_LFS_FILESIZE = (1 << 63) - 1


def file_mmap_ok(offset: int, length: int) -> bool:
    """``file_mmap_ok`` for a regular file (max size MAX_LFS_FILESIZE): the page offset, taken
    from the unsigned offset the syscall gets, plus the page-aligned length must stay within it.
    An anonymous mapping's offset is never checked (x86-64 cannot wrap ``pgoff + len`` pages)."""
    pgoff = (offset % (1 << 64)) >> 12
    return length <= MAX_LFS_FILESIZE and pgoff <= (MAX_LFS_FILESIZE - length) >> 12


def convert_mmap_args(length: object, prot: object, flags: object, fd: object, offset: object
                      ) -> tuple[int, int, int, int]:
    """The integer rule for ``mmap``'s arguments, in the order of the signature (an argument that
    cannot be converted never reaches the syscall, so this precedes every errno, EBADF on a closed
    /dev/kvm included): ``(length, prot, flags, offset)``; ``fd`` must be an object with an ``fd``,
    an int or None (TypeError)."""
    length_, prot_, flags_ = u64(length, "length"), s32(prot, "prot"), u32(flags, "flags")
    if fd is not None and (isinstance(fd, bool) or not isinstance(getattr(fd, "fd", fd), int)):
        raise TypeError("fd must be a GuestMemfd, a HostFile, an int or None")
    return length_, prot_, flags_, s64(offset, "offset")


def convert_mbind_args(offset: object, length: object, mode: object, nodemask: object,
                       maxnode: object, flags: object) -> tuple[int, int, int, int | None, int, int]:
    """The integer rule for ``mbind``'s arguments, all before any of the kernel's refusals (which
    start with the mode): ``start``/``len``/``maxnode`` are unsigned longs, ``mode`` is taken as an
    int (``sanitize_mpol_flags``), ``flags`` an unsigned int (the syscall's own type)."""
    return (u64(offset, "offset"), u64(length, "length"), s32(mode, "mode"),
            nodemask_value(nodemask), u64(maxnode, "maxnode"), u32(flags, "flags"))


def mbind_range(op: str, offset: object, length: object, size: int, closed: bool) -> tuple[int, int]:
    """The page range ``[offset, offset+length)`` of a range call (mprotect/madvise/mbind) on a
    mapping of ``size`` bytes: ``size_t`` arguments; EBADF once unmapped; EINVAL for an unaligned
    offset or a length that wraps when rounded up to pages.  Returns ``(offset, rounded_length)``; the
    caller decides the errno for a range reaching past the mapping (it is unmapped memory)."""
    off, n = u64(offset, "offset"), u64(length, "length")
    if closed:
        raise KvmError(errno.EBADF, op, "mapping is closed")
    if off % PS:
        raise KvmError(errno.EINVAL, op, "address must be page aligned")
    n = -(-n // PS) * PS
    if n >= 1 << 64:  # PAGE_ALIGN(len) rounded a huge length up to 0
        raise KvmError(errno.EINVAL, op, "length wraps when page-aligned")
    # An offset + length past 2**64 is relative to the mapping: in absolute addresses it does not
    # wrap (the kernel's `start + len < start` cannot fire), it is unmapped memory past the
    # mapping, which the caller refuses with its errno (ENOMEM; EFAULT for mbind).
    return off, n


def past_mapping(offset: int, length: int, size: int) -> bool:
    """True when ``[offset, offset+length)`` reaches past a mapping of ``size`` bytes (whole pages)."""
    return offset + length > -(-size // PS) * PS


def mmap_fixed_range(mapping: Any, offset: object, length: object) -> tuple[int, int]:
    """The checks for MAP_FIXED over part of ``mapping`` (either backend's: it has ``addr``,
    ``length``, ``closed`` and its live MAP_FIXED ``children``), before anything is mapped:
    EBADF for a closed mapping, EINVAL for an unaligned address (as mmap), and ValueError for what
    this interface does not let a caller do (an empty range, one outside the mapping, or one over
    another live piece).  Returns ``(offset, length)`` as the integer rule converts them."""
    off, n = u64(offset, "offset"), u64(length, "length")
    if mapping.closed:
        raise KvmError(errno.EBADF, "mmap", "mapping is closed")
    if off % PS:
        raise KvmError(errno.EINVAL, "mmap", "MAP_FIXED address must be page aligned")
    if n == 0 or past_mapping(off, n, mapping.length):
        raise ValueError("mmap_fixed must replace a non-empty part of this mapping")
    end = off + -(-n // PS) * PS
    for c in mapping.children:
        lo = c.addr - mapping.addr
        if not c.closed and lo < end and off < lo + c.length:
            raise ValueError("mmap_fixed over another live MAP_FIXED mapping")
    return off, n


def check_prot(op: str, prot: object) -> int:
    """``mmap``/``mprotect`` protection bits: EINVAL for bits outside READ|WRITE|EXEC (GROWSDOWN and
    GROWSUP only mean something to stack mappings; this interface refuses them like junk)."""
    value = s32(prot, "prot")
    if value & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
        raise KvmError(errno.EINVAL, op, f"invalid protection bits {value:#x}")
    return value


def mprotect_range(offset: object, length: object, prot: object, size: int, closed: bool
                   ) -> tuple[int, int, int]:
    """``do_mprotect_pkey``'s checks in its order, for a mapping of ``size`` bytes: the integer
    rule, EBADF once unmapped, EINVAL for an unaligned start, then a zero length succeeds (before
    the protection is looked at), ENOMEM for a wrap, EINVAL for protection bits other than
    READ|WRITE|EXEC (GROWSDOWN/GROWSUP included, see :func:`check_prot`), ENOMEM for a range past
    the mapping (unmapped memory).  Returns ``(offset, rounded_length, prot)``."""
    off, n, value = u64(offset, "offset"), u64(length, "length"), s32(prot, "prot")
    if closed:
        raise KvmError(errno.EBADF, "mprotect", "mapping is closed")
    if off % PS:
        raise KvmError(errno.EINVAL, "mprotect", "address must be page aligned")
    if n == 0:
        return off, 0, value
    n = -(-n // PS) * PS
    if off + n >= 1 << 64:
        raise KvmError(errno.ENOMEM, "mprotect", "range wraps")
    check_prot("mprotect", value)
    if past_mapping(off, n, size):
        raise KvmError(errno.ENOMEM, "mprotect", "range reaches past the mapping (unmapped memory)")
    return off, n, value


def check_advice(advice: object) -> int:
    value = s32(advice, "advice")
    if value not in MADV_SUPPORTED:
        raise KvmError(errno.EINVAL, "madvise", f"unsupported advice {value}")
    return value


def get_nodes(op: str, nodemask: object, maxnode: object) -> int:
    """``get_nodes``: the nodes of a user nodemask of ``maxnode`` bits (the kernel reads
    ``maxnode - 1`` of them; ``nodemask`` None is a NULL pointer: no nodes); EINVAL for more
    than a page of bits or a set bit past ``MAX_NUMNODES``."""
    maxnode = u64(maxnode, "maxnode")
    mask = nodemask_value(nodemask)
    maxnode = (maxnode - 1) % (1 << 64)
    if maxnode == 0 or mask is None:  # None is a NULL nodemask pointer
        return 0
    if maxnode > PS * 8:
        raise KvmError(errno.EINVAL, op, f"maxnode {maxnode + 1} exceeds a page of bits")
    mask &= (1 << maxnode) - 1
    if mask >> MAX_NUMNODES:
        raise KvmError(errno.EINVAL, op, "nodemask has nodes past MAX_NUMNODES")
    return mask


def nodemask_value(nodemask: object) -> int | None:
    """A nodemask argument: None (a NULL pointer) or a non-negative int bit mask of any width."""
    if nodemask is None:
        return None
    if isinstance(nodemask, bool) or not isinstance(nodemask, int):
        raise TypeError(f"nodemask must be an int bit mask or None, not {type(nodemask).__name__}")
    if nodemask < 0:
        raise OverflowError("nodemask must not be negative")
    return nodemask


def sanitize_mode(op: str, mode: object) -> tuple[int, int]:
    """``sanitize_mpol_flags``: split ``mode`` into (mode, mode flags); EINVAL for an unknown mode,
    unknown flags, STATIC together with RELATIVE, or NUMA_BALANCING outside BIND/PREFERRED_MANY."""
    value = s32(mode, "mode")
    flags = value & MPOL_MODE_FLAGS
    base = value & ~MPOL_MODE_FLAGS
    if base < 0 or base >= MPOL_MAX:
        raise KvmError(errno.EINVAL, op, f"unknown policy mode {value}")
    if flags & MPOL_F_STATIC_NODES and flags & MPOL_F_RELATIVE_NODES:
        raise KvmError(errno.EINVAL, op, "MPOL_F_STATIC_NODES with MPOL_F_RELATIVE_NODES")
    if flags & MPOL_F_NUMA_BALANCING and base not in (MPOL_BIND, MPOL_PREFERRED_MANY):
        raise KvmError(errno.EINVAL, op, "MPOL_F_NUMA_BALANCING needs MPOL_BIND")
    return base, flags


def mpol_new(op: str, mode: int, flags: int, nodes: int, online: int) -> MemPolicy | None:
    """``mpol_new`` + ``mpol_set_nodemask``: the policy, or None for MPOL_DEFAULT.  ``online`` is
    the mask of nodes with memory; requested nodes outside it are dropped, and a policy left with
    no node is EINVAL."""
    if mode == MPOL_DEFAULT:
        if nodes:
            raise KvmError(errno.EINVAL, op, "MPOL_DEFAULT takes no nodes")
        return None
    if mode == MPOL_PREFERRED and not nodes:
        if flags & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES):
            raise KvmError(errno.EINVAL, op, "empty MPOL_PREFERRED with static/relative nodes")
        mode = MPOL_LOCAL
    elif mode == MPOL_LOCAL:
        if nodes or flags & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES):
            raise KvmError(errno.EINVAL, op, "MPOL_LOCAL takes no nodes")
    elif not nodes:
        raise KvmError(errno.EINVAL, op, "empty nodemask")
    if mode == MPOL_LOCAL:
        return MemPolicy(MPOL_LOCAL, flags, 0)
    usable = nodes & online
    if not usable:
        raise KvmError(errno.EINVAL, op, "no requested node has memory")
    if mode == MPOL_PREFERRED:
        usable &= -usable  # preferred keeps its first node
    return MemPolicy(mode, flags, usable)


def nodes_of(mask: int) -> list[int]:
    return [n for n in range(mask.bit_length()) if mask >> n & 1]


def parse_node_list(text: str) -> list[int]:
    """``/sys/devices/system/node/online`` syntax: ``0``, ``0-3``, ``0,2-3``."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
