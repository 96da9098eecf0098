"""The SEV-SNP direct map with seed 000's reply's rule: a 2 MiB mapping is restored only when KVM is
told that a whole 2 MiB folio went away (order known), never on a range without the order."""

from __future__ import annotations

from typing import Any

import guestmem
import guestmem.uapi as u
from guestmem.model.designs.directmap import DirectMapRmp, follow_gmem_folios, released_folio

REGION = 512


def test_assign_splits_a_region_once() -> None:
    rmp = DirectMapRmp()
    rmp.assign(0, 1)
    rmp.assign(5, 10)
    rmp.assign(REGION - 1, 2)  # crosses into the next region
    assert rmp.directmap_splits == 2 and rmp.split_regions() == 2


def test_reclaim_without_order_keeps_the_region_split() -> None:
    rmp = DirectMapRmp()
    rmp.assign(0, REGION)
    rmp.reclaim(0, REGION)
    assert rmp.owned(0, REGION) is None
    assert rmp.directmap_restores == 0 and rmp.split_regions() == 1
    rmp.assign(0, 1)  # still split: no second split
    assert rmp.directmap_splits == 1


def test_whole_huge_folio_with_its_order_restores() -> None:
    rmp = DirectMapRmp()
    rmp.assign(0, 2 * REGION)
    with rmp.folio(9):
        rmp.reclaim(0, REGION)
    assert rmp.directmap_restores == 1 and rmp.split_regions() == 1
    with rmp.folio(0):  # 4 KiB folios: the order says the 2 MiB page was split
        rmp.reclaim(REGION, REGION)
    assert rmp.directmap_restores == 1
    rmp.assign(0, 1)  # a restored region splits again when a frame goes back to a guest
    assert rmp.directmap_splits == 3


def test_restore_needs_the_whole_region_free() -> None:
    rmp = DirectMapRmp()
    rmp.assign(0, REGION)
    with rmp.folio(9):
        rmp.reclaim(0, REGION // 2)  # not the whole aligned block
    assert rmp.directmap_restores == 0


def test_released_folio_is_a_no_op_without_the_ledger() -> None:
    kvm: Any = guestmem.open("model")
    with released_folio(kvm, 9):
        pass
    kvm.rmp = DirectMapRmp()
    with released_folio(kvm, 9):
        assert kvm.rmp._order == 9
    assert kvm.rmp._order is None


def test_guest_memfd_releases_carry_the_folio_order() -> None:
    kvm: Any = guestmem.open("model", gmem_folio_order=9)
    kvm.rmp = DirectMapRmp()
    vm = kvm.create_vm(u.KVM_X86_SNP_VM)
    gmem = vm.create_guest_memfd(4 << 20, 0)
    follow_gmem_folios(gmem.inode)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, 1 << 32, 4 << 20, 0, gmem, 0)
    vm.set_memory_attributes(1 << 32, 4 << 20, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.launch_update(1 << 32, 4 << 20, b"\x01" * (4 << 20)) == 4 << 20
    assert kvm.rmp.directmap_splits == 2
    gmem.punch_hole(0, 2 << 20)
    assert kvm.rmp.directmap_restores == 1
    gmem.punch_hole((2 << 20) + 4096, 4096)  # a piece: the folio is split, no restore
    assert kvm.rmp.directmap_restores == 1
