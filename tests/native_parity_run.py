"""Run deterministic VMM workloads and print their complete end state as one JSON line.

``tests/test_native_parity.py`` runs this twice, once with the compiled accelerators and once with
``GUESTMEM_PURE=1``, and requires the two outputs to be identical: the Python paths are the
reference, and an accelerator may change nothing but the time taken.  The state is the fuzzer's
whole-system snapshot (fd table, mappings, VMs with attributes, SPTEs, RMP and accept state, page
caches with pfns and a content digest, frame pool) plus every statistics counter (model, vCPU, MMU,
VMM converter, tracker) and every exit the guest took, with object ids replaced by labels.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import guestmem
import guestmem.uapi as u
from guestmem import native
from guestmem.fuzz.snapshot import snapshot
from guestmem.guest.ops import Accept, MapGpaRange, Op, Program, Touch, Verify, Write
from guestmem.vmm.exits import Action
from guestmem.vmm.layout import RegionSpec
from guestmem.vmm.machine import Machine, MachineConfig
from guestmem.vmm.trace import EventTrace

PAGE = u.PAGE_SIZE
GPA = 1 << 32
MiB = 1 << 20
ENC = u.KVM_MAP_GPA_RANGE_ENCRYPTED


def _normalise(value: Any, labels: dict[int, str]) -> Any:
    if isinstance(value, dict):
        return {str(labels.get(k, k)) if isinstance(k, int) else k: _normalise(v, labels)
                for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_normalise(v, labels) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return value
    if isinstance(value, int):
        return labels.get(value, value)
    return repr(value)


def _state(kvm: Any, m: Machine, exits: list[str]) -> dict[str, Any]:
    labels: dict[int, str] = {}
    for i, vm in enumerate(list(kvm.vms)):
        labels[id(vm)] = f"vm{i}"
        for sl in (s for ms in vm.memslots for s in ms):
            labels[id(sl)] = f"slot{sl.as_id}.{sl.id}"
        for c in vm.vcpus.values():
            labels[id(c.program)] = "program"
    for f in kvm.live_files():
        labels[id(f)] = "file"
        for g in getattr(f, "files", ()):
            labels[id(g)] = "file"
    for mp in kvm.process.mappings():
        labels[id(mp)] = "mapping"
    proc = kvm.process
    for fd in list(proc._fds):
        obj = proc.fget(fd)
        if obj is not None:
            labels[id(getattr(obj, "_dup_of", obj))] = f"fd{fd}"
    raw = snapshot(kvm)
    files = [_normalise(v, labels) for v in raw.pop("files").values()]  # keyed by id: unordered
    snap = _normalise(raw, labels)
    snap["files"] = sorted(json.dumps(v, sort_keys=True) for v in files)
    vms = list(kvm.vms)
    stats = {
        "system": dict(kvm.stats) if hasattr(kvm, "stats") else None,
        "mmu": [dict(vm.mmu.stats) for vm in vms],
        "vcpus": [{i: dict(c.stats) for i, c in vm.vcpus.items()} for vm in vms],
        "converter": dict(m.converter.stats),
        "tracker": [list(x) for x in m.tracker.state.items()],
        # (not the sample count: sampling is rate-limited by wall clock)
        "accounting": m.accounting.bound_ok,
    }
    return {"snapshot": snap, "stats": _normalise(stats, labels), "exits": exits}


def _run(flavour: str, size: int, ops: list[Op], options: dict[str, Any] | None = None) -> dict[str, Any]:
    kvm = guestmem.open("model", **(options or {}))
    cfg = MachineConfig(regions=(RegionSpec("ram", GPA, size),), flavour=flavour, slack=4 * MiB)
    m = Machine(kvm, cfg, trace=EventTrace(enabled=False))
    try:
        m.create_vcpus(1)
        m.load({0: Program(ops)})
        v, handle = m.vcpus[0], m.handler.handle
        exits: list[str] = []
        for _ in range(200_000):
            ex = v.run()
            exits.append(repr(ex))
            verdict = handle(0, v, ex)
            if verdict.action is not Action.CONTINUE:
                exits.append(f"verdict {verdict.action.name} {verdict.reason}")
                break
        m.accounting.finish()
        return _state(kvm, m, exits)
    finally:
        m.close()
        kvm.close()


Workload = tuple[str, int, list[Op]] | tuple[str, int, list[Op], dict[str, Any]]


def workloads() -> dict[str, Workload]:
    """Lazy accept (whole and spread), conversion storms with writes and verifies, shared and
    private accesses that fault, touch, convert back and forth."""
    out: dict[str, Workload] = {}
    for fl in ("snp", "tdx"):
        out[f"lazy-{fl}"] = (fl, 4 * MiB, [Accept(GPA, 4 * MiB)])
        out[f"spread-{fl}"] = (fl, 256 * MiB, [Accept(GPA + i * 97 * PAGE, PAGE) for i in range(300)])
    for fl in ("sw-protected", "snp", "tdx"):
        ops: list[Op] = []
        hw = fl != "sw-protected"
        for i in range(0, 512, 2):
            g = GPA + i * PAGE
            ops.append(MapGpaRange(g, 1, ENC, 0))
            if hw:
                ops.append(Accept(g, PAGE))
            ops.append(Write(g, 64, 0x5A, "private" if hw else "auto"))
        ops.append(Write(GPA + PAGE, 3 * PAGE, 0x33, "shared" if hw else "auto"))
        ops.append(Verify(GPA + PAGE, 3 * PAGE, 0x33, "shared" if hw else "auto"))
        ops.append(MapGpaRange(GPA, 8, 0, 0))
        ops.append(Touch(GPA, 64 * PAGE, 0x11, PAGE, "shared" if hw else "auto"))
        ops.append(MapGpaRange(GPA + 16 * PAGE, 16, ENC, 0))
        if hw:
            ops.append(Accept(GPA + 16 * PAGE, 16 * PAGE))
        ops.append(Write(GPA + 16 * PAGE, 16 * PAGE, 0x77, "private" if hw else "auto"))
        ops.append(Verify(GPA + 16 * PAGE, 16 * PAGE, 0x77, "private" if hw else "auto"))
        out[f"storm-{fl}"] = (fl, 8 * MiB, ops)
    for fl in ("sw-protected", "snp", "tdx"):
        for seed in (1, 2):
            out[f"random-{fl}-{seed}"] = (fl, 8 * MiB, _random_ops(fl, seed))
    for rev in ("v5", "v8"):  # in-place conversion: per-guest_memfd attributes
        for fl in ("sw-protected", "snp"):
            out[f"inplace-{rev}-{fl}"] = (fl, 8 * MiB, _random_ops(fl, 3),
                                          {"attributes": "gmem", "inplace_revision": rev})
    return out


def _random_ops(flavour: str, seed: int, n: int = 400) -> list[Op]:
    """Conversions both ways, accepts, writes and touches at random over 2 MiB, so one-page fast
    cases and the general paths interleave.  On hardware flavours the generator follows each
    page's kind and accept state, so a private access lands only on accepted private pages (a
    guest that does otherwise takes #VC/#VE, which ends the run early)."""
    import random

    rnd = random.Random(seed)
    hw = flavour != "sw-protected"
    npg = 512
    state = ["shared"] * npg  # shared, private (unaccepted), accepted
    ops: list[Op] = []
    while len(ops) < n:
        p = rnd.randrange(npg)
        cnt = min(rnd.choice((1, 1, 1, 2, 8, 33)), npg - p)
        g, size = GPA + p * PAGE, cnt * PAGE
        k = rnd.randrange(10)
        pages = range(p, p + cnt)
        if k < 3:
            enc = rnd.choice((ENC, 0))
            ops.append(MapGpaRange(g, cnt, enc, None))
            for q in pages:
                if not enc:
                    state[q] = "shared"
                elif state[q] == "shared":
                    state[q] = "private"
        elif k < 5 and hw:
            ops.append(Accept(g, size))
            for q in pages:
                state[q] = "accepted"
        else:
            if not hw:
                kind = "auto"
            elif all(state[q] == "accepted" for q in pages):
                kind = "private"
            elif all(state[q] == "shared" for q in pages):
                kind = "shared"
            else:
                continue
            if k < 8:
                off = rnd.randrange(64)
                ops.append(Write(g + off, rnd.randrange(1, size - off), rnd.randrange(256), kind))
            else:
                ops.append(Touch(g, size, rnd.randrange(256), rnd.choice((1, 512, PAGE)), kind))
    return ops


def _deterministic_urandom() -> None:
    """Per-VM keys and scrambles come from ``os.urandom``: make them the same in both runs, so
    ciphertext can be compared byte for byte."""
    import hashlib
    import os

    counter = [0]

    def urandom(n: int) -> bytes:
        out = b""
        while len(out) < n:
            counter[0] += 1
            out += hashlib.sha256(counter[0].to_bytes(8, "little")).digest()
        return out[:n]

    os.urandom = urandom


def main() -> None:
    _deterministic_urandom()
    names = sys.argv[1:] or sorted(workloads())
    all_w = workloads()
    result = {"implementations": None, "runs": {n: _run(*all_w[n]) for n in names}}
    result["implementations"] = native.implementations()
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
