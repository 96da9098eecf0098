"""The in-place conversion series' selftests, ported whole: every case of
``tools/testing/selftests/kvm/x86/guest_memfd_conversions_test.c`` (RFC v5 and v8) with the same
iterations, and the series' content-mode test of ``x86/sev_smoke_test.c`` (``test_conversion``),
on the model (no kernel has per-guest_memfd attributes yet).

Why a second file beside ``test_inplace.py``: that one checks the model's rules case by case; this
one follows upstream's tests step by step, so each can be compared with its C original:

- the same fixture: a KVM_X86_SW_PROTECTED_VM, one guest_memfd (MMAP, with or without
  INIT_SHARED) bound GMEM_ONLY at 4 GiB in slot 1, the host reaching it through its own mmap;
- the same helpers: ``test_private`` (host write SIGBUS, guest read-modify-write, host read
  SIGBUS), ``test_shared`` (host read-modify-write, guest read-modify-write, host sees the
  guest's value), ``test_convert_to_private``/``test_convert_to_shared`` (convert one page with
  PRESERVE, then the above);
- the same iterations: ``indexing`` for every ``test_page`` of 4, ``unallocated_folios`` for every
  ``test_page`` of 8 (8 layouts of allocated and unallocated folios) including the final loop
  that converts each page back to shared, ``elevated_refcount`` for every pinned position of 4.

Stronger than upstream: the read-modify-writes cover whole pages (upstream touches the first
byte), every step is followed by the model's invariants, and each case runs under both revisions
(``v5`` with content modes, ``v8`` without, where contents are preserved on this VM type).
``forked_accesses`` uses the model's process fork (``guestmem/model/process.py``): the child
writes the shared page, the guest then reads the child's value, and the child gets SIGBUS once
the page is private.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitHypercall, Mapping
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Accept, MapGpaRange, Program, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32  # upstream: SZ_4G, above the APIC page
SLOT = 1
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ZERO = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE
MMAP, INIT_SHARED = u.GUEST_MEMFD_FLAG_MMAP, u.GUEST_MEMFD_FLAG_INIT_SHARED
REVISIONS = ["v5", "v8"]


class Conversions:
    """upstream's ``gmem_conversions`` fixture and helpers over one guest_memfd of ``nr_pages``."""

    def __init__(self, nr_pages: int, init_shared: bool, revision: str) -> None:
        self.kvm = guestmem.open("model", attributes="gmem", inplace_revision=revision,
                                 check_content_modes=revision == "v5")
        self.revision = revision
        self.vm = self.kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        self.nr_pages = nr_pages
        self.gmem = self.vm.create_guest_memfd(nr_pages * PS, MMAP | (INIT_SHARED if init_shared else 0))
        self.vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, nr_pages * PS, 0, self.gmem, 0)
        self.mem: Mapping = self.gmem.mmap(nr_pages * PS)
        self.vcpu = self.vm.create_vcpu(0)

    def close(self) -> None:
        self.kvm.close()

    def check(self) -> None:
        self.vm.check_invariants()

    # -- conversions (gmem_set_private / gmem_set_shared) -------------------------------------------
    def set_attributes(self, pgoff: int, nr_pages: int, attributes: int, mode: int = PRESERVE) -> None:
        flags = mode if self.revision == "v5" else 0  # v8 has no content modes
        self.gmem.set_memory_attributes2(pgoff * PS, nr_pages * PS, attributes, flags)
        self.check()

    # -- accesses ---------------------------------------------------------------------------------
    def host_do_rmw(self, mem: Mapping, pgoff: int, expected: int, write: int) -> None:
        assert mem.read(pgoff * PS, PS) == bytes([expected]) * PS, f"page {pgoff}: expected {expected:#x}"
        mem.fill(pgoff * PS, PS, write)
        self.check()

    def guest_do_rmw(self, pgoff: int, expected: int, write: int) -> None:
        gpa = GPA + pgoff * PS
        self.vcpu.load(Program([Verify(gpa, PS, expected), Write(gpa, PS, write)]))
        ex = self.vcpu.run()
        self.check()
        assert isinstance(ex, ExitHalt), f"page {pgoff}: guest {ex!r}"

    def host_sigbus(self, mem: Mapping, pgoff: int, write: int) -> None:
        with pytest.raises(GuestAccessFault):
            mem.write(pgoff * PS, bytes([write]))
        with pytest.raises(GuestAccessFault):
            mem.read(pgoff * PS, 1)

    def test_private(self, pgoff: int, starting: int, write: int) -> None:
        with pytest.raises(GuestAccessFault):
            self.mem.write(pgoff * PS, bytes([write]))
        self.guest_do_rmw(pgoff, starting, write)
        with pytest.raises(GuestAccessFault):
            self.mem.read(pgoff * PS, 1)

    def test_shared(self, pgoff: int, starting: int, host_write: int, write: int) -> None:
        self.host_do_rmw(self.mem, pgoff, starting, host_write)
        self.guest_do_rmw(pgoff, host_write, write)
        assert self.mem.read(pgoff * PS, PS) == bytes([write]) * PS

    def test_convert_to_private(self, pgoff: int, starting: int, write: int) -> None:
        self.set_attributes(pgoff, 1, PRIVATE)
        self.test_private(pgoff, starting, write)

    def test_convert_to_shared(self, pgoff: int, starting: int, host_write: int, write: int) -> None:
        self.set_attributes(pgoff, 1, 0)
        self.test_shared(pgoff, starting, host_write, write)

    def convert_to_private_fails(self, pgoff: int, nr_pages: int, expected_error_offset: int) -> None:
        """upstream test_convert_to_private_fails: EAGAIN with error_offset at the pinned page, and
        (stronger) no attribute changed anywhere."""
        before = [self.gmem.inode.attributes.get(p) for p in range(self.nr_pages)]
        with pytest.raises(KvmError) as ei:
            self.set_attributes(pgoff, nr_pages, PRIVATE)
        assert ei.value.errno == errno.EAGAIN, ei.value
        assert ei.value.error_offset == expected_error_offset
        assert [self.gmem.inode.attributes.get(p) for p in range(self.nr_pages)] == before
        self.check()


@pytest.fixture
def conversions() -> Iterator[type[Conversions]]:
    made: list[Conversions] = []

    def make(nr_pages: int, init_shared: bool, revision: str) -> Conversions:
        t = Conversions(nr_pages, init_shared, revision)
        made.append(t)
        return t

    yield make  # type: ignore[misc]
    for t in made:
        t.close()


@pytest.mark.parametrize("revision", REVISIONS)
def test_init_private(conversions, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:init_private."""
    t = conversions(1, False, revision)
    t.test_private(0, 0, ord("A"))
    t.test_convert_to_shared(0, ord("A"), ord("B"), ord("C"))
    t.test_convert_to_private(0, ord("C"), ord("E"))


@pytest.mark.parametrize("revision", REVISIONS)
def test_init_shared(conversions, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:init_shared."""
    t = conversions(1, True, revision)
    t.test_shared(0, 0, ord("A"), ord("B"))
    t.test_convert_to_private(0, ord("B"), ord("C"))
    t.test_convert_to_shared(0, ord("C"), ord("D"), ord("E"))


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("test_page", range(4))
def test_indexing(conversions, test_page: int, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:indexing, for every test_page of 4: values that depend on
    the page index and the step, the highest index first; one page converted to private and
    back while the host and the guest read-modify-write every shared neighbour.  With RFC v2's
    "Test precision of conversion" pass too (a second round with only test_page private)."""
    t = conversions(4, True, revision)
    n = t.nr_pages

    def f(x: int, v: int) -> int:
        return (x << 4) + v

    for i in reversed(range(n)):
        t.test_shared(i, 0, f(i, 0), f(i, 2))
    t.test_convert_to_private(test_page, f(test_page, 2), f(test_page, 3))
    for i in range(n):
        if i == test_page:
            t.test_private(i, f(i, 3), f(i, 4))
        else:
            t.test_shared(i, f(i, 2), f(i, 3), f(i, 4))
    # RFC v2's "precision of conversion" pass: still only test_page is private.
    for i in range(n):
        if i == test_page:
            t.test_private(i, f(i, 4), f(i, 9))
        else:
            t.test_shared(i, f(i, 4), f(i, 10), f(i, 9))
    t.test_convert_to_shared(test_page, f(test_page, 9), f(test_page, 5), f(test_page, 6))
    for i in range(n):
        t.test_shared(i, f(i, 6) if i == test_page else f(i, 9), f(i, 7), f(i, 8))


@pytest.mark.parametrize("revision", REVISIONS)
def test_before_allocation_shared(conversions, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:before_allocation_shared: a conversion with no folio yet is
    recorded; the guest reads 0.  Stronger: nothing was allocated by the conversion."""
    t = conversions(1, True, revision)
    t.set_attributes(0, 1, PRIVATE)
    assert t.gmem.inode.cache.nr_pages == 0
    t.test_private(0, 0, ord("A"))


@pytest.mark.parametrize("revision", REVISIONS)
def test_before_allocation_private(conversions, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:before_allocation_private."""
    t = conversions(1, False, revision)
    t.set_attributes(0, 1, 0)
    assert t.gmem.inode.cache.nr_pages == 0
    t.test_shared(0, 0, ord("A"), ord("B"))


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("test_page", range(8))
def test_unallocated_folios(conversions, test_page: int, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:unallocated_folios, for every test_page of 8: the host
    faults test_page and page 4, the whole file goes private in one call, the faulted pages keep
    'A' and the rest read 0; then every page converts back to shared, one by one."""
    t = conversions(8, True, revision)
    second = 4
    t.host_do_rmw(t.mem, test_page, 0, ord("A"))
    if test_page != second:
        t.host_do_rmw(t.mem, second, 0, ord("A"))
    t.set_attributes(0, t.nr_pages, PRIVATE)
    for i in range(t.nr_pages):
        t.test_private(i, ord("A") if i in (test_page, second) else 0, ord("B"))
    for i in range(t.nr_pages):
        t.test_convert_to_shared(i, ord("B"), ord("C"), ord("D"))


@pytest.mark.parametrize("revision", REVISIONS)
def test_truncate(conversions, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:truncate: a hole punch keeps the shared/private state."""
    t = conversions(1, True, revision)
    punch = u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE
    t.host_do_rmw(t.mem, 0, 0, ord("A"))
    t.gmem.fallocate(punch, 0, PS)
    t.check()
    t.host_do_rmw(t.mem, 0, 0, ord("A"))
    t.test_convert_to_private(0, ord("A"), ord("B"))
    t.gmem.fallocate(punch, 0, PS)
    t.check()
    t.test_private(0, 0, ord("A"))


@pytest.mark.parametrize("revision", REVISIONS)
def test_forked_accesses(conversions, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:forked_accesses, with the model's fork: the child maps the
    shared page and read-modify-writes it (0xB -> 0xC), the parent's guest then reads the child's
    0xC once the page is private, and the child gets SIGBUS reading and writing it.  Extra: back
    to shared, the child sees the guest's last write."""
    t = conversions(1, True, revision)
    child = t.kvm.process.fork()
    child_mem = child.mapping_at(t.mem.addr)
    assert child_mem is not None
    t.test_shared(0, 0, 0xA, 0xB)
    t.host_do_rmw(child_mem, 0, 0xB, 0xC)  # the child writes
    t.test_convert_to_private(0, 0xC, 0xD)  # the guest sees the child's write
    t.host_sigbus(child_mem, 0, 0xDD)
    t.set_attributes(0, 1, 0)
    assert child_mem.read(0, PS) == bytes([0xD]) * PS


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("test_page", range(4))
def test_elevated_refcount(conversions, test_page: int, revision: str) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:elevated_refcount, for every pinned position of 4: with one
    page pinned (a long-term pin, as the GUP test's PIN_LONGTERM), converting all 4 to private is
    EAGAIN at the pinned page; page by page, the pinned one fails the same way and the others
    convert; once unpinned, the bulk conversion of the mixed range succeeds and every page holds
    what it held."""
    t = conversions(4, True, revision)
    with t.mem.pin(test_page * PS, PS):
        for i in range(t.nr_pages):
            t.test_shared(i, 0, ord("A"), ord("B"))
        t.convert_to_private_fails(0, t.nr_pages, test_page * PS)
        for i in range(t.nr_pages):
            if i == test_page:
                t.convert_to_private_fails(i, 1, test_page * PS)
            else:
                t.test_convert_to_private(i, ord("B"), ord("C"))
    t.set_attributes(0, t.nr_pages, PRIVATE)
    for i in range(t.nr_pages):
        t.test_private(i, ord("B") if i == test_page else ord("C"), ord("D"))


def test_convert_to_private_does_not_support_zero(conversions) -> None:  # type: ignore[no-untyped-def]
    """guest_memfd_conversions_test.c:convert_to_private_does_not_support_zero (RFC v5): ZERO
    towards private is EOPNOTSUPP with error_offset at the start; stronger: nothing changed."""
    t = conversions(1, True, "v5")
    with pytest.raises(KvmError) as ei:
        t.gmem.set_memory_attributes2(0, PS, PRIVATE, ZERO)
    assert ei.value.errno == errno.EOPNOTSUPP and ei.value.error_offset == 0
    assert not t.gmem.inode.is_private(0)
    t.test_shared(0, 0, ord("A"), ord("B"))


# --- sev_smoke_test.c:test_conversion (the series' content modes), on SNP-like and TDX-like VMs ------

FLAVOURS = [pytest.param(u.KVM_X86_SNP_VM, id="snp"), pytest.param(u.KVM_X86_TDX_VM, id="tdx")]
SECRET = 0xA7


@pytest.mark.parametrize("mode", [pytest.param(0, id="UNSPECIFIED"), pytest.param(ZERO, id="ZERO")])
@pytest.mark.parametrize("vm_type", FLAVOURS)
def test_conversion_content_modes(vm_type: int, mode: int) -> None:
    """sev_smoke_test.c:test_conversion(policy, content_mode) of the series' RFC v5, on SNP-like
    and TDX-like memory.  The guest asks for its page private (MAP_GPA_RANGE, encrypted, 4K); the
    host finds ZERO-to-private and PRESERVE in either direction EOPNOTSUPP (error_offset = the
    page), converts with UNSPECIFIED; the guest accepts the page and writes a secret into it, then
    asks for it shared; the host converts it with ``mode``.  ZERO: the host reads zeros (upstream's
    assertion, over the whole page here).  UNSPECIFIED: upstream only prints what the host sees;
    here the host must at least not see the secret (it sees ciphertext).  Then the guest reads
    the shared page and finds what the host sees."""
    kvm = guestmem.open("model", attributes="gmem", inplace_revision="v5", check_content_modes=True)
    try:
        vm = kvm.create_vm(vm_type)
        gmem = vm.create_guest_memfd(PS, MMAP | INIT_SHARED)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, PS, 0, gmem, 0)
        host = gmem.mmap(PS)
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
        vm.launch_finalize()
        vcpu = vm.create_vcpu(0)
        enc = u.KVM_MAP_GPA_RANGE_ENCRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        dec = u.KVM_MAP_GPA_RANGE_DECRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        vcpu.load(Program([MapGpaRange(GPA, 1, enc), Accept(GPA, PS), Write(GPA, PS, SECRET, "private"),
                           MapGpaRange(GPA, 1, dec)]))

        ex = vcpu.run()
        assert isinstance(ex, ExitHypercall) and ex.nr == u.KVM_HC_MAP_GPA_RANGE, ex
        assert (ex.gpa, ex.npages, ex.attrs) == (GPA, 1, enc)
        for attrs, flags in [(PRIVATE, ZERO), (0, PRESERVE), (PRIVATE, PRESERVE)]:
            with pytest.raises(KvmError) as ei:
                gmem.set_memory_attributes2(0, PS, attrs, flags)
            assert ei.value.errno == errno.EOPNOTSUPP and ei.value.error_offset == 0, ei.value
        gmem.set_memory_attributes2(0, PS, PRIVATE, 0)
        vm.check_invariants()
        ex.ret = 0

        ex = vcpu.run()
        assert isinstance(ex, ExitHypercall) and (ex.gpa, ex.npages, ex.attrs) == (GPA, 1, dec), ex
        gmem.set_memory_attributes2(0, PS, 0, mode)
        vm.check_invariants()
        seen = host.read(0, PS)
        if mode == ZERO:
            assert seen == bytes(PS)
        else:
            assert seen != bytes([SECRET]) * PS
        ex.ret = 0
        vcpu.load(Program([Verify(GPA, PS, seen[0], "shared")] if len(set(seen)) == 1 else []))
        assert isinstance(vcpu.run(), ExitHalt)
        vm.check_invariants()
    finally:
        kvm.close()


@pytest.mark.parametrize("vm_type", FLAVOURS)
def test_preserve_to_private_before_finalize_keeps_plaintext(vm_type: int) -> None:
    """The series' PRESERVE rule for SNP/TDX (RFC v5): towards private it is allowed only before
    the launch is finalized (KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS' in-place launch), and then the
    guest reads exactly the plaintext the host wrote; after finalize the same request is
    EOPNOTSUPP and changes nothing.  Content checked on encrypted memory, not only on
    software-protected."""
    kvm = guestmem.open("model", attributes="gmem", inplace_revision="v5", check_content_modes=True)
    try:
        vm = kvm.create_vm(vm_type)
        gmem = vm.create_guest_memfd(2 * PS, MMAP | INIT_SHARED)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, 2 * PS, 0, gmem, 0)
        host = gmem.mmap(2 * PS)
        plaintext = bytes(range(256)) * (PS // 256)
        host.write(0, plaintext)
        host.write(PS, plaintext)
        gmem.set_memory_attributes2(0, PS, PRIVATE, PRESERVE)
        vm.check_invariants()
        vm.launch_finalize()
        with pytest.raises(KvmError) as ei:
            gmem.set_memory_attributes2(PS, PS, PRIVATE, PRESERVE)
        assert ei.value.errno == errno.EOPNOTSUPP and ei.value.error_offset == PS
        assert host.read(PS, PS) == plaintext  # still shared, untouched
        with pytest.raises(GuestAccessFault):
            host.read(0, 1)
        vcpu = vm.create_vcpu(0)
        # The plaintext is not a uniform byte: the guest checks it 256 bytes at a time per value.
        vcpu.load(Program([Verify(GPA + i, 1, i % 256, "private") for i in range(0, PS, 97)]))
        assert isinstance(vcpu.run(), ExitHalt)
        vm.check_invariants()
    finally:
        kvm.close()


# --- guest_memfd_test.c:test_guest_private_mem (added by the series) --------------------------------


@pytest.mark.parametrize("revision", REVISIONS)
def test_guest_private_mem(revision: str) -> None:
    """guest_memfd_test.c:test_guest_private_mem with per-guest_memfd attributes: a
    KVM_X86_SW_PROTECTED_VM, one page of guest_memfd at 4 GiB in slot 1 made private; the guest
    writes 0xff and reads it back.  Stronger: the whole page, and the host's mapping of the
    private page is SIGBUS.  (The per-VM-attributes form runs on both backends in
    tests/conformance/test_guest_memfd_private.py.)"""
    with guestmem.open("model", attributes="gmem", inplace_revision=revision) as kvm:
        vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(PS, MMAP)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GPA, PS, 0, gmem, 0)
        gmem.set_memory_attributes2(0, PS, PRIVATE)
        vm.check_invariants()
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([Write(GPA, PS, 0xFF), Verify(GPA, PS, 0xFF)]))
        assert isinstance(vcpu.run(), ExitHalt)
        vm.check_invariants()
        with gmem.mmap(PS) as host, pytest.raises(GuestAccessFault):
            host.read(0, 1)
