"""What the hardware-protected flavours (SEV-SNP-like, TDX-like) share.

Private memory is encrypted by a per-VM :class:`~guestmem.model.mm.encryption.EncryptionEngine`:
frames hold ciphertext, a private guest access encrypts on store and decrypts on load, a shared
access (C-bit clear / shared GPA bit set) is plaintext.  So content modes mean what they mean on
real hardware: after an UNSPECIFIED conversion the other side sees scrambled bytes; PRESERVE has
to re-encrypt; ZERO has to clear.

Launch: memory is populated (``launch_update``: SNP_LAUNCH_UPDATE / TDX_INIT_MEM_REGION, in place
when no source is given) until ``launch_finalize`` (SNP_LAUNCH_FINISH / TDX_FINALIZE_VM).  Before
that, pre-faulting is refused (``pre_fault_allowed``) and a guest page fault bugs the VM (EIO),
as the in-place series' "Bug CoCo VM on page fault before finalizing" does.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.kvm.arch import Flavour
from guestmem.model.mm.encryption import EncryptionEngine
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.kvm.guest_memfd import GmemInode
    from guestmem.model.kvm.vm import ModelVm
    from guestmem.model.mm.frames import FramePool

PS = u.PAGE_SIZE
ZERO = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE


class EncryptedFlavour(Flavour):
    has_private_mem = True
    hw_access_kind = True
    has_protected_state = True
    # "the guest's pages need validation/acceptance before private use"
    validation_name = "validate"

    def __init__(self, vm: ModelVm) -> None:
        super().__init__(vm)
        self.engine = EncryptionEngine()
        self.finalized = False
        # gfns (TDX) or pfns (SNP) the guest has validated/accepted for private use.
        self.accepted: RangeMap[bool] = RangeMap(False)

    # --- launch -----------------------------------------------------------------------------------
    def pre_fault_allowed(self) -> bool:
        return self.finalized

    def check_fault_allowed(self) -> None:
        if not self.finalized:
            self.vm.bugged = True
            raise KvmError(errno.EIO, "KVM_RUN", f"{self.name}: guest page fault before the launch "
                           "was finalized; the VM is bugged")

    def launch_finalize(self) -> None:
        if self.finalized:
            raise KvmError(errno.EINVAL, "launch_finalize", "launch already finalized")
        self.finalized = True

    def launch_update(self, gpa: int, size: int, src: bytes | None) -> int:
        """Populate private pages [gpa, gpa+size) with ``src`` (or, without a source, encrypt the
        page's current contents in place); the pages end up private, encrypted and validated."""
        op = f"{self.name}_launch_update"
        vm = self.vm
        if self.finalized:
            raise KvmError(errno.EINVAL, op, "launch already finalized")
        if gpa % PS or size <= 0 or size % PS:
            raise KvmError(errno.EINVAL, op, "range must be page aligned and non-empty")
        if src is not None and len(src) != size:
            raise KvmError(errno.EINVAL, op, "source must be exactly size bytes")
        gfn, end = gpa // PS, (gpa + size) // PS
        slot = vm.slot_for(gfn)
        if slot is None or not slot.has_gmem:
            raise KvmError(errno.EINVAL, op, f"gpa {gpa:#x} is not in a guest_memfd memslot")
        if slot.gmem_file is None:
            raise KvmError(errno.EFAULT, op, "the guest_memfd was closed")
        end = min(end, slot.end_gfn)
        g = gfn
        while g < end:
            if not vm.mem_is_private(g):
                if g == gfn:
                    raise KvmError(errno.EINVAL, op, f"gfn {g:#x} is not private")
                break
            g2 = min(end, vm.attribute_run_end(g, end))
            runs, err = slot.gmem_file.get_pfn_range(slot, g, g2, zero=src is not None)
            if not runs:
                raise KvmError(err or errno.EFAULT, op, f"gfn {g:#x} cannot be populated")
            pool = vm.system.pool
            for rs, re_, pfn, _ in runs:
                a, b = max(rs, g), min(re_, g2)
                if a >= b:  # a run of the widened (whole-folio) lookup outside [g, g2)
                    continue
                first = pfn + (a - rs)
                frames = pool.view(first, b - a).reshape(-1)
                if src is not None:
                    data = np.frombuffer(src, dtype=np.uint8)[(a - gfn) * PS : (b - gfn) * PS]
                else:
                    data = frames  # in place: no copy of the range
                self.engine.encrypt_into(first, data, frames)
                self.mark_accepted(a, b, first)
            g = g2
        return (g - gfn) * PS

    # --- guest accesses ---------------------------------------------------------------------------
    def guest_write(self, pool: FramePool, pfn: int, off: int, n: int, byte: int, private: bool) -> None:
        """A private store: pages it covers whole are encrypted from the pattern in chunks (no
        plaintext copy of the range); a page it covers in part is decrypted, patched, re-encrypted."""
        if not private:
            return super().guest_write(pool, pfn, off, n, byte, private)
        if n <= 0:
            return None
        p0, p1 = off // PS, (off + n + PS - 1) // PS
        full0, full1 = (off + PS - 1) // PS, (off + n) // PS  # the pages written whole
        for p in sorted({p0, p1 - 1}):
            if full0 <= p < full1:
                continue
            page = pool.view(pfn + p, 1).reshape(-1)
            plain = self.engine.decrypt(pfn + p, page)
            plain[max(off - p * PS, 0) : min(off + n - p * PS, PS)] = byte
            self.engine.encrypt_into(pfn + p, plain, page)
        if full0 < full1:
            self.engine.fill_encrypt(pfn + full0, pool.view(pfn + full0, full1 - full0).reshape(-1), byte)
        return None

    def guest_read(self, pool: FramePool, pfn: int, off: int, n: int, private: bool) -> np.ndarray:
        if not private:
            return super().guest_read(pool, pfn, off, n, private)
        p0, p1 = off // PS, (off + n + PS - 1) // PS
        plain = self.engine.decrypt(pfn + p0, pool.view(pfn + p0, p1 - p0).reshape(-1))
        return plain[off - p0 * PS : off - p0 * PS + n]

    # --- validation / acceptance -------------------------------------------------------------------
    def accept_key(self, gfn: int, pfn: int) -> int:
        """What acceptance is tracked by: the gfn (TDX SEPT) or the pfn (SNP RMP)."""
        return gfn

    def mark_accepted(self, gfn: int, end: int, pfn: int) -> None:
        k = self.accept_key(gfn, pfn)
        self.accepted.set(k, k + (end - gfn), True)

    def on_accept(self, pool: FramePool, gfn: int, end: int, pfn: int) -> None:
        """The guest accepts/validates private gfns [gfn, end) backed from ``pfn``."""
        self.mark_accepted(gfn, end, pfn)

    def guest_access_fault(self, gfn: int, end: int, private: bool, write: bool) -> tuple[int, str] | None:
        if not private:
            return None
        vm = self.vm
        sp = vm.mmu.sptes[0]
        g = gfn
        for s, e, spte in sp.segments(gfn, end):
            if spte is None:
                continue
            k0 = self.accept_key(s, s + spte.delta)
            bad = self.accepted.first_match(k0, k0 + (e - s), lambda v: not v)
            if bad is not None:
                g = s + (bad - k0)
                return g, self.unaccepted_exception
        return None

    unaccepted_exception = "guest exception: private page used before it was validated"

    # --- content modes (in-place conversion, RFC v5) -----------------------------------------------
    def supported_content_modes(self, to_private: bool) -> int:
        if to_private:
            return PRESERVE if not self.finalized else 0
        return ZERO

    def apply_content_mode(self, inode: GmemInode, start: int, end: int, mode: int, to_private: bool) -> None:
        pool = self.vm.system.pool
        for s, e, pfn, _ in inode.cache.lookup_range(start, end):
            if pfn is None:
                continue
            frames = pool.view(pfn, e - s).reshape(-1)
            if mode == ZERO:
                frames.fill(0)
            elif mode == PRESERVE and to_private:
                self.engine.encrypt_into(pfn, frames, frames)  # in place, in chunks
                slot_gfn = self._gfn_of_index(inode, s)
                if slot_gfn is not None:
                    self.mark_accepted(slot_gfn, slot_gfn + (e - s), pfn)
            # UNSPECIFIED: KVM does nothing; the encryption leaves the other side scrambled.

    def _gfn_of_index(self, inode: GmemInode, index: int) -> int | None:
        for f in inode.files:
            slot = f.bindings.get(index)
            if slot is not None:
                return slot.index_to_gfn(index)
        return None
