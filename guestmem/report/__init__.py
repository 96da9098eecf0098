"""Reports of scenario runs: summary tables, guest physical maps (terminal, PNG, SVG), Chrome /
Perfetto traces, JSON -- and the ``guestmem run`` / ``guestmem map`` commands (floor 5)."""
