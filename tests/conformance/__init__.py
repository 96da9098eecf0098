"""The conformance suite: upstream's guest_memfd selftests, written once against guestmem.api and
run on both backends through the ``backend`` fixture (tests/conftest.py).

| upstream selftest (tools/testing/selftests/kvm/)     | here                              |
| ---------------------------------------------------- | --------------------------------- |
| guest_memfd_test.c                                   | test_guest_memfd.py               |
| set_memory_region_test.c (guest_memfd parts)         | test_set_memory_region.py         |
| x86/private_mem_kvm_exits_test.c                     | test_private_mem_kvm_exits.py     |
| x86/private_mem_conversions_test.c                   | test_private_mem_conversions.py   |
| pre_fault_memory_test.c                              | test_pre_fault_memory.py          |
| (kvm_main.c: KVM_SET_MEMORY_ATTRIBUTES)              | test_memory_attributes.py         |
| (x86.c: KVM_HC_MAP_GPA_RANGE / KVM_CAP_EXIT_HYPERCALL) | test_map_gpa_range.py           |
| guest_memfd_test.c:test_guest_private_mem (in-place series) | test_guest_memfd_private.py |

UPSTREAM.md lists every upstream test case, the test that ports it, whether the assertions are
the same, and where it runs (including the model-only ports of the in-place series in
tests/model/test_gmem_conversions_selftest.py).  spinning.py is the harness for a vCPU that
keeps reading inside KVM_RUN while the host changes memslots.

Rules: exact errnos (the real kernel's); a refused call changes nothing; ``check(vm)`` (the
model's invariants) after every step; features a host lacks skip with the missing VM type or
capability as the reason, found by asking the backend, never by naming the host.
"""
