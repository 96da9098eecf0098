"""The observable state of a whole model system, for "a refused call changes nothing".

A snapshot is a plain nested tuple/dict value, so two snapshots compare with ``==`` and a
difference can be named by section.  It reads the model's objects directly (this is floor 5; the
model is below): the fd table, mappings, every VM (memslots, per-VM attributes, SPTEs, open
invalidations, vCPUs, launch state), every live file with a page cache (its pages as ranges,
folio orders, pins, uptodate, guest_memfd attributes/hwpoison/bindings, and a digest of contents),
and the frame pool's counters.  The state the file and mm calls change is there too: each fd's open
file description (``f_flags``, ``f_pos``, FD_CLOEXEC), a memfd's seals and mode, every mapping's
protections, the task's and every file's NUMA policy, and each logging memslot's dirty bitmap.
Which pages hold host PTEs is left out: a refused conversion may zap them first, as the kernel
does (a refault restores them, so nothing a caller sees has changed).
Everything is walked as ranges, so it is cheap for sparse guests;
contents are digested over at most ``SAMPLE_PAGES`` pages per file run, which keeps a 1 GiB folio
affordable while still catching a refused call that scribbled on memory.
"""

from __future__ import annotations

import hashlib
from typing import Any

from guestmem import uapi as u

PS = u.PAGE_SIZE
SAMPLE_PAGES = 16
ALL = 1 << 51


def _items(rm: Any) -> tuple:
    return tuple(rm.items())


def _cache_state(cache: Any, pool: Any) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=12)
    runs = []
    for s, e, pfn, order in cache.lookup_range(0, ALL):
        if pfn is None:
            continue
        runs.append((s, e, pfn - s, order))
        n = e - s
        step = max(1, n // SAMPLE_PAGES)
        for i in range(0, n, step):
            h.update(pool.view(pfn + i, 1).tobytes())
    return {
        "runs": tuple(runs),
        "nr": cache.nr_pages,
        "refs": _items(cache._refs),
        "uptodate": _items(cache._uptodate),
        "digest": h.hexdigest(),
    }


def _policy_state(f: Any) -> tuple | None:
    """A file's shared NUMA policy (``mbind`` on a mapping of it): its ranges, or None."""
    sp = getattr(f, "shared_policy", None)
    return None if sp is None else _items(sp.ranges)


def _fd_state(fd: int, obj: Any, cloexec: set[int]) -> tuple:
    """One fd: its object, and for a file with the file ABI its open file description (shared by
    dups, own for a reopen), seals and mode: what fcntl/lseek/fchmod/reopen change."""
    desc: tuple = ()
    if hasattr(obj, "_desc") and hasattr(obj, "_i_seals"):
        d = obj._desc()
        desc = (obj._f_flags(), obj._f_pos(), tuple(sorted((k, repr(v)) for k, v in d.items())),
                obj._i_seals(), obj._i_mode())
    return (fd, type(obj).__name__, id(getattr(obj, "_dup_of", obj)), fd in cloexec, desc)


def _file_state(f: Any, pool: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(f).__name__, "cache": _cache_state(f.cache, pool),
                           "policy": _policy_state(f)}
    if hasattr(f, "attributes") and hasattr(f, "hwpoison"):  # a guest_memfd inode
        out["attributes"] = _items(f.attributes)
        out["hwpoison"] = _items(f.hwpoison)
        out["size"] = f.size
        out["files"] = tuple(
            (g.fd, g.released, g._refs, tuple((s, e, id(sl)) for s, e, sl in g.bindings.items()))
            for g in f.files)
    else:
        out["refs"] = getattr(f, "_refs", None)
        out["fd"] = getattr(f, "fd", None)
    return out


def _vm_state(vm: Any) -> dict[str, Any]:
    slots = []
    for ms in vm.memslots:
        for sl in ms:
            g = sl.gmem_file
            slots.append((sl.as_id, sl.id, sl.base_gfn, sl.npages, sl.flags, sl.userspace_addr,
                          None if g is None else id(g), getattr(sl, "gmem_pgoff", None)))
    arch = vm.arch
    return {
        "fd": vm.fd,
        "refs": vm._refs,
        "destroyed": vm.destroyed,
        "bugged": vm.bugged,
        "hc_mask": vm.exit_hypercall_mask,
        "attributes": _items(vm.attributes),
        "slots": tuple(sorted(slots)),
        "sptes": tuple(_items(s) for s in vm.mmu.sptes),
        "in_progress": vm.mmu.in_progress,
        "vcpus": tuple(sorted((i, c.pc, c.progress, c.halted, c.closed, id(c.program))
                              for i, c in vm.vcpus.items())),
        "finalized": getattr(arch, "finalized", None),
        "accepted": _items(arch.accepted) if hasattr(arch, "accepted") else None,
        "assigned": _items(arch.assigned) if hasattr(arch, "assigned") else None,
        "dirty": tuple(sorted((sl.as_id, sl.id, None if sl.dirty_bitmap is None else
                               _items(sl.dirty_bitmap)) for ms in vm.memslots for sl in ms)),
    }


def snapshot(kvm: Any, views: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Everything observable about the model system ``kvm`` (a ``ModelKvm``).  ``views`` are the
    caller's file objects: a reopened fd's own open file description is reachable only through
    its object (the fd table holds the one struct file)."""
    proc = kvm.process
    with proc._lock:
        fds = tuple(sorted(_fd_state(fd, o, proc.fd_cloexec)
                           for fd in list(proc._fds) if (o := proc.fget(fd)) is not None))
    maps = tuple(sorted((m.addr, m.length, m.pgoff, id(m.file), m.closed, m.shared,
                         _items(m.prot_map), _policy_state(m.source))
                        for m in proc.mappings()))
    files = {}
    for f in kvm.live_files():
        files[id(f)] = _file_state(f, kvm.pool)
    return {
        "closed": kvm.closed,
        "fds": fds,
        "mappings": maps,
        "vms": {id(vm): _vm_state(vm) for vm in list(kvm.vms)},
        "files": files,
        "pool": (kvm.pool.allocated, kvm.pool.deferred),
        "task_policy": proc.task_policy.policy,
        "descriptions": tuple(sorted((v.fd, repr(sorted(v._own_desc.items()))) for v in views
                                     if getattr(v, "_own_desc", None) is not None)),
    }


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The sections (dotted paths, two levels deep) in which two snapshots differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            if set(va) != set(vb):
                out.append(f"{k}: objects appeared/disappeared")
                continue
            for kk in va:
                if va[kk] != vb[kk]:
                    sub = va[kk]
                    if isinstance(sub, dict):
                        parts = sorted(x for x in sub if sub[x] != vb[kk].get(x))
                        out.append(f"{k}.{'/'.join(parts)}")
                    else:
                        out.append(k)
        else:
            out.append(k)
    return sorted(set(out))
