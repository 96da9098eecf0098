"""In-place shared/private conversion on the guest_memfd fd (seed 004): KVM_SET_MEMORY_ATTRIBUTES2.

With per-VM attributes (the upstream default) a guest_memfd has no ioctls at all, so the call
answers ENOTTY, as the real kernel here does.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guestmem.errors import KvmError

if TYPE_CHECKING:
    from guestmem.model.kvm.guest_memfd import GmemFile
    from guestmem.model.kvm.vm import ModelVm

OP = "KVM_SET_MEMORY_ATTRIBUTES2"


def set_memory_attributes2(f: GmemFile, offset: int, size: int, attributes: int, flags: int) -> None:
    if not f.system.options.gmem_attributes:
        raise KvmError(errno.ENOTTY, OP, "guest_memfd attributes are disabled (per-VM attributes mode)")
    raise KvmError(errno.ENOTTY, OP, "in-place conversion is not built into this model yet")


def content_modes_for_cap(vm: ModelVm | None) -> int:
    return 0
