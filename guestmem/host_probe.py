"""Probe the running kernel into a :class:`HostProfile`, and build the model's twin of it.

Why this exists: the model's defaults describe upstream as written, but a test that compares the
model with *this* machine's kernel needs the model configured like this machine: its VM types,
its guest_memfd flags, whether it has a TDP MMU or shadow paging, whether memory attributes are
built in, its MAXPHYADDR and its release.  ``guestmem.open("model", like="host")`` calls
:func:`probe_host` and :func:`twin_options`; ``guestmem caps --twin`` prints both side by side
with :func:`compare`.

Everything is asked of the kernel (``KVM_CHECK_EXTENSION``, ``KVM_CREATE_VM`` per type, one
``KVM_SET_MEMORY_ATTRIBUTES``), of sysfs (module parameters) or of ``uname``/``/proc/cpuinfo``;
nothing runs a guest, so a probe takes milliseconds.  A host property the model has no switch for
is not hidden: :func:`twin_options` returns it in ``unmatched`` with the reason.
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.releases import release_for

KVM_CAP_MAX_VCPU_ID = 128  # include/uapi/linux/kvm.h
# Capabilities compared between host and twin: every named one, and the vCPU limits.
_EXTRA_CAP_NAMES = {u.KVM_CAP_NR_VCPUS: "NR_VCPUS", u.KVM_CAP_MAX_VCPUS: "MAX_VCPUS",
                    KVM_CAP_MAX_VCPU_ID: "MAX_VCPU_ID"}
COMPARED_CAPS: tuple[int, ...] = tuple(sorted({*u.CAP_NAMES, *_EXTRA_CAP_NAMES}))


@dataclass(frozen=True)
class HostProfile:
    """What the running kernel's KVM is, as far as the model's switches can say."""

    release: str                 # uname -r
    kernel: str                  # the release switch whose rules it follows
    kernel_note: str | None      # set when the release is not exactly a switch value
    modules: tuple[str, ...]     # loaded kvm modules
    vm_types: tuple[int, ...]    # types KVM_CREATE_VM accepts
    system_caps: dict[int, int]  # KVM_CHECK_EXTENSION on /dev/kvm
    vm_caps: dict[int, dict[int, int]] = field(default_factory=dict)  # per creatable VM type
    gmem_flags: dict[int, int] = field(default_factory=dict)  # KVM_CAP_GUEST_MEMFD_FLAGS per VM type
    tdp: bool = True             # two-dimensional paging (KVM_CAP_PRE_FAULT_MEMORY is tdp_enabled)
    tdp_mmu_param: str | None = None  # /sys/module/kvm/parameters/tdp_mmu
    memory_attributes: bool = True  # KVM_SET_MEMORY_ATTRIBUTES exists (not ENOTTY)
    smm: bool = False            # KVM_CAP_MULTI_ADDRESS_SPACE > 1
    phys_bits: int | None = None  # MAXPHYADDR (/proc/cpuinfo "address sizes")
    max_vcpus: int = 0           # KVM_CAP_MAX_VCPUS
    online_cpus: int = 0         # what KVM_CAP_NR_VCPUS is bounded by

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["vm_types"] = [u.VM_TYPE_NAMES.get(t, str(t)) for t in self.vm_types]
        out["system_caps"] = {_cap(c): v for c, v in sorted(self.system_caps.items())}
        out["vm_caps"] = {u.VM_TYPE_NAMES.get(t, str(t)): {_cap(c): v for c, v in sorted(caps.items())}
                          for t, caps in sorted(self.vm_caps.items())}
        out["gmem_flags"] = {u.VM_TYPE_NAMES.get(t, str(t)): f for t, f in sorted(self.gmem_flags.items())}
        return out


def _cap(cap: int) -> str:
    return f"KVM_CAP_{u.CAP_NAMES.get(cap) or _EXTRA_CAP_NAMES.get(cap) or str(cap)}"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _phys_bits() -> int | None:
    """The host's physical address width from ``/proc/cpuinfo``.  KVM bounds memslots by the raw
    CPUID MAXPHYADDR (arch/x86/kvm/mmu/spte.c, kvm_get_host_maxphyaddr), which is larger than this
    on hosts with SME or MKTME (the kernel reduces x86_phys_bits there); only a TDP host uses it
    (kvm_mmu_max_gfn: shadow paging allows 52 bits), and the probe cannot run CPUID itself."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("address sizes"):
            try:
                return int(line.split(":", 1)[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None


def _modules() -> tuple[str, ...]:
    try:
        return tuple(sorted(m for m in os.listdir("/sys/module") if m == "kvm" or m.startswith("kvm_")))
    except OSError:
        return ()


def probe_host(path: str = "/dev/kvm") -> HostProfile:
    """Ask the KVM at ``path`` what it is.  Raises :class:`KvmError` if it cannot be opened."""
    from guestmem.linux import open_kernel

    release = os.uname().release
    kernel, note = release_for(release)
    with open_kernel(path) as kvm:
        system_caps = {c: kvm.check_extension(c) for c in COMPARED_CAPS}
        vm_types: list[int] = []
        vm_caps: dict[int, dict[int, int]] = {}
        gmem_flags: dict[int, int] = {}
        memory_attributes = True
        for t in sorted(u.VM_TYPE_NAMES):
            try:
                vm = kvm.create_vm(t)
            except KvmError:
                continue
            with vm:
                vm_types.append(t)
                vm_caps[t] = {c: vm.check_extension(c) for c in COMPARED_CAPS}
                gmem_flags[t] = vm_caps[t][u.KVM_CAP_GUEST_MEMFD_FLAGS]
                if t == u.KVM_X86_DEFAULT_VM:
                    try:
                        vm.set_memory_attributes(0, u.PAGE_SIZE, 0)
                    except KvmError as err:
                        memory_attributes = err.errno != errno.ENOTTY
    return HostProfile(
        release=release, kernel=kernel, kernel_note=note, modules=_modules(),
        vm_types=tuple(vm_types), system_caps=system_caps, vm_caps=vm_caps, gmem_flags=gmem_flags,
        tdp=bool(system_caps.get(u.KVM_CAP_PRE_FAULT_MEMORY)),
        tdp_mmu_param=_read("/sys/module/kvm/parameters/tdp_mmu"),
        memory_attributes=memory_attributes,
        smm=system_caps.get(u.KVM_CAP_MULTI_ADDRESS_SPACE, 0) > 1,
        phys_bits=_phys_bits(),
        max_vcpus=system_caps.get(u.KVM_CAP_MAX_VCPUS, 0),
        online_cpus=os.cpu_count() or 1,
    )


@dataclass(frozen=True)
class Twin:
    """The model switches that make the model like a host, and what could not be matched."""

    options: dict[str, Any]
    unmatched: dict[str, str]  # switch or property -> why the twin cannot match it


def twin_options(profile: HostProfile) -> Twin:
    """The model switches that reproduce ``profile``; anything the model cannot say is named."""
    from guestmem.model.options import _RANGES

    opts: dict[str, Any] = {
        "kernel": profile.kernel,
        "memory_attributes": profile.memory_attributes,
        "tdp_mmu": profile.tdp,
        "smm": profile.smm,
        "vm_types": profile.vm_types,
    }
    unmatched: dict[str, str] = {}
    if profile.kernel_note:
        unmatched["kernel"] = profile.kernel_note
    low, high = _RANGES["phys_bits"]
    if profile.phys_bits is not None and low <= profile.phys_bits <= high:
        opts["phys_bits"] = profile.phys_bits
    else:
        unmatched["phys_bits"] = (f"host MAXPHYADDR {profile.phys_bits} is not readable "
                                  f"or not in {low}..{high}")
    low, high = _RANGES["max_vcpus"]
    if low <= profile.max_vcpus <= high:
        opts["max_vcpus"] = profile.max_vcpus
    else:
        unmatched["max_vcpus"] = f"host KVM_CAP_MAX_VCPUS {profile.max_vcpus} is not in {low}..{high}"
    return Twin(opts, unmatched)


def open_twin(path: str = "/dev/kvm", **overrides: Any) -> Any:
    """``guestmem.open("model", like="host")``: probe, then open the model configured like it.

    ``overrides`` are further model switches, applied last (a caller may still ask for a bigger
    frame pool, say).  The profile and the unmatched switches are kept on the returned system as
    ``host_profile`` and ``twin_unmatched``."""
    from guestmem.model import open_model

    profile = probe_host(path)
    twin = twin_options(profile)
    kvm = open_model(**{**twin.options, **overrides})
    kvm.host_profile = profile
    kvm.twin_unmatched = twin.unmatched
    return kvm


def compare(profile: HostProfile, twin_kvm: Any) -> list[dict[str, Any]]:
    """Host vs twin, row by row: every compared capability (system fd and each host VM type),
    the VM types, the release and the paging mode.  ``same`` is False where they differ."""
    rows: list[dict[str, Any]] = []

    def add(what: str, host: Any, twin: Any) -> None:
        rows.append({"what": what, "host": host, "twin": twin, "same": host == twin})

    add("kernel release", profile.kernel, twin_kvm.options.kernel)
    add("paging", "TDP" if profile.tdp else "shadow", "TDP" if twin_kvm.options.tdp_mmu else "shadow")
    add("memory attributes built in", profile.memory_attributes, twin_kvm.options.memory_attributes)
    add("MAXPHYADDR", profile.phys_bits, twin_kvm.options.phys_bits)
    twin_types = []
    for t in sorted(u.VM_TYPE_NAMES):
        try:
            twin_kvm.create_vm(t).close()
            twin_types.append(t)
        except KvmError:
            pass
    add("VM types", [u.VM_TYPE_NAMES[t] for t in profile.vm_types],
        [u.VM_TYPE_NAMES[t] for t in twin_types])
    for c in COMPARED_CAPS:
        add(f"{_cap(c)} (/dev/kvm)", profile.system_caps.get(c), twin_kvm.check_extension(c))
    for t, caps in sorted(profile.vm_caps.items()):
        if t not in twin_types:
            continue
        with twin_kvm.create_vm(t) as vm:
            for c in COMPARED_CAPS:
                add(f"{_cap(c)} ({u.VM_TYPE_NAMES[t]} VM)", caps.get(c), vm.check_extension(c))
    return rows


def _model_hypercall_exits(kvm: Any) -> bool:
    """Whether a guest's KVM_HC_MAP_GPA_RANGE reaches userspace on the (model) ``kvm``."""
    from guestmem.api import ExitHypercall
    from guestmem.guest.ops import MapGpaRange, Program

    with kvm.create_vm(u.KVM_X86_DEFAULT_VM) as vm:
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([MapGpaRange(0, 1, 0, expect_ret=None)]))
        return isinstance(vcpu.run(), ExitHypercall)


HYPERCALL_ROW = "KVM_HC_MAP_GPA_RANGE exits to userspace"


def twin_report(path: str = "/dev/kvm", *, hypercall: bool = True) -> dict[str, Any]:
    """``guestmem caps --twin``: the host profile, the twin's switches, every compared property
    side by side, and the switches the twin cannot match (with why).  JSON-serialisable."""
    from guestmem.model import open_model

    profile = probe_host(path)
    twin = twin_options(profile)
    unmatched = dict(twin.unmatched)
    with open_model(**twin.options) as kvm:
        rows = compare(profile, kvm)
        if hypercall:
            from guestmem.linux.caps import _probe_hypercall
            from guestmem.linux.system import open_kernel

            with open_kernel(path) as host:
                try:
                    host_exits = bool(_probe_hypercall(host).get("exits"))
                except KvmError:
                    host_exits = False
            twin_exits = _model_hypercall_exits(kvm)
            rows.append({"what": HYPERCALL_ROW, "host": host_exits,
                         "twin": twin_exits, "same": host_exits == twin_exits})
            if host_exits != twin_exits:
                unmatched["hypercall_exit"] = (
                    "no model switch: on this host the guest's hypercall instruction never "
                    "completes (kvm_pvm re-executes it), while upstream's KVM_CAP_EXIT_HYPERCALL "
                    "exits to userspace (arch/x86/kvm/x86.c, __kvm_emulate_hypercall)")
    for row in rows:
        if not row["same"] and row["what"] not in unmatched and row["what"] != HYPERCALL_ROW:
            unmatched[row["what"]] = f"host {row['host']}, twin {row['twin']}: no switch sets it"
    return {"host": profile.to_json(), "twin_options": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in twin.options.items()},
            "rows": rows, "unmatched": unmatched,
            "matched": sum(r["same"] for r in rows), "compared": len(rows)}
