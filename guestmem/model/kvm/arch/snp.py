"""The SEV-SNP-like flavour: an RMP ownership table, guest validation, 2 MiB direct-map accounting.

The RMP (Reverse Map Table) records, per physical frame, whether the hypervisor or a guest owns it
and whether the guest has validated it (PVALIDATE).  ``gmem_prepare`` assigns a frame to the guest
(``rmp_make_private``) when guest_memfd first hands it out as private; ``gmem_invalidate`` takes
it back (``rmp_make_shared``/reclaim) when it turns shared or is freed.  A host write to a
guest-owned frame is an RMP violation (the model refuses it as a fault), a private guest access
to an unvalidated page raises #VC in the guest.

Assigning a 4 KiB frame forces the host's 2 MiB direct mapping around it to be split; the
mapping can be restored once no frame of that 2 MiB region is guest-owned any more.  The model
counts both, because that is the cost seed 000's reply wanted invalidation-by-folio to cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.model.kvm.arch.encrypted import EncryptedFlavour
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.kvm.guest_memfd import GmemFile
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.mm.frames import FramePool

REGION = 9  # 2 MiB direct-map regions, in pfn bits


class Rmp:
    """The host-wide RMP: pfn -> guest-owned?  (validation lives in the flavour's ``accepted``)."""

    def __init__(self) -> None:
        self.assigned: RangeMap[bool] = RangeMap(False)
        self.directmap_splits = 0
        self.directmap_restores = 0

    def assign(self, pfn: int, n: int) -> None:
        self._account(pfn, n, True)
        self.assigned.set(pfn, pfn + n, True)

    def reclaim(self, pfn: int, n: int) -> None:
        if not self.assigned.any_match(pfn, pfn + n, bool):
            return
        self.assigned.set(pfn, pfn + n, False)
        self._account(pfn, n, False)

    def _account(self, pfn: int, n: int, assigning: bool) -> None:
        r0, r1 = pfn >> REGION, (pfn + n - 1 >> REGION) + 1
        for r in range(r0, r1):
            lo, hi = r << REGION, (r + 1) << REGION
            any_owned = self.assigned.any_match(lo, hi, bool)
            if assigning and not any_owned:
                self.directmap_splits += 1
            elif not assigning and not any_owned:
                self.directmap_restores += 1

    def owned(self, pfn: int, n: int) -> int | None:
        return self.assigned.first_match(pfn, pfn + n, bool)


class SnpFlavour(EncryptedFlavour):
    name = "snp"
    vm_type = u.KVM_X86_SNP_VM
    unaccepted_exception = "#VC: private page accessed before PVALIDATE"

    @property
    def rmp(self) -> Rmp:
        system = self.vm.system
        rmp = getattr(system, "rmp", None)
        if rmp is None:
            rmp = system.rmp = Rmp()  # type: ignore[attr-defined]
        return rmp

    def accept_key(self, gfn: int, pfn: int) -> int:
        return pfn  # the RMP's validated bit is per frame

    def gmem_prepare(self, gmem: GmemFile, slot: Memslot, runs: list[tuple[int, int, int, int]]) -> None:
        if len(runs) == 1 and runs[0][1] == runs[0][0] + 1:  # one gfn (a 4 KiB fault)
            s, _, pfn, _ = runs[0]
            if self.vm.mem_is_private(s):
                self.rmp.assign(pfn, 1)
            return
        for s, e, pfn, _ in runs:
            g = s
            while g < e:
                g2 = min(e, self.vm.attribute_run_end(g, e))
                if self.vm.mem_is_private(g):
                    self.rmp.assign(pfn + (g - s), g2 - g)
                g = g2

    def gmem_invalidate(self, pfn: int, npages: int) -> None:
        self.rmp.reclaim(pfn, npages)
        self.accepted.set(pfn, pfn + npages, False)

    def host_may_access(self, pfn: int, n: int) -> int | None:
        """The first guest-owned frame in the run (an RMP violation for the host), or None."""
        return self.rmp.owned(pfn, n)

    def on_accept(self, pool: FramePool, gfn: int, end: int, pfn: int) -> None:
        self.mark_accepted(gfn, end, pfn)
