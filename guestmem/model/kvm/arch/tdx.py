"""The TDX-like flavour: the shared GPA bit, mirrored private page tables, accept before use.

A TD addresses shared memory with the GPA's shared bit set (bit 47 with a 48-bit GPAW) and
private memory with it clear; KVM keeps private mappings in a separate "mirror" tree (S-EPT), so
invalidations carry a filter saying which tree to zap.  A private page added after launch
(TDH.MEM.PAGE.AUG) is pending until the guest accepts it (TDG.MEM.PAGE.ACCEPT), which also
clears it; using it before raises #VE in the guest.  Removing a private mapping removes the page
from the TD, so it must be accepted again when it comes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.model.kvm.arch.encrypted import EncryptedFlavour

if TYPE_CHECKING:
    from guestmem.model.mm.frames import FramePool

SHARED_BIT = 1 << 47


class TdxFlavour(EncryptedFlavour):
    name = "tdx"
    vm_type = u.KVM_X86_TDX_VM
    mirrored_tdp = True
    unaccepted_exception = "#VE: private page accessed before TDG.MEM.PAGE.ACCEPT"
    gfn_alias_bit = SHARED_BIT >> u.PAGE_SHIFT

    def decode_gpa(self, gpa: int, access: str) -> tuple[int, str]:
        if gpa & SHARED_BIT:
            return gpa & ~SHARED_BIT, "shared"
        return gpa, access

    def on_accept(self, pool: FramePool, gfn: int, end: int, pfn: int) -> None:
        # ACCEPT initializes a pending page: the guest reads zeros (through its key) afterwards.
        # Pages already accepted (or added at launch) are left alone (TDX_PAGE_ALREADY_ACCEPTED).
        for s, e, done in list(self.accepted.segments(gfn, end)):
            if done:
                continue
            # Written when first reached (FramePool.defer): a page accepted and never used costs
            # neither the host's first-touch fault nor a cipher pass, and reads the same.
            self.engine.defer_zeros(pool, pfn + (s - gfn), e - s)
        self.mark_accepted(gfn, end, pfn)

    def private_zapped(self, gfn: int, end: int) -> None:
        self.accepted.set(gfn, end, False)
