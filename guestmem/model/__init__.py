"""The model: the whole guest-private-memory system as an executable reference implementation.

Host physical memory and the shmem-like backing file (``mm``), the host process's address space
and fd table (``process``), and KVM itself (``kvm``: VMs, memslots, guest_memfd, attributes, the
TDP MMU and fault path, vCPUs, confidential-computing flavours).  ``open_model(**options)`` gives
a :class:`guestmem.api.Kvm`; options are listed in :mod:`guestmem.model.options`.
"""

from __future__ import annotations

from typing import Any


def open_model(**options: Any):  # -> ModelKvm (imported lazily to keep import light)
    from guestmem.model.kvm.system import ModelKvm
    from guestmem.model.options import ModelOptions

    return ModelKvm(ModelOptions.from_kwargs(**options))
