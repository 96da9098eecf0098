"""Turn a failing run into a minimal standalone Python script.

The steps a session ran are already the API calls, one line each; the script is those lines after
the imports and the ``guestmem.open`` with the run's model switches.  Steps that were refused in
the (shrunk) replay are wrapped in ``try/except`` so the script runs through to the failing call,
which comes last, bare, with what was expected and what happened in a comment; an invariant
finding ends with the check that fails.
"""

from __future__ import annotations

from typing import Any

from guestmem.fuzz.machine import IMPORTS, Finding, Step

_REFUSALS = "(guestmem.KvmError, TypeError, OverflowError)"


def render(opts: dict[str, Any], steps: list[Step], outcomes: list[str | None], finding: Finding,
           *, header: str = "", backend: str = "model") -> str:
    """The reproducer for ``finding``, which happened at the last of ``steps``."""
    lines = [f"# guestmem fuzz finding [{finding.category}]: {finding.message}"]
    if header:
        lines.append(f"# {header}")
    lines.append(IMPORTS)
    args = "".join(f", {k}={v!r}" for k, v in sorted(opts.items()))
    lines.append(f"kvm = guestmem.open({backend!r}{args})")
    for i, (st, out) in enumerate(zip(steps, outcomes, strict=False)):
        last = i == len(steps) - 1
        if last:
            break
        _wrap(lines, st.code, out)
    final = steps[-1].code
    if finding.category == "invariant":
        _wrap(lines, final, outcomes[-1] if outcomes else None)
        lines.append("for vm in list(kvm.vms):")
        lines.append(f"    vm.check_invariants()  # {finding.message}")
    else:
        lines.append(f"{final}  # {finding.category}: {finding.message}")
    return "\n".join(lines) + "\n"


def _wrap(lines: list[str], code: str, outcome: str | None) -> None:
    """A step as it ran: bare if accepted, in try/except if refused (so the script goes on)."""
    if outcome is None:
        lines.append(code)
        return
    lines.append("try:")
    lines.extend("    " + part.strip() for part in code.split("\n"))
    lines.append(f"except {_REFUSALS}:")
    lines.append(f"    pass  # refused: {outcome}")


def render_differential(opts: dict[str, Any], steps: list[Step], outcomes: list[str | None],
                        finding: Finding, *, header: str = "") -> str:
    """A script that runs the same lines on the model (configured like the host) and on the
    kernel, printing what the last one did on each: the two lines printed differ."""
    lines = [f"# guestmem fuzz finding [{finding.category}]: {finding.message}"]
    if header:
        lines.append(f"# {header}")
    lines.append(IMPORTS)
    lines.append("")
    lines.append("def run(kvm):")
    body: list[str] = []
    for st, out in zip(steps[:-1], outcomes[:-1], strict=False):
        _wrap(body, st.code, out)
    body.append("try:")
    body.extend("    " + part.strip() for part in steps[-1].code.split("\n"))
    body.append("    print(kvm.backend, 'ok', repr(locals().get('_'))[:200])")
    body.append("except Exception as e:  # the outcome is what is compared")
    body.append("    print(kvm.backend, type(e).__name__, e)")
    lines.extend("    " + b for b in body)
    args = "".join(f", {k}={v!r}" for k, v in sorted(opts.items()))
    lines.append("")
    lines.append("")
    lines.append(f"run(guestmem.open('model'{args}))")
    lines.append("run(guestmem.open('kernel'))")
    return "\n".join(lines) + "\n"
