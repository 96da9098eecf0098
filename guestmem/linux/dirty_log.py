"""``KVM_GET_DIRTY_LOG`` on the kernel backend: ``struct kvm_dirty_log`` and the call."""

from __future__ import annotations

import ctypes

from guestmem import uapi as u
from guestmem.linux import _sys


class kvm_dirty_log(ctypes.Structure):
    """``struct kvm_dirty_log``: slot, padding, then a union of the bitmap pointer and a u64."""

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


assert ctypes.sizeof(kvm_dirty_log) == 16
KVM_GET_DIRTY_LOG = u._iow(0x42, kvm_dirty_log)


def get_dirty_log(vm_fd: int, slot: int, npages: int | None) -> bytes:
    """Issue the ioctl with a buffer of ``kvm_dirty_bitmap_bytes(npages)``; ``npages`` None (a
    slot we do not know) passes NULL, which the kernel never writes to without a logging slot."""
    size = -(-npages // 64) * 8 if npages else 0
    buf = (ctypes.c_uint8 * max(size, 8))()
    arg = kvm_dirty_log(slot=slot, padding1=0, dirty_bitmap=ctypes.addressof(buf) if npages else 0)
    _sys.ioctl(vm_fd, KVM_GET_DIRTY_LOG, arg, "KVM_GET_DIRTY_LOG")
    return bytes(buf[:size])
