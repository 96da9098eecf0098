"""``KvmError``: the one exception type of guestmem, carrying the errno the kernel would return.

Both backends raise it for every refused operation, so callers (and the conformance suite) can
compare ``err.errno`` across backends.  ``error_offset`` is set where the uAPI reports one
(``KVM_SET_MEMORY_ATTRIBUTES2``).
"""

from __future__ import annotations

import errno as _errno
import os

# Linux's EHWPOISON (memory page has hardware error); Python's errno module does not define it.
EHWPOISON: int = getattr(_errno, "EHWPOISON", 133)

_KERNEL_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP", _errno.EAGAIN: "EAGAIN", EHWPOISON: "EHWPOISON"}


class KvmError(OSError):
    """A KVM/guest_memfd operation failed with ``errno``; nothing was changed unless documented.

    ``size_left`` is set by ``KVM_PRE_FAULT_MEMORY`` failures: the ``size`` the kernel copied back
    (the bytes still to pre-fault, unchanged by a failed call).
    """

    size_left: int | None = None

    def __init__(self, err: int, operation: str, message: str = "", *, error_offset: int | None = None):
        text = message or os.strerror(err)
        super().__init__(err, f"{operation}: {text}")
        self.operation = operation
        self.message = text
        self.error_offset = error_offset

    @property
    def errname(self) -> str:
        """The kernel's name for the errno (EOPNOTSUPP, not Python's alias ENOTSUP)."""
        return _KERNEL_NAMES.get(self.errno or 0) or _errno.errorcode.get(self.errno or 0, str(self.errno))

    def __str__(self) -> str:
        tail = f" (error_offset={self.error_offset:#x})" if self.error_offset is not None else ""
        return f"[{self.errname}] {self.operation}: {self.message}{tail}"


class GuestAccessFault(KvmError):
    """Host userspace touched guest_memfd memory it may not access (the kernel delivers SIGBUS).

    Raised by ``Mapping`` reads/writes on private pages, beyond the file size, or on a guest_memfd
    without host-shared pages.  ``offset`` is the faulting offset within the mapping.
    """

    def __init__(self, operation: str, offset: int, message: str = "SIGBUS"):
        super().__init__(_errno.EFAULT, operation, message)
        self.offset = offset


class CapabilityMissing(RuntimeError):
    """The chosen backend/host lacks a capability an operation or scenario needs (named in ``cap``)."""

    def __init__(self, cap: str, detail: str = ""):
        super().__init__(f"host lacks {cap}" + (f": {detail}" if detail else ""))
        self.cap = cap


class ModelSwitchOff(CapabilityMissing):
    """The model lacks a capability only because one of its switches is off (the model can do it):
    the message names the switch and how to turn it on, instead of blaming a host."""

    def __init__(self, cap: str, switch: str, value: object, current: object, detail: str = "") -> None:
        toml = repr(value).replace("'", '"') if isinstance(value, str) else str(value).lower()
        RuntimeError.__init__(
            self, f"the model runs with the switch {switch}={current!r}, so it offers no {cap}"
            + (f" ({detail})" if detail else "")
            + f"; set `{switch} = {toml}` in the scenario's [model] table or pass "
            f"--model {switch}={value}")
        self.cap = cap
        self.switch = switch
