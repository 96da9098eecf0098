"""Arguments as the kernel receives them: one rule for every integer the interface takes.

The kernel never sees a Python ``int``: it sees a ``__u64`` struct field, a ``loff_t`` syscall
argument, an ``unsigned long`` ioctl argument.  So that both backends answer a hostile argument
identically (and as a C program passing the same bits would be answered), every integer argument
of :mod:`guestmem.api` goes through one of the converters below before anything else happens:

* a non-integer (``float``, ``str``, ``None``, ``bool``, ...) raises :class:`TypeError` naming the
  argument — ``numbers.Integral`` values such as numpy integers are accepted;
* an integer no field of that width can hold, signed or unsigned (outside
  ``[-2**(w-1), 2**w)``), raises :class:`OverflowError`, as Python's own ``os`` functions do for a
  C argument that cannot hold the value;
* anything else is converted exactly as the field holds it: two's complement for a negative value
  in an unsigned field (``gpa=-4096`` in a ``__u64`` is ``2**64 - 4096``), sign-wrapped for a
  signed one (``2**64 - 1`` in a ``loff_t`` is ``-1``) — and then validated by the kernel's own
  rules, which give the kernel's errno.

Both raise before any state changes, because the converters run first.
"""

from __future__ import annotations

import errno
import numbers

_PAGE = 4096  # uapi.PAGE_SIZE (this module sits beside uapi and imports nothing of guestmem)

__all__ = ["as_bytes", "check_reserved", "mapping_range", "pin_range", "s32", "s64", "u8", "u32", "u64"]


def _integral(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return int(value)


def _unsigned(value: object, name: str, bits: int) -> int:
    v = _integral(value, name)
    if not -(1 << (bits - 1)) <= v < 1 << bits:
        raise OverflowError(f"{name}={v:#x} does not fit in a {bits}-bit field")
    return v & ((1 << bits) - 1)


def _signed(value: object, name: str, bits: int) -> int:
    v = _unsigned(value, name, bits)
    return v - (1 << bits) if v >> (bits - 1) else v


_U64_MAX = (1 << 64) - 1
_S64_MAX = (1 << 63) - 1


def u64(value: object, name: str) -> int:
    """A ``__u64`` field, ``size_t`` or ``unsigned long`` argument (x86-64)."""
    # The common case first (a plain int already in range: every call on the fault path), with the
    # same answer as the general rule below.
    if type(value) is int and 0 <= value <= _U64_MAX:
        return value
    return _unsigned(value, name, 64)


def s64(value: object, name: str) -> int:
    """A ``loff_t``/``off_t``/``long`` argument or ``__s64`` field."""
    if type(value) is int and 0 <= value <= _S64_MAX:
        return value
    return _signed(value, name, 64)


def u32(value: object, name: str) -> int:
    """A ``__u32`` field or ``unsigned int`` argument."""
    return _unsigned(value, name, 32)


def s32(value: object, name: str) -> int:
    """An ``int`` argument (``fallocate``'s mode, a file descriptor)."""
    return _signed(value, name, 32)


def u8(value: object, name: str) -> int:
    """A byte value (``memset``'s fill byte is converted to ``unsigned char``)."""
    return _unsigned(value, name, 8)


def as_bytes(value: object, name: str) -> bytes | memoryview:
    """Data a call copies from userspace: any buffer (bytes, bytearray, memoryview, numpy array)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return value
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object, not {type(value).__name__}") from None
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def check_reserved(words: object, struct: type) -> list[int]:
    """The ``reserved`` words of a uAPI struct, each a ``__u64``; more than it has cannot be sent."""
    if isinstance(words, str | bytes) or not hasattr(words, "__iter__"):
        raise TypeError(f"reserved must be a sequence of ints, not {type(words).__name__}")
    out = [u64(w, f"reserved[{i}]") for i, w in enumerate(words)]  # type: ignore[attr-defined]
    room = dict(struct._fields_)["reserved"]._length_  # type: ignore[attr-defined]
    if len(out) > room:
        raise OverflowError(f"{struct.__name__} has {room} reserved words, not {len(out)}")
    return out


# --- host mappings: one rule for both backends ------------------------------------------------------
def mapping_range(op: str, offset: object, length: object, size: int, closed: bool) -> tuple[int, int]:
    """A host access of ``[offset, offset+length)`` in a mapping of ``size`` bytes, checked before
    anything is touched: ``size_t`` arguments, EBADF once unmapped, and an access outside the
    mapping is a ``GuestAccessFault`` ("SIGSEGV")."""
    from guestmem.errors import GuestAccessFault, KvmError

    off, n = u64(offset, "offset"), u64(length, "length")
    if closed:
        raise KvmError(errno.EBADF, op, "mapping is closed")
    if off > size or n > size - off:
        raise GuestAccessFault(op, min(off, size), "SIGSEGV: outside the mapping")
    return off, n


def pin_range(offset: object, length: object, size: int, closed: bool) -> tuple[int, int]:
    """The range of a ``Mapping.pin``: EBADF once unmapped, EINVAL unless page-aligned and
    non-empty, then inside the mapping (:func:`mapping_range`)."""
    from guestmem.errors import KvmError

    off, n = u64(offset, "offset"), u64(length, "length")
    if closed:
        raise KvmError(errno.EBADF, "mapping.pin", "mapping is closed")
    if off % _PAGE or n == 0 or n % _PAGE:
        raise KvmError(errno.EINVAL, "mapping.pin", "offset and length must be page aligned")
    return mapping_range("mapping.pin", off, n, size, closed)
