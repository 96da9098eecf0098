"""Invariant 7 at run time: the content-mode guarantees of an in-place conversion, checked as it
happens (``guestmem.open("model", check_content_modes=True)``).

Before the conversion, a digest of every allocated page's plaintext as its *current* owner sees it
(the guest through its private view for a private page — decrypted on encrypted flavours — and the
raw bytes for a shared page); after it, the same digest as the *new* owner sees it.  PRESERVE
promises the two are equal, ZERO that the new view reads zero; UNSPECIFIED promises nothing.  A
page is digested (16 bytes), never copied, so the check costs hashing, not memory.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.model.kvm.invariants import InvariantError

if TYPE_CHECKING:
    from guestmem.model.kvm.guest_memfd import GmemInode
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
_ZERO_DIGEST = hashlib.blake2b(bytes(PS), digest_size=16).digest()


def plaintext_digests(vm: ModelVm, inode: GmemInode, start: int, end: int,
                      private: bool | None = None) -> dict[int, bytes]:
    """Per allocated page of ``[start, end)``: a digest of its plaintext, seen as private or shared
    (``private=None``: as its current attribute says)."""
    pool = vm.system.pool
    out: dict[int, bytes] = {}
    for s, e, pfn, _ in inode.cache.lookup_range(start, end):
        if pfn is None:
            continue
        for i in range(s, e):
            kind = inode.is_private(i) if private is None else private
            page = vm.arch.guest_read(pool, pfn + (i - s), 0, PS, kind and vm.has_private_mem)
            out[i] = hashlib.blake2b(page.tobytes(), digest_size=16).digest()
    return out


def check_content_mode(vm: ModelVm, inode: GmemInode, start: int, end: int, mode: int,
                       to_private: bool, before: dict[int, bytes]) -> None:
    """Raise :class:`InvariantError` (invariant 7) if the conversion broke its mode's promise."""
    if mode == u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED:
        return
    after = plaintext_digests(vm, inode, start, end, to_private)
    for index, digest in after.items():
        if mode == u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO and digest != _ZERO_DIGEST:
            raise InvariantError(f"invariant 7 violated: page {index:#x} does not read zero after a "
                                 "ZERO conversion")
        if mode == u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE and before.get(index, digest) != digest:
            raise InvariantError(f"invariant 7 violated: page {index:#x} lost its contents in a "
                                 "PRESERVE conversion")
