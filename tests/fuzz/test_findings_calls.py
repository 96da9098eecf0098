"""Fuzz findings in the model replayed through the fuzzer's own judge (a Session).

Each is the shrunk reproducer of a finding: the session must judge every step clean, and the
state the finding was about must be right.
"""

from __future__ import annotations

from guestmem.fuzz.machine import Session, Step


def _replay(opts: dict[str, object], lines: list[str]) -> list[str]:
    s = Session(opts)
    out = []
    for line in lines:
        f = s.run(Step(line, "replay", ()))
        if f is not None:
            out.append(f"{f.category}: {f.message}")
    return out


def test_failed_kvm_fault_leaves_no_host_pte() -> None:
    # seed 7:2109: a memslot over a memfd mapping past the file's end; KVM_PRE_FAULT_MEMORY's GUP
    # takes SIGBUS (EFAULT), and the model had marked the page host-mapped before faulting it.
    lines = ["vm1 = kvm.create_vm(0x0)",
             "f2 = kvm.memfd_create(0x1000, 0x1)",
             "m3 = kvm.mmap(0x1000, 0x3, 0x3, f2, 0x1000)",
             "vm1.set_user_memory_region(0x0, 0x0, 0x100000000, 0x1000, m3.addr)",
             "c17 = vm1.create_vcpu(0x0)",
             "c17.pre_fault_memory(0x100000000, 0x1000, 0x0)"]
    assert _replay({"kernel": "6.18"}, lines) == []
    s = Session({"kernel": "6.18"})
    for line in lines:
        s.run(Step(line, "replay", ()))
    assert s.outcomes[-1] == "KvmError(EFAULT)"
    assert not s.ns["m3"].mapped.get(0)


def test_spte_run_over_a_map_fixed_piece_is_checked_per_mapping() -> None:
    # seed 12:10720: a MAP_FIXED piece inside a memslot's mapping; pre-faulting across it made one
    # SPTE run (the frames happened to continue each other) and invariant 1 resolved all of it
    # through the first page's mapping, reporting the parent's pages as removed.
    lines = ["m2 = kvm.mmap_anonymous(0x4000)",
             "m4 = m2.mmap_fixed(0x1000, 0x1000, 0x1, 0x21)",
             "vm5 = kvm.create_vm(0x5)",
             "c6 = vm5.create_vcpu(0x3ff)",
             "vm5.set_user_memory_region2(0x1, 0x1, 0x100000000, 0x4000, m2.addr, None, 0x0)",
             "vm5.launch_finalize()",
             "c6.pre_fault_memory(0x100001000, 0x3000, 0x0)"]
    assert _replay({}, lines) == []


def test_kvm_fault_stops_at_a_map_fixed_piece() -> None:
    # seed 14:1545: a KVM fault through a mapping took the pages of the mapping itself past the
    # start of a MAP_FIXED (PROT_NONE) piece inside it: SPTEs over the piece mapped frames that are
    # not what the host maps there (invariant 1).
    lines = ["m1 = kvm.mmap_anonymous(0x5000)",
             "vm4 = kvm.create_vm(0x0)",
             "vm4.set_user_memory_region2(0x7ffb, 0x1, 0x0, 0x5000, m1.addr, None, 0xfffffffffffff000)",
             "m9 = m1.mmap_fixed(0x3000, 0x2000, 0x0, 0x21)",
             "c14 = vm4.create_vcpu(0x1)",
             "c14.load(Program([Verify(0x2000, 0x3000, 0xef, 'private'), "
             "Write(0x4000, 0x1000, 0x61, 'auto')]))",
             "x14 = c14.run()"]
    assert _replay({"attributes": "gmem", "inplace_revision": "v5"}, lines) == []


def test_gup_stops_at_an_unmapped_map_fixed_piece() -> None:
    """guestmem fuzz (seed 2041:5746): a MAP_FIXED piece inside a memslot's mapping, unmapped
    again, leaves a hole.  KVM's host fault must stop before it (and fail there with EFAULT), not
    map the hole's gfns to the parent mapping's pages (invariant 1)."""
    import errno
    from contextlib import ExitStack

    import guestmem
    from guestmem.errors import KvmError
    from guestmem.guest.ops import Program, Write

    kvm = guestmem.open("model")
    m = kvm.mmap_anonymous(0x5000)
    vm = kvm.create_vm(0)
    vm.set_user_memory_region(1, 0, 1 << 32, 0x5000, m.addr)
    vcpu = vm.create_vcpu(0)
    with ExitStack() as pins:
        pins.enter_context(m.pin(0x3000, 0x2000))
        piece = m.mmap_fixed(0x1000, 0x3000, 0, 0x22)  # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
        piece.close()
        vcpu.load(Program([Write(1 << 32, 0x4000, 0xE5)]))
        try:
            vcpu.run()
        except KvmError as err:
            assert err.errno == errno.EFAULT
        else:
            raise AssertionError("a guest write over the unmapped hole must fail with EFAULT")
        vm.check_invariants()
