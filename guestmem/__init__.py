"""guestmem: KVM's fd-based guest private memory (guest_memfd), as an executable model and over /dev/kvm.

``guestmem.open("model")`` gives the simulated host (everything, private memory included);
``guestmem.open("kernel")`` gives the real ``/dev/kvm``.  Both implement :mod:`guestmem.api`.
"""

from __future__ import annotations

from typing import Any

from guestmem.api import Kvm
from guestmem.errors import CapabilityMissing, GuestAccessFault, KvmError

__all__ = ["BACKENDS", "CapabilityMissing", "GuestAccessFault", "KvmError", "open"]
__version__ = "0.1.0"

BACKENDS = ("model", "kernel")


def open(backend: str = "model", *, like: str | None = None, **options: Any) -> Kvm:
    """Open a backend by name: ``"model"`` (default) or ``"kernel"``.

    Options are the model's switches (its equivalent of kernel module parameters); the kernel
    backend accepts only ``path`` (default ``/dev/kvm``).  ``like="host"`` opens the model as a
    twin of the running kernel (:mod:`guestmem.host_probe`): its switches are probed from
    ``/dev/kvm`` (or ``path``), and any other switch given here is applied on top.
    """
    if like is not None:
        if backend != "model" or like != "host":
            raise ValueError(f"like={like!r} is only for the model, and only 'host' is known")
        from guestmem.host_probe import open_twin

        return open_twin(options.pop("path", "/dev/kvm"), **options)
    if backend == "model":
        from guestmem.model import open_model

        return open_model(**options)
    if backend == "kernel":
        from guestmem.linux import open_kernel

        return open_kernel(**options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
