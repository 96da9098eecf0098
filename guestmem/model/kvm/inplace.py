"""In-place shared/private conversion (seed 004 and its series): ``KVM_SET_MEMORY_ATTRIBUTES2``.

With per-guest_memfd attributes (``guestmem.open("model", attributes="gmem")``) the shared/private
state of every page lives in the guest_memfd inode, covering the whole file whether or not a page
is allocated; shared pages are mmap-able and serve as the guest's shared memory, so there is one
copy of memory.  A conversion is all-or-nothing:

1. validation (the revision's flag rules, reserved words, attributes, range), EINVAL;
2. under the inode's invalidate lock: (RFC v5) the content mode must be one the VM's flavour can
   honour in that direction, else EOPNOTSUPP with ``error_offset`` = start;
3. nothing to change -> return (v5 still applies the content mode);
4. to private: host mappings are unmapped, then every allocated page in range must carry no
   extra reference (a GUP/IOMMU pin), else EAGAIN with ``error_offset`` = the first such folio;
5. the point of no return: invalidate (zapping SPTEs of the old kind), give frames back to the
   host when going shared (SNP reclaim), apply the content mode, store, end the invalidation.

Large folios (the hugepage extension) are split where a conversion cuts through them and merged
back when a naturally aligned block is whole and uniform again.

Revisions: "v5" (the seed: flags carry content modes UNSPECIFIED/ZERO/PRESERVE) and "v8" (the
newest posting: flags must be 0, the VM must have private memory, attributes only PRIVATE).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.kvm import mmu as mmu_mod
from guestmem.model.kvm.content_check import check_content_mode, plaintext_digests
from guestmem.sync import schedule_point

if TYPE_CHECKING:
    from guestmem.model.kvm.guest_memfd import GmemFile, GmemInode
    from guestmem.model.kvm.vm import ModelVm

OP = "KVM_SET_MEMORY_ATTRIBUTES2"
PS = u.PAGE_SIZE
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ZERO = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE
U64 = 1 << 64


def mode_supported(vm: ModelVm, mode: int, to_private: bool) -> bool:
    """``kvm_gmem_content_mode_is_supported``."""
    if mode == u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED:
        return True
    if mode == ZERO and to_private:
        return False  # KVM can't promise the guest reads zeros
    return bool(vm.arch.supported_content_modes(to_private) & mode)


def content_modes_for_cap(vm: ModelVm | None) -> int:
    """KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS (RFC v5): the modes the VM type supports in any direction."""
    if vm is None:
        return ZERO | PRESERVE
    if not vm.has_private_mem:
        return 0
    # The series reports the modes a VM type may use at all (SNP/TDX: PRESERVE before finalize).
    return ZERO | PRESERVE


def set_memory_attributes2(f: GmemFile, offset: int, size: int, attributes: int, flags: int,
                           reserved: Sequence[int] = ()) -> None:
    opts = f.system.options
    if not opts.gmem_attributes:
        raise KvmError(errno.ENOTTY, OP, "guest_memfd attributes are disabled (per-VM attributes mode)")
    vm, inode = f.vm, f.inode
    v5 = opts.inplace_revision == "v5"
    if v5:
        if flags & ~(ZERO | PRESERVE):
            raise KvmError(errno.EINVAL, OP, f"unknown flags {flags:#x}")
        if flags & ZERO and flags & PRESERVE:
            raise KvmError(errno.EINVAL, OP, "ZERO and PRESERVE are exclusive")
    elif flags:
        raise KvmError(errno.EINVAL, OP, "flags must be 0")
    if any(reserved):
        raise KvmError(errno.EINVAL, OP, "reserved fields must be 0")
    if not v5:
        if not vm.has_private_mem:
            raise KvmError(errno.EINVAL, OP, "the VM has no private memory")
        if attributes & ~PRIVATE:
            raise KvmError(errno.EINVAL, OP, f"unsupported attributes {attributes:#x}")
    elif attributes & ~vm.supported_mem_attributes():
        raise KvmError(errno.EINVAL, OP, f"unsupported attributes {attributes:#x}")
    if size == 0 or offset + size >= U64 or offset >= U64:
        raise KvmError(errno.EINVAL, OP, "size is 0 or the range wraps")
    if offset % PS or size % PS:
        raise KvmError(errno.EINVAL, OP, "offset and size must be page aligned")
    if offset >= inode.size or offset + size > inode.size:
        raise KvmError(errno.EINVAL, OP, "range beyond the guest_memfd's size")
    start, end = offset // PS, (offset + size) // PS
    to_private = bool(attributes & PRIVATE)
    with inode.invalidate_lock.write():
        mode = flags if v5 else None
        if mode is not None and not mode_supported(vm, mode, to_private):
            raise KvmError(errno.EOPNOTSUPP, OP, f"{vm.arch.name} VMs cannot honour content mode "
                           f"{mode:#x} {'to private' if to_private else 'to shared'}",
                           error_offset=start * PS)
        # Invariant 7 is checked where nothing else can touch the pages: inside the invalidation.
        # The no-op path below has no invalidation (the guest may keep writing), so it is not.
        checking = mode is not None and opts.check_content_modes
        if inode.attributes.all_equal(start, end, attributes):
            if mode is not None:
                vm.arch.apply_content_mode(inode, start, end, mode, to_private)
            return
        if to_private:
            # unmap_mapping_pages: host PTEs go (secondary MMUs hear about it), then the
            # refcount check: a pinned allocated page makes the whole request fail.
            f.system.process.invalidate_file_range(f, start, end, lambda: None)
            pinned = inode.cache.first_elevated(start, end)
            if pinned is not None:
                head = inode.cache.folio(pinned)
                err_index = max(start, head[0] if head else pinned)
                raise KvmError(errno.EAGAIN, OP, f"page {pinned:#x} has elevated references",
                               error_offset=err_index * PS)
            # The window between the refcount check and the attribute store.
            schedule_point("convert: refcount checked", start, end)
        # The invalidation covers every large folio the conversion cuts through, not only the
        # converted pages: a fault elsewhere in such a folio that resolved it whole must retry
        # rather than map it huge after the split (found by guestmem explore at 2 preemptions).
        zap_lo, zap_hi = _split_span(inode, start, end)
        inode.invalidate_begin(start, end, _old_filter(inode, start, end), retry_span=(zap_lo, zap_hi))
        try:
            # Inside the invalidation: no SPTE maps the range while its folios are split, and no
            # guest access lands between the "before" digest and the change.
            _split_edges(inode, start, end)
            before = plaintext_digests(vm, inode, start, end) if checking else {}
            if not to_private and inode.arch_invalidate is not None:
                for s, e, pfn, _ in list(inode.cache.lookup_range(start, end)):
                    if pfn is not None:
                        inode.arch_invalidate(pfn, e - s)
            if mode is not None:
                vm.arch.apply_content_mode(inode, start, end, mode, to_private)
            inode.attributes.set(start, end, attributes)
            if checking:
                assert mode is not None
                check_content_mode(vm, inode, start, end, mode, to_private, before)
        finally:
            inode.invalidate_end(zap_lo, zap_hi)
        _merge_edges(inode, start, end)
    f.system.stats["conversions"] += 1


def _old_filter(inode: GmemInode, start: int, end: int) -> int:
    """Zap the SPTEs of the kind(s) present before the change (series patch 17)."""
    flt = 0
    for _, _, v in inode.attributes.segments(start, end):
        flt |= mmu_mod.FILTER_PRIVATE if v & PRIVATE else mmu_mod.FILTER_SHARED
    return flt


def _split_span(inode: GmemInode, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` widened to the large folios :func:`_split_edges` will split."""
    lo, hi = start, end
    if inode.folio_order:
        for edge in (start, end - 1):
            fol = inode.cache.folio(edge)
            if fol is not None and fol[2]:
                lo, hi = min(lo, fol[0]), max(hi, fol[0] + (1 << fol[2]))
    return lo, hi


def _split_edges(inode: GmemInode, start: int, end: int) -> None:
    """Split large folios that the conversion cuts through (the 1G-page series' split)."""
    if not inode.folio_order:
        return
    for edge in (start, end - 1):
        fol = inode.cache.folio(edge)
        if fol is None or fol[2] == 0:
            continue
        fs, fe = fol[0], fol[0] + (1 << fol[2])
        if start <= fs and fe <= end:
            continue
        inode.cache.split(fs, fe, 0)


def _merge_edges(inode: GmemInode, start: int, end: int) -> None:
    """Merge aligned blocks around the range back into large folios where they are whole,
    physically contiguous and uniform in attributes again."""
    order = inode.folio_order
    if not order:
        return
    size = 1 << order
    blocks = {start & ~(size - 1), (end - 1) & ~(size - 1)}
    for b in blocks:
        if b + size > inode.npages:
            continue
        if inode.attributes.distinct(b, b + size) == 1:
            inode.cache.merge(b, order)
