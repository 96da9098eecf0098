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

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from guestmem import uapi as u

if TYPE_CHECKING:  # the op language (floor 2 too) is only named in a signature here
    from guestmem.guest.ops import Program

# --- exits ------------------------------------------------------------------------------------------


@dataclass
class Exit:
    """Base of every vCPU exit; ``reason`` is the ``KVM_EXIT_*`` number (or a guestmem pseudo-exit)."""

    reason: int = field(init=False, default=u.KVM_EXIT_UNKNOWN)

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


@dataclass
class ExitMmio(Exit):
    phys_addr: int
    len: int
    is_write: bool
    data: bytes = b""

    def __post_init__(self) -> None:
        self.reason = u.KVM_EXIT_MMIO


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


# --- resources --------------------------------------------------------------------------------------


@runtime_checkable
class Mapping(Protocol):
    """A host-userspace mapping (anonymous memory or a guest_memfd mmap).

    ``addr`` is a host virtual address usable as a memslot's ``userspace_addr``.  ``read``/``write``
    raise :class:`guestmem.errors.GuestAccessFault` where the kernel would deliver SIGBUS.
    """

    addr: int
    length: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def fill(self, offset: int, length: int, byte: int) -> None: ...
    def pin(self, offset: int, length: int) -> AbstractContextManager[None]: ...
    def discard(self, offset: int, length: int) -> None:
        """Free the pages of a page-aligned range (``madvise(MADV_REMOVE)``): they read as zero
        afterwards and stop counting as resident.  How a VMM drops the shared side."""
        ...
    def close(self) -> None: ...
    def __enter__(self) -> Mapping: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class HostFile(Protocol):
    """A plain host file (a regular memfd): something that is *not* a guest_memfd, for binding tests."""

    fd: int

    def close(self) -> None: ...


@runtime_checkable
class GuestMemfd(Protocol):
    """A guest_memfd file: fd-based guest memory owned by one VM."""

    fd: int
    size: int
    flags: int

    def fallocate(self, mode: int, offset: int, length: int) -> None: ...
    def allocate(self, offset: int, length: int) -> None: ...
    def punch_hole(self, offset: int, length: int) -> None: ...
    def mmap(self, length: int | None = None, offset: int = 0, *, shared: bool = True) -> Mapping: ...
    def read(self, length: int, offset: int | None = None) -> bytes:
        """``read(2)`` when ``offset`` is None, else ``pread(2)`` (guest_memfd refuses both:
        EINVAL and ESPIPE respectively)."""
        ...
    def write(self, data: bytes, offset: int | None = None) -> int: ...
    def truncate(self, size: int) -> None: ...
    def stat(self) -> tuple[int, int, int]: ...  # (st_size, st_blksize, st_ino)
    def set_memory_attributes2(self, offset: int, size: int, attributes: int, flags: int = 0,
                               reserved: Sequence[int] = ()) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> GuestMemfd: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Vcpu(Protocol):
    id: int

    def load(self, program: Program) -> None: ...
    def run(self) -> Exit: ...
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY`` once; returns the bytes left unmapped (0 when all of it was
        mapped); raises when not even the first page could be."""
        ...
    def close(self) -> None: ...


@runtime_checkable
class Vm(Protocol):
    vm_type: int
    fd: int

    def check_extension(self, cap: int) -> int: ...
    def enable_cap(self, cap: int, flags: int = 0, args: tuple[int, ...] = ()) -> None: ...
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd: ...
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None: ...
    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, guest_memfd: GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0) -> None: ...
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None: ...
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu: ...
    def close(self) -> None: ...
    def __enter__(self) -> Vm: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Kvm(Protocol):
    """The system: ``/dev/kvm`` on the kernel backend, the whole simulated host on the model."""

    backend: str
    fd: int

    def api_version(self) -> int: ...
    def check_extension(self, cap: int) -> int: ...
    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> Vm: ...
    def mmap_anonymous(self, size: int) -> Mapping: ...
    def memfd_create(self, size: int) -> HostFile: ...
    def close(self) -> None: ...
    def __enter__(self) -> Kvm: ...
    def __exit__(self, *exc: object) -> None: ...


def iter_exits(vcpu: Vcpu, limit: int = 1_000_000) -> Iterator[Exit]:
    """Run ``vcpu`` repeatedly, yielding each exit, until it halts (the halt is yielded too)."""
    for _ in range(limit):
        ex = vcpu.run()
        yield ex
        if isinstance(ex, ExitHalt | ExitShutdown | ExitInternalError | ExitGuestAssert | ExitFailEntry):
            return
    raise RuntimeError(f"vCPU {vcpu.id} did not halt within {limit} exits")
