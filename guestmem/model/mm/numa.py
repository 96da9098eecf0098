"""NUMA memory policy of the model: shared (per-file) policies and where a new page goes.

Upstream 7.2's guest_memfd keeps a ``struct shared_policy`` per inode (``kvm_gmem_set_policy`` /
``kvm_gmem_get_policy``), as shmem does: ``mbind`` on a mapping stores a policy for the file's
page range, and every later allocation of a page in that range (``kvm_gmem_get_folio`` ->
``__filemap_get_folio_mpol``) follows it.  A page allocated before the ``mbind`` stays where it
is (mbind without MPOL_MF_MOVE does not migrate).  With no file policy the allocation follows the
task's policy (``set_mempolicy``), and with none of either it is local: the model's CPUs are on
node 0.

A frame's node is a function of its pfn (:meth:`FramePool.node_of`), so "which node is this page
on" (``get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR)``, ``move_pages``) is answered from the page cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from guestmem import mman
from guestmem.mman import MemPolicy
from guestmem.ranges import RangeMap

LOCAL_NODE = 0  # where the model's CPUs are


class TaskPolicy:
    """A task's ``set_mempolicy`` policy and its interleave cursor (``current->il_prev``)."""

    def __init__(self) -> None:
        self.policy: MemPolicy | None = None
        self._il_prev = -1
        self._lock = threading.Lock()

    def next_interleave(self, nodes: int) -> int:
        """``interleave_nodes``: the node after the last one used, round-robin over ``nodes``."""
        members = mman.nodes_of(nodes)
        with self._lock:
            later = [n for n in members if n > self._il_prev]
            self._il_prev = later[0] if later else members[0]
            return self._il_prev

    def copy(self) -> TaskPolicy:
        """fork(2): the child inherits the policy."""
        t = TaskPolicy()
        t.policy = self.policy
        t._il_prev = self._il_prev
        return t


def policy_node(pol: MemPolicy | None, task: TaskPolicy) -> int | None:
    """The node a new page goes to under ``pol`` (the file's policy, else the task's)."""
    if pol is None:
        pol = task.policy
    if pol is None or pol.mode == mman.MPOL_LOCAL:
        return None
    if pol.mode in (mman.MPOL_INTERLEAVE, mman.MPOL_WEIGHTED_INTERLEAVE):
        return task.next_interleave(pol.nodes)
    # BIND, PREFERRED, PREFERRED_MANY: the local node if allowed, else the first allowed one.
    if pol.nodes >> LOCAL_NODE & 1:
        return LOCAL_NODE
    return mman.nodes_of(pol.nodes)[0]


class SharedPolicy:
    """``struct shared_policy``: policies over page-index ranges of one file."""

    def __init__(self, task: Callable[[], TaskPolicy]) -> None:
        self.ranges: RangeMap[MemPolicy | None] = RangeMap(None)
        self._task = task

    def set(self, start: int, end: int, pol: MemPolicy | None) -> None:
        """``mpol_set_shared_policy``: MPOL_DEFAULT (None) removes the range's policy."""
        self.ranges.set(start, end, pol)

    def lookup(self, index: int) -> MemPolicy | None:
        """``mpol_shared_policy_lookup``: None when no policy was set for the page."""
        return self.ranges.get(index)

    def placement(self, start: int, end: int) -> list[tuple[int, int, int | None]]:
        """Where new pages of ``[start, end)`` go: pieces ``(s, e, node)`` (node None: anywhere,
        which the pool serves from the local node first).  Interleaving is per page."""
        task = self._task()
        out: list[tuple[int, int, int | None]] = []
        for s, e, pol in self.ranges.segments(start, end):
            eff = pol if pol is not None else task.policy
            if eff is not None and eff.mode in (mman.MPOL_INTERLEAVE, mman.MPOL_WEIGHTED_INTERLEAVE):
                out.extend((i, i + 1, policy_node(pol, task)) for i in range(s, e))
            else:
                out.append((s, e, policy_node(pol, task)))
        return out
