"""x86/private_mem_kvm_exits_test.c:test_private_access_memslot_deleted under every interleaving.

The conformance port (tests/conformance/test_private_mem_kvm_exits.py) races real threads: one
run, one deletion, wherever the OS scheduler lets them meet.  Here the model's scheduling hooks
(guestmem/sync.py, driven by guestmem.explore) place the deletion at every point of the vCPU's
KVM_RUN that the model has a window at (lock operations, the fault path's
mmu_invalidate_seq window), depth-first, up to two preemptions: a proof over those schedules
rather than a sample.

Each schedule: a KVM_X86_SW_PROTECTED_VM with per-VM attributes, its slot's pages private and
not yet mapped (so the first read's fault can be in flight when the slot goes); the vCPU reads
it repeatedly (upstream's ``guest_repeatedly_read``, three
times here) while a host thread deletes the slot.  Upstream's assertion must hold whenever the
deletion lands before the guest's last read: KVM_RUN ends in EFAULT + KVM_EXIT_MEMORY_FAULT
{PRIVATE, the GPA, PAGE_SIZE}; if every read came first the run halts (upstream's guest never
stops reading, so it would go on to fault).  Nothing else may happen, the model's invariants
hold at every step (the explorer checks them), and both outcomes must actually occur.

This found a model bug: a fault in flight whose slot was deleted under it got get_pfn's EIO
(the binding was gone) instead of retrying into upstream's EFAULT exit; upstream's deletion waits
for such a fault (synchronize_srcu), so its get_pfn still finds the binding and its mmu_seq
recheck sends it round again.  The fix is in guestmem/model/kvm/fault.py.  The museum's
``delete-no-wait`` mutant (a deletion that does not wait) must still be caught here.
"""

from __future__ import annotations

import errno
from collections import Counter

import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitMemoryFault
from guestmem.explore import races
from guestmem.explore.strategies import Follow, dfs_bound, run_schedule
from guestmem.guest.ops import Program, Verify

READ_GPA = races.GPA + races.P * races.PS
READS = 3


def _build(flavour: str) -> races.World:
    w = races.per_vm(flavour, prefault=False)  # all pages private, none mapped yet
    vcpu = w.notes["vcpu"]
    vcpu.load(Program([Verify(READ_GPA, 8, 0)] * READS))

    def run() -> object:
        try:
            return vcpu.run()
        except Exception as exc:  # reported by the postcondition, with the schedule
            return exc

    def delete() -> object:
        w.vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, races.GPA, 0, 0, guest_memfd=-1)
        return "deleted"

    def post(world: races.World, results: dict[str, object]) -> str | None:
        ex = results.get("vcpu")
        if isinstance(ex, ExitHalt):
            return None
        if not isinstance(ex, ExitMemoryFault):
            return f"KVM_RUN ended with {ex!r}, not a private memory fault"
        got = (ex.errno, ex.flags, ex.gpa, ex.size)
        want = (errno.EFAULT, u.KVM_MEMORY_EXIT_FLAG_PRIVATE, READ_GPA, races.PS)
        return None if got == want else f"memory fault {got}, expected {want}"

    w.threads = {"vcpu": run, "delete": delete}
    w.post = post
    return w


RACE = races.Race("kvm-exits-memslot-deleted", "sw", "the selftest's read loop vs slot deletion", _build)


def test_memslot_deleted_during_run_every_interleaving() -> None:
    race = RACE
    outcomes: Counter[str] = Counter()
    schedules = 0
    for out in dfs_bound(lambda prefix: run_schedule(race, None, Follow(prefix)), 2):
        schedules += 1
        assert out.violation is None, f"schedule {out.choices}: {out.violation}"
        outcomes[type(out.results["vcpu"]).__name__] += 1
    assert outcomes["ExitMemoryFault"] > 0 and outcomes["ExitHalt"] > 0, (schedules, outcomes)


def test_a_deletion_that_does_not_wait_is_caught() -> None:
    """The same search with the ``delete-no-wait`` mutant applied finds a violation."""
    found = None
    for out in dfs_bound(lambda prefix: run_schedule(RACE, "delete-no-wait", Follow(prefix)), 2):
        if out.violation is not None:
            found = out.violation
            break
    assert found is not None, "the delete-no-wait mutant went unnoticed"
