"""When the VMM discards the other side of a conversion, and when it must not.

After a page goes private its shared copy is dead weight, and after it goes shared its private
copy is; dropping them keeps resident memory at one copy of the guest.  But dropping is not always
safe or useful:

* a hugetlb-backed shared side cannot give back 4 KiB pieces, and a preallocated one is meant to
  stay populated (QEMU skips ``ram_block_discard_range`` for both);
* a device that pins all guest RAM for DMA (legacy VFIO type1 without coordinated discard) would
  keep a stale IOMMU mapping of a discarded page, so QEMU disables discard altogether while one is
  attached -- the origin of the "4 GB SNP guest uses 7 GB" reports;
* a page pinned for DMA in flight must not be dropped under the device; its discard is deferred
  until the pin goes.

:class:`DiscardPolicy` holds the operator's wishes; :func:`shared_discard_blocker` and
:func:`private_discard_blocker` say what overrides them, with the reason recorded in the trace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from guestmem.vmm.backing import Strategy

SharedBacking = Literal["anon", "prealloc", "hugetlb"]
SHARED_BACKINGS = ("anon", "prealloc", "hugetlb")


@dataclass(frozen=True)
class DiscardPolicy:
    """The operator's wishes for the other side of a conversion.

    ``discard_shared``: drop the shared copy after to-private (MADV_REMOVE).
    ``discard_private``: punch the guest_memfd copy after to-shared (PUNCH_HOLE).
    ``preallocate_private``: fallocate the guest_memfd on to-private (the selftest's do_fallocate).
    ``shared_backing``: what the shared side is; "prealloc" and "hugetlb" are never discarded.
    """

    discard_shared: bool = True
    discard_private: bool = True
    preallocate_private: bool = False
    shared_backing: SharedBacking = "anon"

    def with_(self, **changes: object) -> DiscardPolicy:
        return replace(self, **changes)  # type: ignore[arg-type]


def shared_discard_blocker(policy: DiscardPolicy, strategy: Strategy, listener_blockers: list[str]
                           ) -> str | None:
    """Why the shared side of a separate-backing region must not be dropped now (None = drop it)."""
    if strategy is not Strategy.SEPARATE:
        return f"{strategy.value} backing has no separate shared copy"
    if policy.shared_backing == "hugetlb":
        return "shared side is hugetlb-backed"
    if policy.shared_backing == "prealloc":
        return "shared side is preallocated"
    if listener_blockers:
        return "; ".join(listener_blockers)
    if not policy.discard_shared:
        return "policy: discard_shared = false"
    return None


def private_discard_blocker(policy: DiscardPolicy, strategy: Strategy) -> str | None:
    """Why the guest_memfd side must not be punched after to-shared (None = punch it)."""
    if strategy is not Strategy.SEPARATE:
        return f"{strategy.value} backing keeps one copy (punching would destroy the shared data)"
    if not policy.discard_private:
        return "policy: discard_private = false"
    return None
