"""The model's ``/dev/kvm``: the system object, its capabilities, and the simulated host.

``ModelKvm`` owns what the whole host shares: the frame pool (physical memory), the host process
(fd table and address space), the options, and run statistics.  Capability answers follow
upstream's ``kvm_vm_ioctl_check_extension_generic`` and the x86 ``kvm_vm_ioctl_check_extension``,
on the system fd (``kvm == NULL``) and on a VM fd, for the configuration the options describe.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections import Counter

from guestmem import fileabi as fa
from guestmem import uapi as u
from guestmem.args import s64, u64
from guestmem.errors import KvmError
from guestmem.model.anon import ShmemBacking
from guestmem.model.kvm.arch import FLAVOURS
from guestmem.model.kvm.vm import KVM_EXIT_HYPERCALL_VALID_MASK, ModelVm
from guestmem.model.mm.frames import FramePool
from guestmem.model.options import ModelOptions
from guestmem.model.process import PS, ModelMapping, Process, check_mmap_length


class ModelKvm:
    """Implements :class:`guestmem.api.Kvm` for the model."""

    backend = "model"
    kind = "kvm"

    def __init__(self, options: ModelOptions | None = None) -> None:
        self.options = options or ModelOptions()
        self.pool = FramePool(self.options.pool_bytes, nodes=self.options.numa_nodes)
        self.process = Process()
        self.process.pool = self.pool
        self.process.online_nodes = (1 << self.options.numa_nodes) - 1
        self.process.system = self
        self.fd = self.process.install(self)
        self.vms: weakref.WeakSet[ModelVm] = weakref.WeakSet()
        self.stats: Counter[str] = Counter()
        self.closed = False
        # Every live file with a page cache (frame conservation); weak, like every registry here:
        # a file goes when its last user reference does (see Process.defer_release).
        self._files: weakref.WeakSet[object] = weakref.WeakSet()

    def register_file(self, f: object) -> None:
        self._files.add(f)

    def unregister_file(self, f: object) -> None:
        self._files.discard(f)

    def live_files(self) -> list:
        return list(self._files)

    # --- Kvm ------------------------------------------------------------------------------------
    def _check_open(self, op: str) -> None:
        self.process.run_deferred()
        if self.closed:
            raise KvmError(errno.EBADF, op, "/dev/kvm is closed")

    def api_version(self) -> int:
        self._check_open("KVM_GET_API_VERSION")
        return u.KVM_API_VERSION

    def check_extension(self, cap: int) -> int:
        cap = u64(cap, "cap")
        self._check_open("KVM_CHECK_EXTENSION")
        return self.cap_value(cap, None)

    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> ModelVm:
        vm_type = u64(vm_type, "vm_type")
        self._check_open("KVM_CREATE_VM")
        if vm_type not in self.options.built_vm_types or vm_type not in FLAVOURS:
            raise KvmError(errno.EINVAL, "KVM_CREATE_VM", f"VM type {vm_type} not supported")
        vm = ModelVm(self, vm_type)
        self.vms.add(vm)
        return vm

    def mmap_anonymous(self, size: int) -> ModelMapping:
        size = u64(size, "size")
        self._check_open("mmap")
        check_mmap_length(size)
        backing = ShmemBacking(self.pool, self.process, size, "anon", self.options.anon_folio_order)
        self.register_file(backing)
        backing.on_release = lambda: self.unregister_file(backing)  # type: ignore[method-assign]
        return self.process.mmap(backing, size, 0)

    def memfd_create(self, size: int, flags: int = fa.MFD_CLOEXEC) -> ShmemBacking:
        size, flags = s64(size, "size"), fa.check_memfd_flags(flags)
        self._check_open("memfd_create")
        if flags & ~fa.MFD_ALL_FLAGS or (flags & fa.MFD_EXEC and flags & fa.MFD_NOEXEC_SEAL):
            raise KvmError(errno.EINVAL, "memfd_create", f"bad flags {flags:#x}")
        if size < 0:
            raise KvmError(errno.EINVAL, "ftruncate", "negative length")
        f = ShmemBacking(self.pool, self.process, size, "memfd", self.options.anon_folio_order)
        self.register_file(f)
        f.on_release = lambda: self.unregister_file(f)  # type: ignore[method-assign]
        f.install()
        if flags & fa.MFD_CLOEXEC:
            self.process.fd_cloexec.add(f.fd)
        # vm.memfd_noexec is 0 here: without MFD_NOEXEC_SEAL the file is executable (0777).
        seals = 0 if flags & (fa.MFD_ALLOW_SEALING | fa.MFD_NOEXEC_SEAL) else fa.F_SEAL_SEAL
        if flags & fa.MFD_NOEXEC_SEAL:
            f.__dict__["_fops_i_mode"] = fa.S_IFREG | 0o666
            seals |= fa.F_SEAL_EXEC
        f.__dict__["_fops_seals"] = seals
        return f

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch (:mod:`guestmem.model.kvm.rawioctl`)."""
        from guestmem.model.kvm.rawioctl import system_ioctl

        return system_ioctl(self, request, arg)

    # --- host memory management (mmap, NUMA policy, fork) ---------------------------------------------
    def mmap(self, length: int, prot: int = 3, flags: int = 0x01, fd: object = None,
             offset: int = 0) -> ModelMapping:
        """``mmap(NULL, length, prot, flags, fd, offset)`` (see :meth:`guestmem.api.Kvm.mmap`)."""
        from guestmem import mman

        mman.convert_mmap_args(length, prot, flags, fd, offset)  # the integer rule before EBADF
        self._check_open("mmap")
        return self.map_into(self.process, length, prot, flags, fd, offset, None)

    def map_into(self, process: Process, length: object, prot: object, flags: object, fd: object,
                 offset: object, fixed: int | None) -> ModelMapping:
        """``do_mmap`` in ``process``: the checks in the kernel's order, then the file's mmap."""
        from guestmem import mman
        from guestmem.model.kvm.guest_memfd import GmemFile

        length, prot, flags, off = mman.convert_mmap_args(length, prot, flags, fd, offset)
        prot &= mman.PROT_READ | mman.PROT_WRITE | mman.PROT_EXEC
        if fd is not None and not isinstance(fd, int):
            fd = getattr(fd, "fd", None)
            if not isinstance(fd, int):
                raise TypeError("fd must be a GuestMemfd, a HostFile, an int or None")
        if flags & (mman.MAP_FIXED | mman.MAP_FIXED_NOREPLACE) and fixed is None:
            raise ValueError("MAP_FIXED is Mapping.mmap_fixed (over part of a mapping this "
                             "interface owns), never an arbitrary address")
        if off % PS:  # the syscall entry checks the offset first
            raise KvmError(errno.EINVAL, "mmap", "offset must be page aligned")
        process.run_deferred()
        anon = fd is None or bool(flags & mman.MAP_ANONYMOUS)
        file = None
        if not anon:
            file = process.fget(fd)  # type: ignore[arg-type]
            if file is None:
                raise KvmError(errno.EBADF, "mmap", f"fd {fd} is not open")
        npages = check_mmap_length(length)
        if not anon and not mman.file_mmap_ok(off, npages * PS):
            raise KvmError(errno.EOVERFLOW, "mmap", "offset + length beyond MAX_LFS_FILESIZE")
        kind = flags & mman.MAP_TYPE
        shared = kind in (mman.MAP_SHARED, mman.MAP_SHARED_VALIDATE)
        if anon:
            if kind not in (mman.MAP_SHARED, mman.MAP_PRIVATE):
                raise KvmError(errno.EINVAL, "mmap", f"mapping type {kind:#x}")
            backing = ShmemBacking(self.pool, process, length, "anon",
                                   self.options.anon_folio_order if shared else 0)
            self.register_file(backing)
            backing.on_release = lambda: self.unregister_file(backing)  # type: ignore[method-assign]
            return process.mmap(backing, length, 0, prot=prot, shared=shared, fixed=fixed)
        if kind not in (mman.MAP_SHARED, mman.MAP_PRIVATE, mman.MAP_SHARED_VALIDATE):
            raise KvmError(errno.EINVAL, "mmap", f"mapping type {kind:#x}")
        known = mman.LEGACY_MAP_MASK
        if kind == mman.MAP_SHARED_VALIDATE and flags & ~known:
            raise KvmError(errno.EOPNOTSUPP, "mmap", f"unknown flags {flags & ~known:#x}")
        if isinstance(file, GmemFile):
            # The fd table lookup above is the open check: ``file`` is the struct file, which a
            # dup keeps open after the fd it was created with is closed.
            # guest_memfd's mount is MNT_NOEXEC (kvm_gmem_init: ``mnt_flags |= MNT_NOEXEC``; up to
            # 6.18 the anon_inode mount is SB_I_NOEXEC): do_mmap refuses PROT_EXEC with EPERM
            # before the file's mmap, and takes VM_MAYEXEC away.
            if prot & mman.PROT_EXEC:
                raise KvmError(errno.EPERM, "mmap", "guest_memfd is on a noexec mount")
            if not file.inode.mmap_supported:
                raise KvmError(errno.ENODEV, "mmap", "guest_memfd created without GUEST_MEMFD_FLAG_MMAP")
            if not shared:
                raise KvmError(errno.EINVAL, "mmap", "guest_memfd mappings must be MAP_SHARED")
            m = process.mmap(file, length, off // PS, prot=prot, fixed=fixed)
            m.max_prot &= ~mman.PROT_EXEC
            return m
        if isinstance(file, ShmemBacking):
            if shared:
                sealed = self._write_sealed(file)
                if sealed and prot & mman.PROT_WRITE:  # memfd_check_seals_mmap / check_write_seal
                    raise KvmError(errno.EPERM, "mmap", "the memfd is write-sealed")
                m = process.mmap(file, length, off // PS, prot=prot, fixed=fixed)
                if sealed:  # a read-only shared mapping may never become writable
                    m.max_prot &= ~mman.PROT_WRITE
                return m
            return self._map_private_file(process, file, length, off, prot, fixed)
        raise KvmError(errno.ENODEV, "mmap", f"fd {fd} cannot be mapped")

    @staticmethod
    def _write_sealed(file: object) -> bool:
        """``is_write_sealed``: the memfd carries F_SEAL_WRITE or F_SEAL_FUTURE_WRITE."""
        from guestmem import fileabi as fa

        seals = getattr(file, "_i_seals", None)
        return bool(seals is not None and seals() & (fa.F_SEAL_WRITE | fa.F_SEAL_FUTURE_WRITE))

    def _map_private_file(self, process: Process, file: ShmemBacking, length: int, off: int,
                          prot: int, fixed: int | None) -> ModelMapping:
        from guestmem.model.mm.cow import CowFile

        overlay = self._share_policy(self._new_overlay(process, length + off), file)
        return process.mmap(file, length, off // PS, prot=prot, shared=False,
                            source=CowFile(file, overlay), fixed=fixed)

    def _new_overlay(self, process: Process, size: int) -> ShmemBacking:
        overlay = ShmemBacking(self.pool, process, -(-size // PS) * PS, "anon")
        self.register_file(overlay)
        overlay.on_release = lambda: self.unregister_file(overlay)  # type: ignore[method-assign]
        overlay.get_file()
        return overlay

    def _share_policy(self, overlay: ShmemBacking, file: ShmemBacking) -> ShmemBacking:
        """A private mapping of a shmem file allocates its copies by the file's shared policy,
        and its mbind sets that policy (shmem's set_policy/get_policy serve every mapping)."""
        overlay.shared_policy = file.shared_policy
        if overlay.cache.placement is not None:
            overlay.cache.placement = file.shared_policy.placement
        return overlay

    def private_copy(self, m: ModelMapping):  # -> MappableFile
        """fork(2) of a MAP_PRIVATE mapping: the child's own copy of the parent's private pages
        (a new anonymous file, or a copy-on-write view with copied copies), holding its refs."""
        from guestmem.model.mm.cow import CowFile

        src = m.source
        old = src.overlay if isinstance(src, CowFile) else src
        new = self._new_overlay(m.process, old.size) if isinstance(src, CowFile) else None
        if new is None:
            new = ShmemBacking(self.pool, m.process, old.size, "anon")
            self.register_file(new)
            new.on_release = lambda: self.unregister_file(new)  # type: ignore[method-assign]
            new.get_file()
        if isinstance(src, CowFile):
            self._share_policy(new, src.base)  # type: ignore[arg-type]
        else:
            new.shared_policy.ranges = old.shared_policy.ranges.copy()
        for s, e, pfn, _ in old.cache.lookup_range(0, old.cache.end_index()):
            if pfn is None:
                continue
            new.cache.populate(s, e, 0)
            for a, b, dst, _ in new.cache.lookup_range(s, e):
                if dst is not None:
                    self.pool.copy(dst, pfn + (a - s), b - a)
            new.cache.mark_uptodate(s, e)
        if isinstance(src, CowFile):
            src.base.get_file()
            return CowFile(src.base, new)
        return new

    def set_mempolicy(self, mode: int, nodemask: int | None = None, maxnode: int = 64) -> None:
        """``set_mempolicy``: the task's policy, which allocations with no file policy follow."""
        from guestmem import mman
        from guestmem.args import s32

        # The integer rule for every argument before the kernel's first refusal (the mode's).
        mode, nodemask, maxnode = s32(mode, "mode"), mman.nodemask_value(nodemask), u64(maxnode, "maxnode")
        base, flags = mman.sanitize_mode("set_mempolicy", mode)
        nodes = mman.get_nodes("set_mempolicy", nodemask, maxnode)
        self._check_open("set_mempolicy")
        pol = mman.mpol_new("set_mempolicy", base, flags, nodes, self.process.online_nodes)
        self.process.task_policy.policy = pol

    def numa_nodes(self) -> list[int]:
        """The nodes with memory (``/sys/devices/system/node/online``)."""
        return list(range(self.options.numa_nodes))

    def fork(self):  # -> ModelChild
        """fork(2) of the host process: a child sharing MAP_SHARED memory, copying MAP_PRIVATE."""
        from guestmem.model.fork import ModelChild

        self._check_open("fork")
        return ModelChild(self.process.fork(), self.process)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.process.close_fd(self.fd)

    def __enter__(self) -> ModelKvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- capabilities -------------------------------------------------------------------------------
    def gmem_supported_flags(self, vm: ModelVm | None) -> int:
        """``kvm_gmem_get_supported_flags``: MMAP always; INIT_SHARED where the arch allows it
        (x86 upstream: VMs without private memory; in-place mode: every VM)."""
        flags = u.GUEST_MEMFD_FLAG_MMAP
        if vm is None or not vm.has_private_mem or self.options.gmem_attributes:
            flags |= u.GUEST_MEMFD_FLAG_INIT_SHARED
        return flags & self.options.release.gmem_flags

    def cap_value(self, cap: int, vm: ModelVm | None) -> int:
        o = self.options
        private = vm is None or vm.has_private_mem
        release = o.release
        table = {
            u.KVM_CAP_USER_MEMORY: 1,
            u.KVM_CAP_SYNC_MMU: 1,
            u.KVM_CAP_IMMEDIATE_EXIT: 1,
            u.KVM_CAP_USER_MEMORY2: 1,
            u.KVM_CAP_MEMORY_FAULT_INFO: 1,
            u.KVM_CAP_NR_MEMSLOTS: u.KVM_USER_MEM_SLOTS,
            u.KVM_CAP_NR_VCPUS: min(os.cpu_count() or 1, o.max_vcpus),
            u.KVM_CAP_MAX_VCPUS: o.max_vcpus,
            128: 4 * o.max_vcpus,  # KVM_CAP_MAX_VCPU_ID: KVM_MAX_VCPU_IDS (x86: 4 x KVM_MAX_VCPUS)
            u.KVM_CAP_READONLY_MEM: 1 if vm is None else int(not vm.arch.has_protected_state),
            u.KVM_CAP_MULTI_ADDRESS_SPACE: 0 if not o.smm else (2 if vm is None else vm.nr_as),
            u.KVM_CAP_EXIT_HYPERCALL: KVM_EXIT_HYPERCALL_VALID_MASK,
            u.KVM_CAP_GUEST_MEMFD: int(release.gmem_any_vm or private),
            # 6.8 has no KVM_CAP_GUEST_MEMFD_FLAGS (its guest_memfd has no flags): 0 either way.
            u.KVM_CAP_GUEST_MEMFD_FLAGS: self.gmem_supported_flags(vm),
            u.KVM_CAP_VM_TYPES: sum(1 << t for t in o.built_vm_types if t in FLAVOURS),
            u.KVM_CAP_PRE_FAULT_MEMORY: int(o.tdp_mmu and release.pre_fault_ioctl),
            u.KVM_CAP_MEMORY_ATTRIBUTES: 0 if o.gmem_attributes or not o.memory_attributes else (
                u.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0),
        }
        if cap in table:
            return table[cap]
        if cap == o.cap_guest_memfd_memory_attributes:
            if not o.gmem_attributes:
                return 0
            if o.inplace_revision == "v8":
                return u.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
            return u.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        if cap == o.cap_memory_attributes2_flags and o.content_modes:
            from guestmem.model.kvm.inplace import content_modes_for_cap

            return content_modes_for_cap(vm)
        return 0
