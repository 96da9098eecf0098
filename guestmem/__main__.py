"""``python -m guestmem``: the same command as ``guestmem``."""

import sys

from guestmem.cli import main

sys.exit(main())
