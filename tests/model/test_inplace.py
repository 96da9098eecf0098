"""In-place conversion (seed 004 and its series): the series' test list, in our own code.

Ports the cases of the series' ``guest_memfd_conversions_test`` (init_private, init_shared,
indexing, before_allocation, unallocated_folios, truncate, forked_accesses, elevated_refcount)
and the content-mode rules of RFC v5, over both revisions and all three protected flavours.
"""

from __future__ import annotations

import errno

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitGuestAssert, ExitHalt, ExitMemoryFault
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Accept, Program, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ZERO = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE
MMAP, INIT_SHARED = u.GUEST_MEMFD_FLAG_MMAP, u.GUEST_MEMFD_FLAG_INIT_SHARED
FLAVOURS = {"sw": u.KVM_X86_SW_PROTECTED_VM, "snp": u.KVM_X86_SNP_VM, "tdx": u.KVM_X86_TDX_VM}


class Env:
    """A VM with one guest_memfd bound at 4 GiB (GMEM_ONLY), its host mapping and a vCPU."""

    def __init__(self, npages: int = 4, *, flavour: str = "sw", init_shared: bool = False,
                 revision: str = "v5", folio_order: int = 0, finalize: bool = True) -> None:
        self.kvm = guestmem.open("model", attributes="gmem", inplace_revision=revision,
                                 gmem_folio_order=folio_order, check_content_modes=True)
        self.vm = self.kvm.create_vm(FLAVOURS[flavour])
        self.flavour = flavour
        self.size = npages * PS
        self.gmem = self.vm.create_guest_memfd(self.size, MMAP | (INIT_SHARED if init_shared else 0))
        self.map = self.gmem.mmap()
        self.vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, self.size, 0, self.gmem, 0)
        self.vcpu = self.vm.create_vcpu(0)
        if finalize and flavour != "sw":
            self.vm.launch_finalize()

    def check(self) -> None:
        self.vm.check_invariants()

    def convert(self, page: int, npages: int, private: bool, mode: int = 0) -> None:
        if self.kvm.options.inplace_revision == "v8":
            mode = 0
        self.gmem.set_memory_attributes2(page * PS, npages * PS, PRIVATE if private else 0, mode)
        self.check()

    def guest(self, *ops) -> object:
        self.vcpu.load(Program(list(ops)))
        ex = self.vcpu.run()
        self.check()
        return ex

    def guest_rmw(self, page: int, expect: int, new: int, access: str = "auto") -> None:
        """The guest checks a page holds ``expect`` and writes ``new`` (private pages are accepted
        first on flavours that need it)."""
        ops = []
        if access == "private" and self.flavour != "sw":
            ops.append(Accept(GPA + page * PS, PS))
        ops += [Verify(GPA + page * PS, PS, expect, access), Write(GPA + page * PS, PS, new, access)]
        ex = self.guest(*ops)
        assert isinstance(ex, ExitHalt), ex

    def host_sigbus(self, page: int) -> None:
        with pytest.raises(GuestAccessFault):
            self.map.read(page * PS, 1)
        with pytest.raises(GuestAccessFault):
            self.map.write(page * PS, b"x")


def test_private(env: Env, page: int, expect: int, new: int) -> None:
    env.host_sigbus(page)
    env.guest_rmw(page, expect, new, "private")
    env.host_sigbus(page)


def test_shared(env: Env, page: int, expect: int, host_new: int, guest_new: int) -> None:
    assert env.map.read(page * PS, PS) == bytes([expect]) * PS
    env.map.fill(page * PS, PS, host_new)
    env.guest_rmw(page, host_new, guest_new, "shared")
    assert env.map.read(page * PS, PS) == bytes([guest_new]) * PS


test_private.__test__ = False  # helpers named as the series names them, not tests
test_shared.__test__ = False


@pytest.mark.parametrize("revision", ["v5", "v8"])
def test_init_private(revision: str) -> None:
    env = Env(1, revision=revision)
    test_private(env, 0, 0, 0xA1)
    env.convert(0, 1, False, PRESERVE)
    test_shared(env, 0, 0xA1, 0xB2, 0xC3)
    env.convert(0, 1, True, PRESERVE)
    test_private(env, 0, 0xC3, 0xD4)


@pytest.mark.parametrize("revision", ["v5", "v8"])
def test_init_shared(revision: str) -> None:
    env = Env(1, init_shared=True, revision=revision)
    test_shared(env, 0, 0, 0xB1, 0xC2)
    env.convert(0, 1, True, PRESERVE)
    test_private(env, 0, 0xC2, 0xD3)
    env.convert(0, 1, False, PRESERVE)
    test_shared(env, 0, 0xD3, 0xE4, 0xF5)


def test_indexing_precision() -> None:
    """Converting one page leaves its neighbours untouched, in attributes and contents."""
    env = Env(4, init_shared=True)
    for p in range(4):
        env.map.fill(p * PS, PS, 0x10 + p)
    env.convert(2, 1, True, PRESERVE)
    for p in (0, 1, 3):
        assert env.map.read(p * PS, PS) == bytes([0x10 + p]) * PS
    env.host_sigbus(2)
    env.guest_rmw(2, 0x12, 0x22, "private")
    env.convert(2, 1, False, PRESERVE)
    assert [env.map.read(p * PS, 1)[0] for p in range(4)] == [0x10, 0x11, 0x22, 0x13]


@pytest.mark.parametrize("to_private", [False, True])
def test_conversion_before_allocation(to_private: bool) -> None:
    env = Env(2, init_shared=not to_private)
    env.convert(0, 2, to_private)
    assert env.gmem.inode.cache.nr_pages == 0  # nothing was allocated by converting
    if to_private:
        test_private(env, 0, 0, 0x5A)
    else:
        test_shared(env, 0, 0, 0x5A, 0x6B)


def test_unallocated_folios() -> None:
    """Fault two pages, bulk-convert all: the faulted keep their data, the rest read zero."""
    env = Env(8, init_shared=True)
    for p in (1, 4):
        env.map.fill(p * PS, PS, ord("A"))
    env.convert(0, 8, True, PRESERVE)
    for p in range(8):
        env.guest_rmw(p, ord("A") if p in (1, 4) else 0, 0x30 + p, "private")


def test_truncate_keeps_state() -> None:
    env = Env(2, init_shared=True)
    env.convert(1, 1, True)
    env.map.fill(0, PS, 0x77)
    env.guest_rmw(1, 0, 0x88, "private")
    env.gmem.punch_hole(0, 2 * PS)
    env.check()
    # Shared stays shared (and re-reads zero); private stays private (the guest reads zero).
    test_shared(env, 0, 0, 0x11, 0x22)
    test_private(env, 1, 0, 0x33)


def test_two_views_and_forked_child() -> None:
    env = Env(2, init_shared=True)
    other = env.gmem.mmap()  # a second view of the same file
    env.map.fill(0, PS, 0x42)
    assert other.read(0, 4) == b"\x42" * 4
    child = env.kvm.process.fork()
    child_map = child.mapping_at(env.map.addr)
    assert child_map is not None and child_map.read(0, 4) == b"\x42" * 4
    env.convert(0, 1, True, PRESERVE)
    for view in (env.map, other, child_map):
        with pytest.raises(GuestAccessFault):
            view.read(0, 1)
        with pytest.raises(GuestAccessFault):
            view.write(0, b"\0")
    env.convert(0, 1, False, PRESERVE)
    assert child_map.read(0, 4) == other.read(0, 4) == b"\x42" * 4


def test_elevated_refcount_eagain_changes_nothing() -> None:
    env = Env(4, init_shared=True)
    for p in range(4):
        env.map.fill(p * PS, PS, 0x60 + p)
    before = [env.gmem.inode.attributes.get(p) for p in range(4)]
    with env.map.pin(2 * PS, PS):
        with pytest.raises(KvmError) as ei:
            env.gmem.set_memory_attributes2(0, 4 * PS, PRIVATE, PRESERVE)
        assert ei.value.errno == errno.EAGAIN and ei.value.error_offset == 2 * PS
        assert [env.gmem.inode.attributes.get(p) for p in range(4)] == before
        assert env.map.read(0, 4 * PS)[::PS] == bytes([0x60, 0x61, 0x62, 0x63])
        # Per page: the pinned one fails the same way, the others convert.
        for p in range(4):
            if p == 2:
                with pytest.raises(KvmError) as ei:
                    env.gmem.set_memory_attributes2(p * PS, PS, PRIVATE, PRESERVE)
                assert ei.value.errno == errno.EAGAIN and ei.value.error_offset == 2 * PS
            else:
                env.convert(p, 1, True, PRESERVE)
    # Unpinned: a bulk conversion over the mixed range succeeds and the data carries over.
    env.convert(0, 4, True, PRESERVE)
    for p in range(4):
        env.guest_rmw(p, 0x60 + p, 0x70 + p, "private")


def test_to_shared_needs_no_refcount_check() -> None:
    env = Env(1, init_shared=True)
    env.convert(0, 1, True)
    env.convert(0, 1, False)  # nothing pinned; and pins can't exist on private pages anyway
    with env.map.pin(0, PS):
        env.convert(0, 1, False, PRESERVE)  # already shared: a no-op, not EAGAIN


# --- content modes (RFC v5) --------------------------------------------------------------------

def test_zero_to_private_is_unsupported() -> None:
    env = Env(2, init_shared=True)
    with pytest.raises(KvmError) as ei:
        env.gmem.set_memory_attributes2(PS, PS, PRIVATE, ZERO)
    assert ei.value.errno == errno.EOPNOTSUPP and ei.value.error_offset == PS
    assert not env.gmem.inode.is_private(1)


@pytest.mark.parametrize("flags", [ZERO | PRESERVE, 1 << 2, 1 << 63])
def test_bad_flags_are_einval(flags: int) -> None:
    env = Env(1, init_shared=True)
    with pytest.raises(KvmError) as ei:
        env.gmem.set_memory_attributes2(0, PS, PRIVATE, flags)
    assert ei.value.errno == errno.EINVAL and ei.value.error_offset is None


@pytest.mark.parametrize("flavour", ["sw", "snp", "tdx"])
def test_unspecified_mode_scrambles(flavour: str) -> None:
    """No guarantee: the software test vehicle fills random bytes, encrypted flavours leave
    ciphertext behind."""
    env = Env(1, flavour=flavour, init_shared=True, finalize=True)
    env.convert(0, 1, True)
    # The guest writes a pattern privately...
    ops = [Accept(GPA, PS)] if flavour != "sw" else []
    assert isinstance(env.guest(*ops, Write(GPA, PS, 0xAB, "private")), ExitHalt)
    env.convert(0, 1, False, 0)  # ...and the page goes shared with no content guarantee.
    data = env.map.read(0, PS)
    assert data != bytes([0xAB]) * PS and data != bytes(PS)


def test_shared_memory_reset_after_hole_punch() -> None:
    env = Env(1, init_shared=True)
    env.map.fill(0, PS, 0x99)
    env.gmem.punch_hole(0, PS)
    assert env.map.read(0, PS) == bytes(PS)


# flavour, direction, mode -> supported?  (after launch finalize)
MATRIX = [
    ("sw", False, ZERO, True), ("sw", False, PRESERVE, True), ("sw", False, 0, True),
    ("sw", True, ZERO, False), ("sw", True, PRESERVE, True), ("sw", True, 0, True),
    ("snp", False, ZERO, True), ("snp", False, PRESERVE, False), ("snp", False, 0, True),
    ("snp", True, ZERO, False), ("snp", True, PRESERVE, False), ("snp", True, 0, True),
    ("tdx", False, ZERO, True), ("tdx", False, PRESERVE, False), ("tdx", False, 0, True),
    ("tdx", True, ZERO, False), ("tdx", True, PRESERVE, False), ("tdx", True, 0, True),
]


@pytest.mark.parametrize("flavour,to_private,mode,ok", MATRIX)
def test_content_mode_matrix(flavour: str, to_private: bool, mode: int, ok: bool) -> None:
    env = Env(2, flavour=flavour, init_shared=not to_private)
    target = PRIVATE if to_private else 0
    attrs_before = [env.gmem.inode.attributes.get(p) for p in range(2)]
    if ok:
        env.gmem.set_memory_attributes2(0, 2 * PS, target, mode)
        assert all(env.gmem.inode.attributes.get(p) == target for p in range(2))
    else:
        with pytest.raises(KvmError) as ei:
            env.gmem.set_memory_attributes2(0, 2 * PS, target, mode)
        assert ei.value.errno == errno.EOPNOTSUPP and ei.value.error_offset == 0
        assert [env.gmem.inode.attributes.get(p) for p in range(2)] == attrs_before
    env.check()


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_preserve_to_private_only_before_finalize(flavour: str) -> None:
    env = Env(2, flavour=flavour, init_shared=True, finalize=False)
    env.map.fill(0, 2 * PS, 0x5C)
    env.gmem.set_memory_attributes2(0, PS, PRIVATE, PRESERVE)  # launch-time: in-place encryption
    env.vm.launch_finalize()
    with pytest.raises(KvmError) as ei:
        env.gmem.set_memory_attributes2(PS, PS, PRIVATE, PRESERVE)
    assert ei.value.errno == errno.EOPNOTSUPP and ei.value.error_offset == PS
    # The page encrypted at launch reads back as the host wrote it, without re-acceptance.
    assert isinstance(env.guest(Verify(GPA, PS, 0x5C, "private")), ExitHalt)


@pytest.mark.parametrize("mode", [ZERO, PRESERVE, 0])
def test_mode_applies_to_whole_range_even_without_change(mode: int) -> None:
    """The mode covers every allocated page of the range, including pages already in the target
    state; unallocated pages stay unallocated."""
    env = Env(3, init_shared=True)
    env.map.fill(0, PS, 0x31)
    env.map.fill(2 * PS, PS, 0x33)
    env.gmem.set_memory_attributes2(0, 3 * PS, 0, mode)  # all shared already: no-op conversion
    p0, p2 = env.map.read(0, PS), env.map.read(2 * PS, PS)
    if mode == ZERO:
        assert p0 == p2 == bytes(PS)
    elif mode == PRESERVE:
        assert p0 == bytes([0x31]) * PS and p2 == bytes([0x33]) * PS
    else:
        assert p0 != bytes([0x31]) * PS  # the software vehicle scrambles on UNSPECIFIED
    assert not env.gmem.inode.cache.is_allocated(1)


# --- bad input: the series' errno, and nothing changes ------------------------------------------

BAD = [
    (1, PS, PRIVATE, "unaligned offset"),
    (0, PS + 1, PRIVATE, "unaligned size"),
    (0, 0, PRIVATE, "zero size"),
    (4 * PS, PS, PRIVATE, "offset at i_size"),
    (3 * PS, 2 * PS, PRIVATE, "range past i_size"),
    ((1 << 64) - PS, 2 * PS, PRIVATE, "wrapping"),
    (0, PS, 1 << 2, "unknown attribute bit"),
]


@pytest.mark.parametrize("revision", ["v5", "v8"])
@pytest.mark.parametrize("offset,size,attrs,why", BAD)
def test_malformed_requests(revision: str, offset: int, size: int, attrs: int, why: str) -> None:
    env = Env(4, init_shared=True, revision=revision)
    env.map.fill(0, 4 * PS, 0xEE)
    with pytest.raises(KvmError) as ei:
        env.gmem.set_memory_attributes2(offset, size, attrs, 0)
    assert ei.value.errno == errno.EINVAL, why
    assert env.gmem.inode.attributes.all_equal(0, 4, 0)
    assert env.map.read(0, 4 * PS) == bytes([0xEE]) * 4 * PS
    env.check()


@pytest.mark.parametrize("revision", ["v5", "v8"])
def test_reserved_fields_must_be_zero(revision: str) -> None:
    env = Env(1, init_shared=True, revision=revision)
    with pytest.raises(KvmError) as ei:
        env.gmem.set_memory_attributes2(0, PS, PRIVATE, 0, reserved=(0, 0, 1))
    assert ei.value.errno == errno.EINVAL


def test_v8_refuses_flags_and_non_private_vms() -> None:
    env = Env(1, init_shared=True, revision="v8")
    with pytest.raises(KvmError) as ei:
        env.gmem.set_memory_attributes2(0, PS, PRIVATE, PRESERVE)
    assert ei.value.errno == errno.EINVAL
    kvm = guestmem.open("model", attributes="gmem", inplace_revision="v8")
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    g = vm.create_guest_memfd(PS, MMAP | INIT_SHARED)
    with pytest.raises(KvmError) as ei:
        g.set_memory_attributes2(0, PS, 0, 0)
    assert ei.value.errno == errno.EINVAL
    # v5 (like v7) accepts a no-op on a DEFAULT VM: everything is shared already.
    kvm5 = guestmem.open("model", attributes="gmem", inplace_revision="v5")
    g5 = kvm5.create_vm(u.KVM_X86_DEFAULT_VM).create_guest_memfd(PS, MMAP | INIT_SHARED)
    g5.set_memory_attributes2(0, PS, 0, 0)


def test_mode_switch_enotty_both_ways() -> None:
    vm_mode = guestmem.open("model")  # per-VM attributes
    vm = vm_mode.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    with pytest.raises(KvmError) as ei:
        vm.create_guest_memfd(PS, MMAP).set_memory_attributes2(0, PS, PRIVATE)
    assert ei.value.errno == errno.ENOTTY
    assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0
    gmem_mode = guestmem.open("model", attributes="gmem")
    vm2 = gmem_mode.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    with pytest.raises(KvmError) as ei:
        vm2.set_memory_attributes(0, PS, PRIVATE)
    assert ei.value.errno == errno.ENOTTY
    assert vm2.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert vm2.check_extension(u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == PRIVATE
    assert vm2.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS) == ZERO | PRESERVE
    # INIT_SHARED becomes available to CoCo VMs with guest_memfd attributes.
    assert vm2.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED


def test_cap_numbers_are_configurable() -> None:
    kvm = guestmem.open("model", attributes="gmem", cap_guest_memfd_memory_attributes=251)
    assert kvm.check_extension(251) == PRIVATE
    assert kvm.check_extension(u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0


# --- guest-side view: faults and exits in gmem mode ------------------------------------------------

def test_guest_shared_access_to_private_page_exits() -> None:
    env = Env(1, flavour="snp", init_shared=False)
    ex = env.guest(Verify(GPA, PS, 0, "shared"))
    assert isinstance(ex, ExitMemoryFault) and not ex.private and ex.gpa == GPA


def test_private_page_must_be_validated_on_snp() -> None:
    env = Env(1, flavour="snp")
    ex = env.guest(Verify(GPA, PS, 0, "private"))
    assert isinstance(ex, ExitGuestAssert) and "#VC" in ex.message


def test_tdx_shared_bit_selects_shared_access() -> None:
    env = Env(1, flavour="tdx", init_shared=True)
    env.map.fill(0, PS, 0x3C)
    assert isinstance(env.guest(Verify(GPA | (1 << 47), PS, 0x3C)), ExitHalt)
    ex = env.guest(Verify(GPA, PS, 0x3C))  # shared bit clear: a private access to a shared page
    assert isinstance(ex, ExitMemoryFault) and ex.private and ex.gpa == GPA


def test_deleted_slot_in_gmem_mode_is_mmio() -> None:
    """With guest_memfd attributes a gfn with no slot is shared, so the access is MMIO."""
    env = Env(1)
    env.vm.set_user_memory_region2(1, 0, GPA, 0, 0)
    ex = env.guest(Verify(GPA, 8, 0))
    assert ex.name == "mmio" and ex.phys_addr == GPA and ex.len == 8 and not ex.is_write


# --- hugepages on the private side -------------------------------------------------------------------

def test_hugepage_folio_splits_on_partial_conversion_and_merges_back() -> None:
    env = Env(1024, init_shared=True, folio_order=9)
    env.map.fill(0, 1024 * PS, 0x2F)
    cache = env.gmem.inode.cache
    assert cache.folio(0)[2] == 9 and cache.folio(600)[2] == 9
    env.convert(0, 512, True, PRESERVE)
    assert env.vcpu.pre_fault_memory(GPA, 2 << 20) == 0
    assert env.vm.mmu.count()["2M"] == 1
    env.convert(5, 1, False, PRESERVE)  # cuts the first 2 MiB folio
    assert cache.folio(0)[2] == 0 and cache.folio(600)[2] == 9
    assert env.vcpu.pre_fault_memory(GPA, 2 << 20) == 0
    assert env.vm.mmu.count()["2M"] == 0
    env.convert(5, 1, True, PRESERVE)  # whole and uniform again: merged
    assert cache.folio(0)[2] == 9
    env.vm.mmu.zap_all()
    assert env.vcpu.pre_fault_memory(GPA, 2 << 20) == 0
    assert env.vm.mmu.count()["2M"] == 1
    env.guest_rmw(7, 0x2F, 0x30, "private")


def test_hugepage_folio_split_by_partial_punch() -> None:
    env = Env(512, init_shared=True, folio_order=9)
    env.map.fill(0, 512 * PS, 1)
    env.gmem.punch_hole(PS, PS)
    cache = env.gmem.inode.cache
    assert cache.folio(0)[2] == 0 and not cache.is_allocated(1) and cache.nr_pages == 511
    env.check()


# --- launch (SNP_LAUNCH_UPDATE / TDX_INIT_MEM_REGION) ---------------------------------------------

@pytest.mark.parametrize("flavour", ["snp", "tdx"])
@pytest.mark.parametrize("in_place", [False, True])
def test_launch_update_populates_measured_private_memory(flavour: str, in_place: bool) -> None:
    env = Env(4, flavour=flavour, init_shared=in_place, finalize=False)
    if in_place:
        env.map.fill(0, 2 * PS, 0x6D)  # the image, written while the pages are still shared
        env.convert(0, 2, True)  # UNSPECIFIED: KVM leaves the bytes; the launch encrypts them
        assert env.vm.launch_update(GPA, 2 * PS) == 2 * PS
    else:
        env.convert(0, 2, True)
        assert env.vm.launch_update(GPA, 2 * PS, bytes([0x6D]) * 2 * PS) == 2 * PS
    env.vm.launch_finalize()
    # Populated pages are private, encrypted and already validated/accepted.
    assert isinstance(env.guest(Verify(GPA, 2 * PS, 0x6D, "private")), ExitHalt)
    env.host_sigbus(0)


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_launch_update_rules(flavour: str) -> None:
    env = Env(2, flavour=flavour, init_shared=True, finalize=False)
    with pytest.raises(KvmError) as ei:  # a shared page cannot be populated
        env.vm.launch_update(GPA, PS, bytes(PS))
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as ei:  # the source must cover the range exactly
        env.convert(0, 1, True)
        env.vm.launch_update(GPA, PS, bytes(10))
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as ei:  # no guest_memfd behind the gpa
        env.vm.launch_update(GPA + (1 << 30), PS, bytes(PS))
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(KvmError):  # before finalize, pre-faulting is refused
        env.vcpu.pre_fault_memory(GPA, PS)
    env.vm.launch_finalize()
    with pytest.raises(KvmError) as ei:  # and after finalize, launch updates are
        env.vm.launch_update(GPA, PS, bytes(PS))
    assert ei.value.errno == errno.EINVAL


def test_guest_fault_before_finalize_bugs_the_vm() -> None:
    env = Env(1, flavour="snp", finalize=False)
    env.vcpu.load(Program([Verify(GPA, PS, 0, "private")]))
    with pytest.raises(KvmError) as ei:
        env.vcpu.run()
    assert ei.value.errno == errno.EIO
    with pytest.raises(KvmError) as ei:  # KVM_BUG_ON: the VM stays dead
        env.vcpu.run()
    assert ei.value.errno == errno.EIO


def test_software_vm_has_no_launch_flow() -> None:
    env = Env(1)
    with pytest.raises(KvmError) as ei:
        env.vm.launch_finalize()
    assert ei.value.errno == errno.ENOTTY


def test_tdx_partial_zap_demotes_private_hugepage_keeping_acceptance() -> None:
    """Converting one 4K page out of a private 2 MiB mapping on TDX splits the S-EPT entry; the
    other 511 pages stay in the TD, accepted, with their contents."""
    env = Env(512, flavour="tdx", init_shared=False, folio_order=9)
    assert isinstance(env.guest(Accept(GPA, 512 * PS), Write(GPA, 512 * PS, 0x3A, "private")), ExitHalt)
    assert env.vm.mmu.count()["2M"] == 1
    env.convert(7, 1, False)
    assert env.vm.mmu.stats["demotions"] >= 1
    counts = env.vm.mmu.count()
    assert counts["2M"] == 0 and counts["private_pages"] == 511
    # No re-accept needed for the rest, and their data is intact.
    assert isinstance(env.guest(Verify(GPA, 7 * PS, 0x3A, "private"),
                                Verify(GPA + 8 * PS, 504 * PS, 0x3A, "private")), ExitHalt)


@pytest.mark.parametrize("attributes", ["vm", "gmem"])
def test_accept_is_a_no_op_without_hardware_acceptance(attributes: str) -> None:
    """A software-protected guest's Accept must not wait for a private mapping it never gets."""
    kvm = guestmem.open("model", attributes=attributes)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    flags = MMAP | (INIT_SHARED if attributes == "gmem" else 0)
    gmem = vm.create_guest_memfd(2 * PS, flags)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 2 * PS, 0, gmem, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Accept(GPA, 2 * PS), Verify(GPA, 2 * PS, 0)]))
    assert isinstance(vcpu.run(), ExitHalt)


# --- invariant 7 at run time (check_content_modes) ----------------------------------------------


@pytest.mark.parametrize("broken,mode,flavour,to_private", [
    ("zero", ZERO, "sw", False), ("zero", ZERO, "snp", False),
    ("preserve", PRESERVE, "sw", True), ("preserve", PRESERVE, "sw", False),
    ("preserve", PRESERVE, "tdx", True),
])
def test_runtime_content_check_catches_a_broken_mode(broken: str, mode: int, flavour: str,
                                                     to_private: bool, monkeypatch) -> None:
    """A flavour that forgets its content mode is caught by invariant 7 in the conversion itself."""
    from guestmem.model.kvm.invariants import InvariantError

    env = Env(flavour=flavour, init_shared=to_private, finalize=False)
    if to_private:
        env.map.fill(0, env.size, 0x5A)  # shared contents the conversion must keep
    elif flavour == "sw":
        env.guest(Write(GPA, env.size, 0x5A, "private"))
    else:
        env.vm.launch_update(GPA, env.size, bytes([0x5A]) * env.size)
    arch = env.vm.arch
    if broken == "zero":
        monkeypatch.setattr(arch, "apply_content_mode", lambda *a: None)
    else:
        def scramble(inode, start, end, m, tp):
            for s, e, pfn, _ in inode.cache.lookup_range(start, end):
                if pfn is not None:
                    env.kvm.pool.view(pfn, e - s).reshape(-1)[:1] ^= 0xFF
        monkeypatch.setattr(arch, "apply_content_mode", scramble)
    with pytest.raises(InvariantError, match="invariant 7"):
        env.gmem.set_memory_attributes2(0, env.size, PRIVATE if to_private else 0, mode)
