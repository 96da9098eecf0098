"""The designs upstream tried before guest_memfd, as working front-ends over the model's core.

Seeds 001, 002 and 000 are three postings of fd-based guest private memory that were never
merged: v7's memfile_notifier in shmem with ``MFD_INACCESSIBLE`` and ``F_SEAL_AUTO_ALLOCATE``
(:mod:`.memfile`), v8's userspace-inaccessible memfd shim (:mod:`.inaccessible`), and v9's
``memfd_restricted()`` with its invalidate_start/end notifier and the reply's per-folio variant
(:mod:`.restricted`).  They run here so that what made upstream move on can be measured, not
asserted.  They differ in who owns the file, how the memslot names it, who tracks shared/private
and when KVM hears about invalidation; everything else — frames, page cache, memslots, the TDP MMU,
the fault path, vCPUs and the confidential-computing flavours — is the model's own core, reused.

* :mod:`.files`, :mod:`.shim` — what the userspace-owned files share;
* :mod:`.kvm` — KVM's side: the ``KVM_MEM_PRIVATE`` memslot (``private_fd``/``restricted_fd`` +
  offset beside ``userspace_addr``), its notifier, ``KVM_MEMORY_ENCRYPT_{UN,}REG_REGION``;
* :mod:`.directmap` — SEV-SNP's 2 MiB direct map with the reply's restore rule;
* :mod:`.harness` — how a VMM drives each of the five designs (the three above, guest_memfd and
  in-place conversion), and :mod:`.workloads` — the guest workloads ``guestmem compare`` runs.
"""

from guestmem.model.designs.inaccessible import InaccessibleFile
from guestmem.model.designs.inaccessible import memfd_create as memfd_create_v8
from guestmem.model.designs.kvm import HistoricalKvm, PrivateMemslot, attach
from guestmem.model.designs.memfile import Memfd
from guestmem.model.designs.memfile import memfd_create as memfd_create_v7
from guestmem.model.designs.restricted import RestrictedFile, memfd_restricted
from guestmem.model.designs.uapi import DESIGN_V7, DESIGN_V8, DESIGN_V9

__all__ = [
    "DESIGN_V7",
    "DESIGN_V8",
    "DESIGN_V9",
    "HistoricalKvm",
    "InaccessibleFile",
    "Memfd",
    "PrivateMemslot",
    "RestrictedFile",
    "attach",
    "memfd_create_v7",
    "memfd_create_v8",
    "memfd_restricted",
]
