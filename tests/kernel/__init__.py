"""Tests of the kernel backend (guestmem.linux) against the real /dev/kvm; they skip without it."""
