"""The interface both backends implement, and the typed exits a vCPU returns.

Names follow the uAPI, lower-cased (as rust-vmm's kvm-ioctls does).  Everything above this floor
(the VMM layer, scenarios, the CLI, the conformance suite) is written against these ``Protocol``s
only, so it runs unchanged on ``guestmem.open("model")`` and ``guestmem.open("kernel")``.

Conventions every implementation keeps:

* every refused call raises :class:`guestmem.errors.KvmError` with the errno the kernel returns,
  and changes no state;
* ``KVM_EXIT_MEMORY_FAULT`` is returned from :meth:`Vcpu.run` as an :class:`ExitMemoryFault`
  object.  The kernel reports it as ``KVM_RUN`` failing with ``EFAULT`` (or ``EHWPOISON``) while
  ``exit_reason`` says MEMORY_FAULT; the API hides that quirk and keeps the errno in
  :attr:`ExitMemoryFault.errno`;
* resources are context managers and are also released on garbage collection.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from guestmem import uapi as u

if TYPE_CHECKING:  # the op language (floor 2 too) is only named in a signature here
    from guestmem.guest.image import GuestImage
    from guestmem.guest.ops import Program

# --- exits ------------------------------------------------------------------------------------------


@dataclass
class Exit:
    """Base of every vCPU exit; ``reason`` is the ``KVM_EXIT_*`` number (or a guestmem pseudo-exit)."""

    reason: int = field(init=False, default=u.KVM_EXIT_UNKNOWN, repr=False)

    @property
    def name(self) -> str:
        return type(self).__name__.removeprefix("Exit").lower()


@dataclass
class ExitMemoryFault(Exit):
    """KVM_EXIT_MEMORY_FAULT: the guest's access kind (shared/private) does not match the gfn's
    attribute, or the memory cannot be served.  Userspace is expected to convert and re-run."""

    gpa: int
    size: int
    flags: int
    errno: int = 14  # EFAULT; EHWPOISON for a poisoned page

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_MEMORY_FAULT

    @property
    def private(self) -> bool:
        return bool(self.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE)

    def __repr__(self) -> str:
        err = "" if self.errno == 14 else f", errno={errno_mod.errorcode.get(self.errno, self.errno)}"
        return (f"ExitMemoryFault(gpa={self.gpa:#x}, size={self.size:#x}, "
                f"flags={u.named(u.MemoryExitFlag, self.flags)!r}{err})")


@dataclass
class ExitHypercall(Exit):
    """KVM_EXIT_HYPERCALL (only KVM_HC_MAP_GPA_RANGE exits to userspace).  Set ``ret`` before the
    next :meth:`Vcpu.run`; the guest sees it in RAX (0 = success, ``-KVM_E*`` = failure)."""

    nr: int
    args: tuple[int, ...]
    ret: int = 0
    longmode: bool = True

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_HYPERCALL

    # KVM_HC_MAP_GPA_RANGE argument decoding (gpa, npages, attrs).
    @property
    def gpa(self) -> int:
        return self.args[0]

    @property
    def npages(self) -> int:
        return self.args[1]

    @property
    def attrs(self) -> int:
        return self.args[2]

    @property
    def to_private(self) -> bool:
        return bool(self.attrs & u.KVM_MAP_GPA_RANGE_ENCRYPTED)

    def __repr__(self) -> str:
        nr = u.named(u.Hypercall, self.nr)
        if self.nr == u.KVM_HC_MAP_GPA_RANGE and len(self.args) >= 3:
            return (f"ExitHypercall(nr={nr!r}, gpa={self.gpa:#x}, npages={self.npages}, "
                    f"attrs={u.named(u.MapGpaRangeAttr, self.attrs)!r}, ret={self.ret})")
        return f"ExitHypercall(nr={nr!r}, args=({', '.join(hex(a) for a in self.args)}), ret={self.ret})"

    @property
    def page_size(self) -> int:
        """The page size the guest asked for (its PAGE_SZ bits); npages counts 4 KiB pages regardless."""
        bits = self.attrs & (u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M | u.KVM_MAP_GPA_RANGE_PAGE_SZ_1G)
        return {0: u.PAGE_SIZE, u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M: u.HPAGE_2M,
                u.KVM_MAP_GPA_RANGE_PAGE_SZ_1G: u.HPAGE_1G}.get(bits, 0)


@dataclass
class ExitIo(Exit):
    port: int
    size: int
    direction: int
    data: bytes
    count: int = 1

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_IO

    def __repr__(self) -> str:
        way = "out" if self.direction == u.KVM_EXIT_IO_OUT else "in"
        data = self.data.hex() or "-"
        return f"ExitIo(port={self.port:#x}, size={self.size}, {way}, data={data}, count={self.count})"


@dataclass
class ExitMmio(Exit):
    phys_addr: int
    len: int
    is_write: bool
    data: bytes = b""

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_MMIO

    def __repr__(self) -> str:
        way = "write" if self.is_write else "read"
        data = self.data.hex() or "-"
        return f"ExitMmio(phys_addr={self.phys_addr:#x}, len={self.len}, {way}, data={data})"


@dataclass
class ExitHalt(Exit):
    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_HLT


@dataclass
class ExitShutdown(Exit):
    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_SHUTDOWN


@dataclass
class ExitInternalError(Exit):
    suberror: int
    data: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_INTERNAL_ERROR


@dataclass
class ExitFailEntry(Exit):
    """KVM_EXIT_FAIL_ENTRY: the CPU refused to enter the guest."""

    hardware_entry_failure_reason: int = 0
    cpu: int = 0

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_FAIL_ENTRY


@dataclass
class ExitUnknown(Exit):
    """An exit this API does not decode; ``raw_reason`` is the kernel's ``exit_reason``."""

    raw_reason: int

    def __post_init__(self) -> None:
        self.reason = self.raw_reason


# Pseudo-exits: the guest-program protocol (a port-I/O doorbell on the kernel backend).
GUESTMEM_EXIT_SYNC = 0x1000
GUESTMEM_EXIT_ASSERT = 0x1001


@dataclass
class ExitSync(Exit):
    """The guest program reached ``Sync(value)``: the host may inspect or change memory, then run."""

    value: int

    def __post_init__(self) -> None:
        self.reason = GUESTMEM_EXIT_SYNC


@dataclass
class ExitGuestAssert(Exit):
    """A guest ``Verify`` (or another guest check) failed at ``gpa``: it expected ``expected`` and
    found ``found``.  ``op_index`` names the op in the loaded program."""

    gpa: int
    expected: int
    found: int
    op_index: int = -1
    message: str = ""

    def __post_init__(self) -> None:
        self.reason = GUESTMEM_EXIT_ASSERT

    def __str__(self) -> str:
        return (f"guest assertion failed at gpa {self.gpa:#x}: expected {self.expected:#04x}, "
                f"found {self.found:#04x}" + (f" ({self.message})" if self.message else ""))


@dataclass(frozen=True)
class FileStat:
    """What ``fstat(2)`` says about a file: the fields both backends can answer the same way.

    ``st_blocks`` counts 512-byte blocks the inode accounts for (shmem: every allocated page;
    guest_memfd: never anything, the kernel does not account its pages to the inode)."""

    st_mode: int
    st_size: int
    st_blocks: int
    st_blksize: int
    st_nlink: int
    st_ino: int


@dataclass(frozen=True)
class FsStat:
    """What ``fstatfs(2)`` says about a file's filesystem (``struct statfs``): ``f_type`` is the
    superblock magic (``TMPFS_MAGIC`` for a memfd; for a guest_memfd ``ANON_INODE_FS_MAGIC`` up to
    6.18, ``GUEST_MEMFD_MAGIC`` once guest_memfd has its own filesystem)."""

    f_type: int
    f_bsize: int
    f_blocks: int
    f_namelen: int
    f_frsize: int
    f_flags: int


RawIoctlResult = tuple[int, bytes]
"""What :meth:`ioctl` returns: the kernel's return value, and the argument buffer as the call left
it (``b""`` when the argument was an integer)."""


# --- resources --------------------------------------------------------------------------------------


@runtime_checkable
class Mapping(Protocol):
    """A host-userspace mapping: anonymous memory (``Kvm.mmap_anonymous``) or a guest_memfd mmap.

    ``addr`` is a host virtual address usable as a memslot's ``userspace_addr``.  Offsets and
    lengths are ``size_t``; a range outside the mapping raises :class:`GuestAccessFault`
    ("SIGSEGV") before anything is touched, and a closed mapping raises ``KvmError(EBADF)``.
    Reads and writes go through the kernel's fault path (the model's ``host_fault``), so where the
    kernel would deliver SIGBUS — a private guest_memfd page, a page past the file's end, a
    guest_memfd without host-shared pages, an SNP guest-owned frame — they raise
    :class:`GuestAccessFault` with the faulting ``offset``.
    """

    addr: int
    length: int

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes out of the mapping at ``offset`` (a CPU load; faults pages in)."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` (any buffer) into the mapping at ``offset`` (a CPU store)."""
        ...

    def fill(self, offset: int, length: int, byte: int) -> None:
        """``memset`` of ``[offset, offset+length)`` with ``byte`` (0..255; -128..-1 as unsigned char)."""
        ...

    def pin(self, offset: int, length: int) -> AbstractContextManager[None]:
        """A long-term pin (``get_user_pages``/``vmsplice``, what an IOMMU DMA mapping holds) on the
        page-aligned range, held while the returned context is.  EINVAL for an unaligned or empty
        range.  The pin holds the *pages*: a hole punch or close meanwhile removes them from the
        file but frees them only at the unpin.  In-place conversion to private refuses pinned
        pages with EAGAIN (``kvm_gmem_is_safe_for_conversion``)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """``madvise(MADV_REMOVE)``: free the pages of the range (the length rounds up to pages;
        EINVAL for an unaligned offset, ENOMEM past the mapping).  They read as zero afterwards and
        stop counting as resident; on a guest_memfd mapping this punches the file.  How a VMM drops
        the shared side of converted memory."""
        ...

    def close(self) -> None:
        """``munmap``.  Idempotent; also done when the object is garbage-collected."""
        ...

    def __enter__(self) -> Mapping: ...
    def __exit__(self, *exc: object) -> None: ...

    # --- mm syscalls on the mapping (issue 11 §1b); guestmem.mman has the constants -------------
    # Range calls take (offset, length) within the mapping: EBADF once unmapped, EINVAL for an
    # unaligned offset, the length rounds up to pages, 0 does nothing, and a range reaching past
    # the mapping is unmapped memory (ENOMEM; EFAULT for mbind), refused before anything changes.
    # An access a protection forbids raises GuestAccessFault with ``signal == "SIGSEGV"``.

    def mprotect(self, offset: int, length: int, prot: int) -> None:
        """``mprotect``: EINVAL for bits outside PROT_READ|WRITE|EXEC."""
        ...

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """``madvise`` with MADV_NORMAL, RANDOM, SEQUENTIAL, WILLNEED, DONTFORK (a forked child
        gets nothing mapped there) and DOFORK (undoes it), DONTNEED (shared: host PTEs go, contents stay;
        private: the private copies go), REMOVE (punch the file: EACCES on a private file mapping,
        EINVAL on private anonymous memory), POPULATE_READ/WRITE (fault in: EINVAL if the
        protection forbids it, EFAULT where a CPU access would SIGBUS), HUGEPAGE, NOHUGEPAGE,
        COLLAPSE (EINVAL on guest_memfd: it must not map past shared ranges huge).  Any other
        advice is EINVAL."""
        ...

    def mbind(self, offset: int, length: int, mode: int, nodemask: int | None = None,
              maxnode: int = 64, flags: int = 0) -> None:
        """``mbind``: set the NUMA policy of the range (guest_memfd and shmem keep it in the file:
        ``kvm_gmem_set_policy``).  ``nodemask`` is a bit mask (None: a NULL pointer) of
        ``maxnode`` bits.  EINVAL for an unknown mode or flags, a nodemask past MAX_NUMNODES, a
        mode that needs nodes without any (or MPOL_DEFAULT with some), no online node.  Pages
        already there stay unless ``flags`` has MPOL_MF_MOVE (guest_memfd pages never move);
        MPOL_MF_STRICT reports pages left on other nodes with EIO (alone: before any change)."""
        ...

    def get_mempolicy(self, offset: int, flags: int = 0x2) -> tuple[int, int]:
        """``get_mempolicy(MPOL_F_ADDR)``: ``(mode, nodemask)`` of the page at ``offset``
        (MPOL_DEFAULT, 0 when none was set); with MPOL_F_NODE too, ``(node the page is on,
        nodemask)``, faulting it in (EFAULT where that faults)."""
        ...

    def page_nodes(self, offset: int, npages: int) -> list[int]:
        """``move_pages(0, n, pages, NULL, status, 0)``: per page from ``offset``, its node, or
        ``-ENOENT`` where none is present (nothing is faulted in), ``-EFAULT`` past the mapping."""
        ...

    def mmap_fixed(self, offset: int, length: int, prot: int, flags: int,
                   fd: GuestMemfd | HostFile | int | None = None, file_offset: int = 0) -> Mapping:
        """``mmap(addr + offset, length, prot, flags | MAP_FIXED, fd, file_offset)``: a new mapping
        over part of this one (how a VMM aligns memory: reserve, then map fixed inside).  Accesses
        through this mapping's range reach the new one; unmapping the new one leaves that part
        unmapped (SIGSEGV) and unmapping this one unmaps both.  ValueError for a range not inside
        this mapping or over another live MAP_FIXED piece."""
        ...


@runtime_checkable
class FdObject(Protocol):
    """Anything the interface hands out that is an fd in the kernel (/dev/kvm, a VM, a vCPU, a
    guest_memfd, a memfd): each takes any ioctl, byte for byte, as the kernel would."""

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch: ``ioctl(fd, request, arg)`` exactly as given; returns ``(ret,
        out)``, the kernel's return value and the argument buffer after the call (``b""`` for an
        int argument).  ``arg`` as bytes is copied to a buffer whose address is passed; it must
        hold ``_IOC_SIZE`` bytes (shorter: ValueError before the call, as the kernel would read past
        it).  An int is the argument itself; for an ioctl that copies a struct only 0 (NULL:
        EFAULT) is allowed (ValueError otherwise).  Failures raise ``KvmError`` with the kernel's
        errno, wrong-fd and unknown numbers included (``guestmem/fileabi.py`` has the rule).  An fd
        the call creates is wrapped in its object and kept in ``self.raw_objects[fd]``.  The model
        decodes the bytes and calls the typed methods; an ioctl it does not implement raises
        ``NotImplementedError`` (never a made-up errno)."""
        ...


@runtime_checkable
class OpenFile(FdObject, Protocol):
    """The ordinary file system calls a guest_memfd and a memfd share (issue 11 §1): both are
    kernel files, and each call answers as the kernel's file_operations for that file do."""

    def fcntl(self, cmd: int, arg: int = 0) -> int:
        """``fcntl(2)``: F_GETFD/F_SETFD (per fd), F_GETFL/F_SETFL (per open file, shared with a
        :meth:`dup`; O_DIRECT is EINVAL on both files here, FASYNC is dropped), F_ADD_SEALS/
        F_GET_SEALS (guest_memfd: EINVAL; this memfd carries F_SEAL_SEAL: EPERM).  EINVAL for an
        unknown command; F_DUPFD* is a ValueError (use :meth:`dup`)."""
        ...

    def lseek(self, offset: int, whence: int) -> int:
        """``lseek(2)``: EINVAL for a whence past SEEK_HOLE, then guest_memfd: ESPIPE; a memfd
        seeks (SEEK_DATA/SEEK_HOLE over up-to-date pages, ENXIO at or past the end)."""
        ...

    def dup(self) -> Self:
        """``dup(2)``: another object, another fd, the same open file (offset and flags shared;
        close-on-exec clear); the file lives until every fd and mapping is gone."""
        ...

    def reopen(self, flags: int) -> Self:
        """``open("/proc/self/fd/N", flags)``: a new open file description (own offset and flags) of
        the same inode.  A memfd opened this way can do O_DIRECT (``shmem_file_open`` sets
        FMODE_CAN_ODIRECT; tmpfs asks no alignment); a guest_memfd cannot be opened (ENXIO).  Flags:
        an access mode, O_DIRECT, O_APPEND, O_NONBLOCK, O_NOATIME, O_CLOEXEC (ValueError else)."""
        ...

    def fstat(self) -> FileStat:
        """``fstat(2)`` (mode, size, 512-byte blocks allocated, block size, links, inode)."""
        ...

    def fstatfs(self) -> FsStat:
        """``fstatfs(2)``: ``f_type`` is the filesystem magic."""
        ...

    def fsync(self) -> None:
        """``fsync(2)`` (guest_memfd has none: EINVAL; shmem: nothing to do)."""
        ...

    def fdatasync(self) -> None:
        """``fdatasync(2)``, as :meth:`fsync`."""
        ...

    def fchmod(self, mode: int) -> None:
        """``fchmod(2)``: guest_memfd refuses every attribute change (EINVAL)."""
        ...

    def sendfile(self, in_file: GuestMemfd | HostFile | int, offset: int | None, count: int) -> int:
        """``sendfile(self, in_file, offset or NULL, count)``: copy from ``in_file`` (at ``offset``,
        else at its file position, which advances) to this file's position.  Returns the bytes
        copied.  guest_memfd can be neither end (EINVAL; ESPIPE when it is the source and an
        offset is given); EINVAL when this file is O_APPEND."""
        ...


@runtime_checkable
class HostFile(OpenFile, Protocol):
    """A plain host file (a regular memfd): something that is *not* a guest_memfd, for binding tests."""

    fd: int

    def close(self) -> None:
        """``close(2)``."""
        ...

    def read(self, length: int, offset: int | None = None) -> bytes:
        """``read(2)`` at the file position (which advances), or ``pread(2)`` at ``offset``: up to
        the end of the file; holes read as zeros.  ``length`` is clamped to MAX_RW_COUNT."""
        ...

    def write(self, data: bytes, offset: int | None = None) -> int:
        """``write(2)``/``pwrite(2)``: grows the file; with O_APPEND both write at its end."""
        ...


@runtime_checkable
class GuestMemfd(OpenFile, Protocol):
    """A guest_memfd file (``KVM_CREATE_GUEST_MEMFD``): fd-based guest memory owned by one VM.

    Upstream: ``virt/kvm/guest_memfd.c``.  The file holds a reference on its VM (closing the VM fd
    first is fine).  ``flags`` shows its names (``GUEST_MEMFD_FLAG_MMAP|INIT_SHARED``).
    """

    fd: int
    size: int
    flags: int

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)``: ``vfs_fallocate``'s checks (EINVAL for a negative offset or length <= 0,
        EOPNOTSUPP for unknown or contradictory modes, EFBIG past the maximum file size), then
        ``kvm_gmem_fallocate``: only ``FALLOC_FL_KEEP_SIZE`` with or without ``PUNCH_HOLE``
        (EOPNOTSUPP otherwise), page-aligned (EINVAL), allocation within the size (EINVAL)."""
        ...

    def allocate(self, offset: int, length: int) -> None:
        """``fallocate(KEEP_SIZE)``: allocate (not zero, not prepare) the pages of the range."""
        ...

    def punch_hole(self, offset: int, length: int) -> None:
        """``fallocate(KEEP_SIZE|PUNCH_HOLE)`` (``kvm_gmem_punch_hole``): invalidate every SPTE that
        maps the range, then free its pages (a pinned page is freed at its unpin).  Punching past
        the end is allowed."""
        ...

    def mmap(self, length: int | None = None, offset: int = 0, *, shared: bool = True) -> Mapping:
        """``mmap`` of the file (``kvm_gmem_mmap``): ENODEV without ``GUEST_MEMFD_FLAG_MMAP``,
        EINVAL for ``shared=False`` (MAP_PRIVATE) or an unaligned offset, ENOMEM for a length that
        cannot fit.  ``length`` None maps the whole file.  Host access faults (SIGBUS) on pages that
        are private, or on every page without ``INIT_SHARED`` (upstream 6.18/7.2)."""
        ...

    def read(self, length: int, offset: int | None = None) -> bytes:
        """``read(2)`` when ``offset`` is None, else ``pread(2)``: guest_memfd refuses both (EINVAL
        and ESPIPE; a negative ``pread`` offset is EINVAL before the fd is even looked up)."""
        ...

    def write(self, data: bytes, offset: int | None = None) -> int:
        """``write(2)``/``pwrite(2)``: refused like :meth:`read`."""
        ...

    def truncate(self, size: int) -> None:
        """``ftruncate(2)``: a guest_memfd's size never changes (EINVAL)."""
        ...

    def stat(self) -> tuple[int, int, int]:
        """``fstat(2)``: ``(st_size, st_blksize, st_ino)``."""
        ...

    def set_memory_attributes2(self, offset: int, size: int, attributes: int, flags: int = 0,
                               reserved: Sequence[int] = ()) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES2`` on this fd (the in-place conversion series, seed 004): make
        ``[offset, offset+size)`` private (``KVM_MEMORY_ATTRIBUTE_PRIVATE``) or shared (0), all or
        nothing.  ``flags`` is the content mode in RFC v5 (``ContentMode``: 0 UNSPECIFIED, ZERO,
        PRESERVE; must be 0 in v8).  ENOTTY where the kernel (or the model, with
        ``attributes="vm"``) has no per-guest_memfd attributes; EINVAL for bad flags, reserved
        words, attributes or range; EOPNOTSUPP (``error_offset`` = offset) for a content mode the
        VM type cannot honour; EAGAIN (``error_offset`` = the first pinned folio) when converting
        pinned pages to private."""
        ...

    def close(self) -> None:
        """``close(2)``: the file lives on while a mapping holds it; its release
        (``kvm_gmem_release``) zaps every SPTE it backs and unbinds its memslots."""
        ...

    def __enter__(self) -> GuestMemfd: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Vcpu(FdObject, Protocol):
    """A vCPU (``KVM_CREATE_VCPU``) running a guest program in the op language."""

    id: int

    def load(self, program: Program | GuestImage) -> None:
        """Load a :class:`guestmem.guest.Program` (the model interprets it; the kernel backend
        compiles it to x86-64) or a :class:`guestmem.guest.image.GuestImage` (x86-64 machine code,
        run by a real vCPU or the model's ``cpu="x86"``).  TypeError for anything else."""
        ...

    def run(self) -> Exit:
        """``KVM_RUN`` until the next exit, returned as a typed :class:`Exit`.  Memory faults come
        back as :class:`ExitMemoryFault` (the kernel's ``-EFAULT`` + ``KVM_EXIT_MEMORY_FAULT``);
        EIO once the VM is bugged; EBADF once closed."""
        ...

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY`` once (``kvm_vcpu_pre_fault_memory``): map ``[gpa, gpa+size)`` as
        if the guest had touched it; returns the bytes left unmapped (0 when all of it was
        mapped); raises when not even the first page could be (EINVAL flags/alignment/wrap,
        EOPNOTSUPP without a TDP MMU or before an SNP/TDX launch is finalized, ENOENT outside any
        memslot, EIO for a bugged VM)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Vm(FdObject, Protocol):
    """A VM (``KVM_CREATE_VM``): memslots, memory attributes, guest_memfds, vCPUs."""

    vm_type: int
    fd: int

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd: the capability's value for this VM type (0 = no)."""
        ...

    def enable_cap(self, cap: int, flags: int = 0, args: tuple[int, ...] = ()) -> None:
        """``KVM_ENABLE_CAP`` (e.g. ``KVM_CAP_EXIT_HYPERCALL`` with ``1 << KVM_HC_MAP_GPA_RANGE``
        so the guest's MAP_GPA_RANGE exits to userspace).  EINVAL for flags, unknown caps, or
        values the capability refuses; OverflowError for more than 4 args."""
        ...

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` (``kvm_gmem_create``): EINVAL for flags the VM type does not
        support (``KVM_CAP_GUEST_MEMFD_FLAGS``) or a size that is not a positive multiple of the
        page size."""
        ...

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (v1: no guest_memfd); see :meth:`set_user_memory_region2`."""
        ...

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, guest_memfd: GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (``kvm_set_memory_region``): create, move, change the
        flags of, or (``memory_size`` 0) delete memslot ``slot`` (``as_id << 16 | id``).  With
        ``KVM_MEM_GUEST_MEMFD`` the private side (or, for a mmap-able guest_memfd, everything: a
        gmem-only slot) comes from ``guest_memfd`` at ``guest_memfd_offset``.  Errnos in upstream's
        order: EINVAL (flags, alignment, slot ids, wraps, a guest_memfd slot being modified, an
        offset beyond the file), EEXIST (overlap), EBADF (not an open fd), EINVAL (not a
        guest_memfd or another VM's)."""
        ...

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (per-VM attributes, ``kvm_vm_ioctl_set_mem_attributes``):
        mark guest physical ``[address, address+size)`` private or shared; SPTEs of the range are
        zapped.  ENOTTY where the kernel has none (in-place mode); EINVAL for flags, unsupported
        attributes, a zero size, misalignment or a wrap."""
        ...

    def launch_update(self, gpa: int, size: int, src: bytes | None = None) -> int:
        """Add initial private memory to an SNP/TDX guest before it runs (``SNP_LAUNCH_UPDATE`` /
        ``KVM_TDX_INIT_MEM_REGION``), measured; ``src`` is copied in (``size`` bytes), None encrypts
        what is there.  Returns the bytes added.  ENOTTY on VM types without a launch flow; EINVAL
        after :meth:`launch_finalize` or for gfns that are not private."""
        ...

    def launch_finalize(self) -> None:
        """End an SNP/TDX launch (``SNP_LAUNCH_FINISH`` / ``KVM_TDX_FINALIZE_VM``): the guest may
        run, pre-faulting is allowed, PRESERVE to private is not.  A guest fault before it bugs the
        VM (EIO).  ENOTTY on VM types without a launch flow."""
        ...

    def check_invariants(self, quiescent: bool = True) -> None:
        """Check docs/design.md's invariants (model: raises ``InvariantError`` naming the invariant;
        kernel: its state is not visible from userspace, so nothing is checked)."""
        ...

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``: EINVAL for an id the VM cannot have, EEXIST for a second one."""
        ...

    def close(self) -> None:
        """Close the VM fd (and its vCPUs); the VM lives on while a guest_memfd holds it."""
        ...

    def __enter__(self) -> Vm: ...
    def __exit__(self, *exc: object) -> None: ...

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the dirty bitmap of memslot ``slot`` (``as_id << 16 | id``), one
        bit per page (little-endian longs, ``ALIGN(npages, 64) / 8`` bytes), set where the guest
        wrote since the last call; the log is cleared and re-armed behind it.  Only a slot with
        ``KVM_MEM_LOG_DIRTY_PAGES`` logs (a guest_memfd slot cannot: EINVAL at creation).
        EINVAL for an address space or id out of range, ENOENT for no slot or one that does not
        log.  Host writes through a mapping are not logged."""
        ...


@runtime_checkable
class Kvm(FdObject, Protocol):
    """The system: ``/dev/kvm`` on the kernel backend, the whole simulated host on the model."""

    backend: str
    fd: int

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION`` (12)."""
        ...

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the system fd: 0 when unsupported, else the capability's value
        (e.g. ``KVM_CAP_VM_TYPES`` is a bit mask of VM types, ``KVM_CAP_GUEST_MEMFD_FLAGS`` the
        flags ``create_guest_memfd`` accepts)."""
        ...

    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> Vm:
        """``KVM_CREATE_VM``: EINVAL for a type this host (``KVM_CAP_VM_TYPES``) does not have."""
        ...

    def mmap_anonymous(self, size: int) -> Mapping:
        """Anonymous shared memory (``mmap(MAP_SHARED|MAP_ANONYMOUS)``), for a memslot's shared side:
        EINVAL for 0, ENOMEM for what cannot fit in the address space."""
        ...

    def memfd_create(self, size: int, flags: int = 1) -> HostFile:
        """A regular memfd of ``size`` bytes (``memfd_create`` + ``ftruncate``; EINVAL if negative).
        ``flags`` are memfd_create's (default MFD_CLOEXEC; MFD_ALLOW_SEALING, MFD_NOEXEC_SEAL and
        MFD_EXEC too; MFD_HUGETLB is a ValueError; the kernel's EINVAL for bad combinations)."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Kvm: ...
    def __exit__(self, *exc: object) -> None: ...


    # --- host memory management (issue 11 §1b) -----------------------------------------------------
    def mmap(self, length: int, prot: int = 3, flags: int = 0x01,
             fd: GuestMemfd | HostFile | int | None = None, offset: int = 0) -> Mapping:
        """``mmap(NULL, length, prot, flags, fd, offset)`` of a guest_memfd, a memfd (HostFile) or,
        with ``fd`` None or MAP_ANONYMOUS, anonymous memory; MAP_SHARED or MAP_PRIVATE (copy on
        write).  The kernel's checks in its order: EINVAL for an unaligned offset, EBADF for a
        closed fd, EINVAL for length 0 or a bad mapping type, ENOMEM/EOVERFLOW for what cannot
        fit, EOPNOTSUPP for unknown flags under MAP_SHARED_VALIDATE; then the file's mmap
        (guest_memfd: ENODEV without GUEST_MEMFD_FLAG_MMAP, EINVAL unless MAP_SHARED).  Unknown
        prot bits are ignored, as mmap does.  MAP_FIXED is :meth:`Mapping.mmap_fixed`
        (ValueError here)."""
        ...

    def set_mempolicy(self, mode: int, nodemask: int | None = None, maxnode: int = 64) -> None:
        """``set_mempolicy``: the calling task's NUMA policy, which a new page follows when its
        file has none for it.  Errnos as :meth:`Mapping.mbind`'s policy checks."""
        ...

    def numa_nodes(self) -> list[int]:
        """The NUMA nodes with memory (the model: ``ModelOptions.numa_nodes``)."""
        ...

    def fork(self) -> ForkedChild:
        """``fork(2)``: a child with this process's fds and mappings (MAP_SHARED shared,
        MAP_PRIVATE copy-on-write), acting on memory through :class:`ForkedChild`."""
        ...


@runtime_checkable
class ForkedChild(Protocol):
    """A forked child process of :meth:`Kvm.fork`.  It names memory with the parent's
    :class:`Mapping` objects and acts on *its* mapping at the same address: a MAP_SHARED write
    is seen by the parent (and a guest), a MAP_PRIVATE one only by the child.  Faults raise
    :class:`guestmem.errors.GuestAccessFault` as in the parent; a mapping created after the fork
    is not mapped in the child (SIGSEGV).  On the kernel backend it is a real process served
    over a pipe (memory access only)."""

    pid: int

    def read(self, mapping: Mapping, offset: int, length: int) -> bytes: ...
    def write(self, mapping: Mapping, offset: int, data: bytes) -> None: ...
    def fill(self, mapping: Mapping, offset: int, length: int, byte: int) -> None: ...

    def exit(self) -> None:
        """The child exits (its mappings go; pages it shared stay).  Idempotent."""
        ...

    def __enter__(self) -> ForkedChild: ...
    def __exit__(self, *exc: object) -> None: ...


def iter_exits(vcpu: Vcpu, limit: int = 1_000_000) -> Iterator[Exit]:
    """Run ``vcpu`` repeatedly, yielding each exit, until it halts (the halt is yielded too)."""
    for _ in range(limit):
        ex = vcpu.run()
        yield ex
        if isinstance(ex, ExitHalt | ExitShutdown | ExitInternalError | ExitGuestAssert | ExitFailEntry):
            return
    raise RuntimeError(f"vCPU {vcpu.id} did not halt within {limit} exits")
