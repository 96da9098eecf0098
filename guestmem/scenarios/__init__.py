"""Shipped scenarios (``*.toml`` next to this file) and the machinery to load and run them.

``load(name_or_path)`` takes a shipped scenario's name (``boot``) or a path to a TOML file and
parses it; :func:`guestmem.scenarios.run.run_scenario` runs it on a backend.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from guestmem.scenarios.errors import ScenarioError
from guestmem.scenarios.parse import load_file, load_text
from guestmem.scenarios.spec import Scenario

__all__ = ["ScenarioError", "load", "load_text", "shipped"]


def shipped() -> list[str]:
    """Names of the scenarios shipped with guestmem, sorted."""
    root = resources.files(__name__)
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def load(name_or_path: str) -> Scenario:
    """Load a shipped scenario by name, or a scenario file by path."""
    if not name_or_path.strip():
        raise ScenarioError(f"name a scenario ({', '.join(shipped())}) or a .toml file")
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in name_or_path:
        if not p.exists():
            raise ScenarioError("no such scenario file", file=name_or_path)
        return load_file(p)
    res = resources.files(__name__).joinpath(f"{name_or_path}.toml")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name_or_path) or not res.is_file():
        raise ScenarioError(f"unknown scenario {name_or_path!r}; shipped scenarios: {', '.join(shipped())} "
                            "(or give a path to a .toml file)")
    return load_text(res.read_text(encoding="utf-8"), f"{name_or_path}.toml")

