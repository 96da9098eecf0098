"""Guest programs: a small op language run by the model's vCPU and compiled to x86 for the kernel's."""

from guestmem.guest.image import GuestImage
from guestmem.guest.ops import (
    Accept,
    Access,
    Halt,
    MapGpaRange,
    Op,
    Program,
    Sync,
    Touch,
    Verify,
    Write,
)

__all__ = ["Accept", "Access", "GuestImage", "Halt", "MapGpaRange", "Op", "Program", "Sync", "Touch",
           "Verify", "Write"]
