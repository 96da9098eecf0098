"""Errors in scenario files, located: which file, which line, which field.

A scenario is input written by a person, so a mistake in it must come back as one line that says
where it is and what is wrong -- ``boot.toml:23: phase[2].step[1].range: unknown range 'bufer'``
-- never as a traceback.
"""

from __future__ import annotations


class ScenarioError(ValueError):
    """Bad scenario input, with its location (any part may be unknown)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        return f"{where}{self.field + ': ' if self.field else ''}{self.message}"
