"""A VM of the model: memslots, per-VM memory attributes, the MMU, vCPUs (virt/kvm/kvm_main.c).

Every ioctl validates in upstream's order, so the first failing check decides the errno, and
fails before it changes anything.  Memslot updates, attribute updates and guest_memfd
invalidations all go through the MMU's invalidation protocol under ``mmu_lock``, so vCPU threads
faulting concurrently either see the old state or retry.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.args import as_bytes, u32, u64
from guestmem.errors import KvmError
from guestmem.model.kvm import attributes as attributes_mod
from guestmem.model.kvm import dirty_log
from guestmem.model.kvm import mmu as mmu_mod
from guestmem.model.kvm.arch import FLAVOURS, Flavour
from guestmem.model.kvm.attributes import set_vm_memory_attributes
from guestmem.model.kvm.guest_memfd import GmemFile, create_guest_memfd
from guestmem.model.kvm.memslot import Memslot, Memslots
from guestmem.ranges import RangeMap
from guestmem.sync import NamedLock

if TYPE_CHECKING:
    from guestmem.model.kvm.system import ModelKvm
    from guestmem.model.kvm.vcpu import ModelVcpu

PS = u.PAGE_SIZE
TASK_SIZE_MAX = (1 << 47) - PS  # x86-64, 4-level user address space: access_ok's bound
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << u.KVM_HC_MAP_GPA_RANGE


class ModelVm:
    """Implements :class:`guestmem.api.Vm`."""

    kind = "kvm-vm"

    def __init__(self, system: ModelKvm, vm_type: int) -> None:
        self.system = system
        self.vm_type = vm_type
        self.arch: Flavour = FLAVOURS[vm_type](self)
        self.slots_lock = NamedLock("slots_lock")
        self.mmu_lock = NamedLock("mmu_lock")
        self.nr_as = 2 if (system.options.smm and not self.arch.has_private_mem) else 1
        self.memslots = [Memslots() for _ in range(self.nr_as)]
        self.attributes: RangeMap[int] = RangeMap(0)  # per-VM attributes; all shared by default
        self.mmu = mmu_mod.Mmu(self, self.nr_as)
        self.vcpus: dict[int, ModelVcpu] = {}
        self.exit_hypercall_mask = 0
        # kvm->arch.n_max_mmu_pages was sized (kvm_arch_commit_memory_region on a CREATE or DELETE):
        # until then a shadow-paging MMU has no pages to make a root from (ENOSPC).
        self.mmu_pages_sized = False
        self._refs = 1
        self._refs_lock = threading.Lock()
        self.destroyed = False
        self.bugged = False  # KVM_BUG_ON: every later vCPU ioctl fails with EIO
        self.fd = system.process.install(self)
        self._notifier_begun: list[bool] = []
        system.process.register_notifier(self)  # kvm_init_mmu_notifier

    # --- lifetime -------------------------------------------------------------------------------
    def get(self) -> None:
        with self._refs_lock:
            self._refs += 1

    def put(self) -> None:
        with self._refs_lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._destroy()

    def close(self) -> None:
        """Close the VM fd.  The VM lives on while guest_memfd files still reference it."""
        if self.fd >= 0 and self.system.process.close_fd(self.fd) is self:
            self.fd = -1
            for vcpu in list(self.vcpus.values()):
                vcpu.close()
            self.put()

    def _destroy(self) -> None:
        with self.slots_lock():
            for ms in self.memslots:
                for slot in ms:
                    self._delete_slot(slot)
        self.destroyed = True
        self.system.vms.discard(self)
        self.system.process.unregister_notifier(self)

    # --- MMU notifier (kvm_mmu_notifier_invalidate_range_start/end) -------------------------------
    def _hva_slots(self, start: int, end: int) -> list[tuple[Memslot, int, int]]:
        out = []
        for ms in self.memslots:
            for slot in ms:
                s_hva, e_hva = slot.userspace_addr, slot.userspace_addr + slot.npages * PS
                a, b = max(start, s_hva), min(end, e_hva)
                if a < b:
                    g0 = slot.base_gfn + (a - s_hva) // PS
                    g1 = slot.base_gfn + (b - s_hva + PS - 1) // PS
                    out.append((slot, g0, g1))
        return out

    def invalidate_range_start(self, start: int, end: int) -> None:
        targets = self._hva_slots(start, end)
        self._notifier_begun.append(bool(targets))
        if not targets:
            return
        with self.mmu_lock():
            self.mmu.invalidate_begin()
            for slot, g0, g1 in targets:
                self.mmu.unmap_gfn_range(slot, g0, g1, mmu_mod.FILTER_SHARED)

    def invalidate_range_end(self, start: int, end: int) -> None:
        if self._notifier_begun and self._notifier_begun.pop():
            with self.mmu_lock():
                self.mmu.invalidate_end()

    def __del__(self) -> None:
        # Nobody holds the VM any more: close its fd, as the kernel backend's finalizer does.
        try:
            if self.fd >= 0:
                self.system.process.defer_release(self)
        except Exception:
            pass

    def __enter__(self) -> ModelVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- properties ------------------------------------------------------------------------------
    @property
    def has_private_mem(self) -> bool:
        return self.arch.has_private_mem

    def supported_mem_attributes(self) -> int:
        return u.KVM_MEMORY_ATTRIBUTE_PRIVATE if self.has_private_mem else 0

    def mem_is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private``: per-VM attribute, or (in-place mode) the guest_memfd's attribute
        at the gfn's index, false when no slot or no live file backs the gfn."""
        if not self.has_private_mem:
            return False
        if not self.system.options.gmem_attributes:
            return bool(self.attributes.get(gfn) & u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        slot = self.memslots[0].lookup(gfn)
        if slot is None or slot.gmem_file is None:
            return False
        return slot.gmem_file.inode.is_private(slot.gfn_to_index(gfn))

    def attribute_run_end(self, gfn: int, end: int) -> int:
        """The end of the run of gfns from ``gfn`` (before ``end``) whose private-ness is uniform."""
        if not self.has_private_mem:
            return end
        if not self.system.options.gmem_attributes:
            for _, e, _ in self.attributes.segments(gfn, end):
                return e
            return end
        for _, e, slot in self.memslots[0].in_range(gfn, end):
            if slot is None or slot.gmem_file is None:
                return e
            attrs = slot.gmem_file.inode.attributes
            i = slot.gfn_to_index(gfn)
            for _, ie, _ in attrs.segments(i, slot.gfn_to_index(e)):
                return slot.index_to_gfn(ie)
        return end

    def gmem_supported_flags(self) -> int:
        return self.system.gmem_supported_flags(self)

    def _check_open(self, op: str) -> None:
        """A call through a closed VM fd: EBADF (the VM itself may live on for its guest_memfds)."""
        self.system.process.run_deferred()
        if self.fd < 0:
            raise KvmError(errno.EBADF, op, "VM fd is closed")

    def check_extension(self, cap: int) -> int:
        cap = u64(cap, "cap")
        self._check_open("KVM_CHECK_EXTENSION")
        return self.system.cap_value(cap, self)

    def enable_cap(self, cap: int, flags: int = 0, args: tuple[int, ...] = ()) -> None:
        cap, flags = u32(cap, "cap"), u32(flags, "flags")
        if isinstance(args, str | bytes) or not hasattr(args, "__len__"):
            raise TypeError(f"args must be a sequence of ints, not {type(args).__name__}")
        if len(args) > 4:
            raise OverflowError("struct kvm_enable_cap has 4 args")
        args = tuple(u64(a, f"args[{i}]") for i, a in enumerate(args)) + (0,) * (4 - len(args))
        self._check_open("KVM_ENABLE_CAP")
        if flags:  # x86's kvm_vm_ioctl_enable_cap refuses any flags before looking at the cap
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "flags must be 0")
        if cap == u.KVM_CAP_EXIT_HYPERCALL:
            if args[0] & ~KVM_EXIT_HYPERCALL_VALID_MASK:
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "unsupported hypercall exit mask")
            self.exit_hypercall_mask = args[0]
            return
        raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"capability {cap} cannot be enabled on a VM")

    # --- guest_memfd ------------------------------------------------------------------------------
    @property
    def flavour(self) -> str:
        return self.arch.name

    def create_guest_memfd(self, size: int, flags: int = 0) -> GmemFile:
        size, flags = u64(size, "size"), u64(flags, "flags")
        self._check_open("KVM_CREATE_GUEST_MEMFD")
        return create_guest_memfd(self, size, flags)

    # --- memslots ---------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None:
        slot, flags = u32(slot, "slot"), u32(flags, "flags")
        guest_phys_addr = u64(guest_phys_addr, "guest_phys_addr")
        memory_size = u64(memory_size, "memory_size")
        userspace_addr = u64(userspace_addr, "userspace_addr")
        self._check_open("KVM_SET_USER_MEMORY_REGION")
        if flags & ~(u.KVM_MEM_LOG_DIRTY_PAGES | u.KVM_MEM_READONLY):
            raise KvmError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION", "flag not valid for v1")
        self._set_memory_region("KVM_SET_USER_MEMORY_REGION", slot, flags, guest_phys_addr,
                                memory_size, userspace_addr, None, 0)

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, guest_memfd: GmemFile | int | None = None,
                                guest_memfd_offset: int = 0) -> None:
        slot, flags = u32(slot, "slot"), u32(flags, "flags")
        guest_phys_addr = u64(guest_phys_addr, "guest_phys_addr")
        memory_size = u64(memory_size, "memory_size")
        userspace_addr = u64(userspace_addr, "userspace_addr")
        guest_memfd_offset = u64(guest_memfd_offset, "guest_memfd_offset")
        if guest_memfd is not None and not isinstance(guest_memfd, GmemFile):
            guest_memfd = u32(guest_memfd, "guest_memfd")
        self._check_open("KVM_SET_USER_MEMORY_REGION2")
        self._set_memory_region("KVM_SET_USER_MEMORY_REGION2", slot, flags, guest_phys_addr,
                                memory_size, userspace_addr, guest_memfd, guest_memfd_offset)

    def _check_flags(self, op: str, flags: int) -> None:
        valid = u.KVM_MEM_LOG_DIRTY_PAGES | u.KVM_MEM_GUEST_MEMFD
        if not (self.system.options.release.gmem_any_vm or self.has_private_mem):
            valid &= ~u.KVM_MEM_GUEST_MEMFD  # 6.8-6.17: guest_memfd slots only with private memory
        if flags & u.KVM_MEM_GUEST_MEMFD:
            valid &= ~u.KVM_MEM_LOG_DIRTY_PAGES
        if not self.arch.has_protected_state and not flags & u.KVM_MEM_GUEST_MEMFD:
            valid |= u.KVM_MEM_READONLY
        if flags & ~valid:
            raise KvmError(errno.EINVAL, op, f"invalid memslot flags {flags:#x}")

    def check_region_geometry(self, op: str, slot_arg: int, gpa: int, size: int, hva: int,
                              offset: int | None, offset_name: str) -> tuple[int, int]:
        """``kvm_set_memory_region``'s sanity checks, in upstream's order (size, gpa, userspace
        address, the private/guest_memfd offset when there is one, slot ids, wrap); returns
        ``(as_id, slot id)``.  Shared by every memslot ioctl the model implements."""
        as_id, sid = slot_arg >> 16, slot_arg & 0xFFFF
        if size % PS or size >= 1 << 64:
            raise KvmError(errno.EINVAL, op, "memory_size not page aligned")
        if gpa % PS:
            raise KvmError(errno.EINVAL, op, "guest_phys_addr not page aligned")
        if hva % PS or hva + size > TASK_SIZE_MAX:
            raise KvmError(errno.EINVAL, op, "userspace_addr unaligned or not a user address")
        if offset is not None and (offset < 0 or offset % PS or offset + size >= 1 << 64):
            raise KvmError(errno.EINVAL, op, f"{offset_name} unaligned or wrapping")
        if as_id >= self.nr_as or sid >= u.KVM_MEM_SLOTS_NUM:
            raise KvmError(errno.EINVAL, op, "address space or slot id out of range")
        if gpa + size >= 1 << 64:
            raise KvmError(errno.EINVAL, op, "guest physical range wraps")
        return as_id, sid

    def _set_memory_region(self, op: str, slot_arg: int, flags: int, gpa: int, size: int, hva: int,
                           gmem: GmemFile | int | None, gmem_offset: int) -> None:
        with self.slots_lock():
            if (slot_arg & 0xFFFF) >= u.KVM_USER_MEM_SLOTS:
                raise KvmError(errno.EINVAL, op, "slot id beyond KVM_USER_MEM_SLOTS")
            self._check_flags(op, flags)
            as_id, sid = self.check_region_geometry(
                op, slot_arg, gpa, size, hva,
                gmem_offset if flags & u.KVM_MEM_GUEST_MEMFD else None, "guest_memfd_offset")
            npages = size // PS
            if npages > u.KVM_MEM_MAX_NR_PAGES:
                raise KvmError(errno.EINVAL, op, "memslot too large")
            slots = self.memslots[as_id]
            old = slots.get(sid)
            if size == 0:
                if old is None:
                    raise KvmError(errno.EINVAL, op, "deleting a memslot that does not exist")
                self._delete_slot(old)
                self.mmu_pages_sized = True
                return
            base_gfn = gpa // PS
            if old is not None:
                # guest_memfd memslots are immutable: they can only be deleted.
                if flags & u.KVM_MEM_GUEST_MEMFD or old.has_gmem:
                    raise KvmError(errno.EINVAL, op, "a guest_memfd memslot cannot be modified")
                if (hva != old.userspace_addr or npages != old.npages
                        or (flags ^ old.flags) & u.KVM_MEM_READONLY):
                    raise KvmError(errno.EINVAL, op, "only the GPA or dirty-logging of a slot may change")
                if base_gfn == old.base_gfn:
                    before = old.flags
                    old.flags = (old.flags & ~0xFFFF) | flags  # FLAGS_ONLY (or a no-op)
                    dirty_log.slot_flags_set(self, old, before)
                    return
                if slots.overlaps(sid, base_gfn, base_gfn + npages):
                    raise KvmError(errno.EEXIST, op, "memslot overlaps another")
                self._check_max_gfn(op, base_gfn, npages)
                before = old.flags
                old.flags = (old.flags & ~0xFFFF) | flags
                self._move_slot(old, base_gfn)
                dirty_log.slot_flags_set(self, old, before & ~u.KVM_MEM_LOG_DIRTY_PAGES)
                return
            if slots.overlaps(sid, base_gfn, base_gfn + npages):
                raise KvmError(errno.EEXIST, op, "memslot overlaps another")
            new = Memslot(as_id, sid, base_gfn, npages, flags, hva)
            gfile: GmemFile | None = None
            if flags & u.KVM_MEM_GUEST_MEMFD:
                gfile = self._fget_gmem(op, gmem)
                gfile.bind(new, gmem_offset)
            try:
                self._check_max_gfn(op, base_gfn, npages)
            except KvmError:
                if gfile is not None:
                    gfile.unbind(new)
                raise
            mmu_mod.init_memslot_lpage(self, new)
            dirty_log.slot_flags_set(self, new, 0)  # the bitmap exists before the slot is visible
            with self.mmu_lock():
                slots.insert(new)
            self.mmu_pages_sized = True

    def _check_max_gfn(self, op: str, base_gfn: int, npages: int) -> None:
        opts = self.system.options
        bits = opts.phys_bits if opts.tdp_mmu else 52
        last = base_gfn + npages - 1
        if last > (1 << (bits - u.PAGE_SHIFT)) - 1:
            raise KvmError(errno.EINVAL, op, f"memslot beyond the {bits}-bit guest physical space")
        if self.arch.gfn_alias_bit and last >= self.arch.gfn_alias_bit:
            raise KvmError(errno.EINVAL, op, "memslot reaches the shared-GPA alias (kvm_is_gfn_alias)")

    # --- confidential launch (SNP_LAUNCH_UPDATE/FINISH, TDX_INIT_MEM_REGION/FINALIZE_VM) ---------
    def launch_update(self, gpa: int, size: int, src: bytes | None = None) -> int:
        """Populate initial private memory (measured); ``src=None`` encrypts in place."""
        gpa, size = u64(gpa, "gpa"), u64(size, "size")
        if src is not None:
            src = bytes(as_bytes(src, "src"))
        self._check_open("launch_update")
        with self.slots_lock():
            return self.arch.launch_update(gpa, size, src)

    def launch_finalize(self) -> None:
        """End the launch: the guest may run, pre-faulting is allowed, PRESERVE-to-private is not."""
        self._check_open("launch_finalize")
        self.arch.launch_finalize()

    def _fget_gmem(self, op: str, gmem: GmemFile | int | None) -> GmemFile:
        fd = gmem.fd if isinstance(gmem, GmemFile) else (gmem if gmem is not None else 0)
        obj = self.system.process.fget(fd) if 0 <= fd < 1 << 31 else None
        if obj is None:
            raise KvmError(errno.EBADF, op, f"guest_memfd {fd} is not an open fd")
        if not isinstance(obj, GmemFile):
            raise KvmError(errno.EINVAL, op, f"fd {fd} is not a guest_memfd")
        if obj.vm is not self:
            raise KvmError(errno.EINVAL, op, "guest_memfd belongs to another VM")
        return obj

    def _delete_slot(self, slot: Memslot) -> None:
        with self.mmu_lock():
            self.mmu.invalidate_begin()
            self.mmu.range_add(slot.base_gfn, slot.end_gfn)
            self.mmu.zap(slot.as_id, slot.base_gfn, slot.end_gfn)
            self.memslots[slot.as_id].remove(slot)
            self.mmu.invalidate_end()
        if slot.gmem_file is not None:
            slot.gmem_file.unbind(slot)

    def _move_slot(self, slot: Memslot, base_gfn: int) -> None:
        with self.mmu_lock():
            self.mmu.invalidate_begin()
            self.mmu.range_add(slot.base_gfn, slot.end_gfn)
            self.mmu.zap(slot.as_id, slot.base_gfn, slot.end_gfn)
            self.memslots[slot.as_id].remove(slot)
            slot.base_gfn = base_gfn
            slot.lpage_mixed.clear()
            mmu_mod.init_memslot_lpage(self, slot)
            self.memslots[slot.as_id].insert(slot)
            self.mmu.invalidate_end()

    def slot_for(self, gfn: int, as_id: int = 0) -> Memslot | None:
        return self.memslots[as_id].lookup(gfn)

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG`` (see :mod:`guestmem.model.kvm.dirty_log`)."""
        slot = u32(slot, "slot")
        self._check_open("KVM_GET_DIRTY_LOG")
        with self.slots_lock():
            return dirty_log.get_dirty_log(self, slot)

    # --- memory attributes ------------------------------------------------------------------------
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        fast = attributes_mod.FAST  # one page, the common case, compiled (or NotImplemented)
        if fast is not None and fast.set_attributes_one(self, address, size, attributes, flags) is None:
            return
        address, size = u64(address, "address"), u64(size, "size")
        attributes, flags = u64(attributes, "attributes"), u64(flags, "flags")
        self._check_open("KVM_SET_MEMORY_ATTRIBUTES")
        set_vm_memory_attributes(self, address, size, attributes, flags)

    # --- vCPUs ------------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> ModelVcpu:
        from guestmem.model.kvm.vcpu import ModelVcpu

        vcpu_id = u64(vcpu_id, "vcpu_id")
        self._check_open("KVM_CREATE_VCPU")
        max_vcpus = self.system.options.max_vcpus
        # kvm_vm_ioctl_create_vcpu: ids go up to KVM_MAX_VCPU_IDS (x86: 4 x KVM_MAX_VCPUS, for
        # sparse APIC ids), the number of vCPUs up to KVM_MAX_VCPUS.
        if vcpu_id >= 4 * max_vcpus:
            raise KvmError(errno.EINVAL, "KVM_CREATE_VCPU", "vcpu id beyond KVM_MAX_VCPU_IDS")
        if len(self.vcpus) >= max_vcpus:
            raise KvmError(errno.EINVAL, "KVM_CREATE_VCPU", "already KVM_MAX_VCPUS vCPUs")
        if vcpu_id in self.vcpus:
            raise KvmError(errno.EEXIST, "KVM_CREATE_VCPU", f"vcpu {vcpu_id} exists")
        vcpu = ModelVcpu(self, vcpu_id)
        vcpu.fd = self.system.process.install(vcpu)  # a vCPU is an fd too (raw ioctls name it)
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch (:mod:`guestmem.model.kvm.rawioctl`)."""
        from guestmem.model.kvm.rawioctl import vm_ioctl

        return vm_ioctl(self, request, arg)

    # --- checking -----------------------------------------------------------------------------------
    def check_invariants(self, quiescent: bool = True) -> None:
        """Check docs/design.md's invariants.  Safe from any thread: it holds slots_lock and mmu_lock
        while it looks.  With ``quiescent=False`` (other threads may be mid-operation) the
        invariants that only hold between operations (no invalidation open, frame totals) are
        skipped."""
        from guestmem.model.kvm.invariants import check_vm

        self.system.process.run_deferred()
        with self.slots_lock(), self.mmu_lock():
            check_vm(self, quiescent)

    def __repr__(self) -> str:
        return f"ModelVm(type={u.VM_TYPE_NAMES.get(self.vm_type, self.vm_type)}, fd={self.fd})"


def _configure_fast() -> None:
    from guestmem.model.anon import ShmemBacking
    from guestmem.model.mm.pagecache import PageCache

    attributes_mod.configure_fast(ModelVm, ShmemBacking, PageCache)


_configure_fast()
