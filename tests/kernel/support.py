"""Helpers for the kernel-backend tests: capability skips and errno assertions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import guestmem.uapi as u
from guestmem.errors import KvmError

PS = u.PAGE_SIZE
GIB4 = 4 << 30
MIB = 1 << 20


def require_cap(target: Any, cap: int, bits: int | None = None) -> int:
    """Skip unless ``check_extension(cap)`` is non-zero (and has all of ``bits``, if given)."""
    value = target.check_extension(cap)
    name = "KVM_CAP_" + u.CAP_NAMES.get(cap, str(cap))
    if not value or (bits is not None and value & bits != bits):
        want = f" with bits {bits:#x}" if bits is not None else ""
        pytest.skip(f"host lacks {name}{want} (check_extension = {value:#x})")
    return value


def require_gmem_flags(vm: Any, flags: int = 0) -> None:
    """Skip unless the VM can create guest_memfds with ``flags``."""
    require_cap(vm, u.KVM_CAP_GUEST_MEMFD)
    if flags:
        require_cap(vm, u.KVM_CAP_GUEST_MEMFD_FLAGS, flags)


def errno_of(fn: Callable[[], object]) -> int:
    """Run ``fn``; return the errno of the ``KvmError`` it raises (the test fails if it succeeds)."""
    with pytest.raises(KvmError) as info:
        fn()
    assert info.value.errno is not None
    return info.value.errno
