"""The recorded host-behaviour corpus (host_behaviours.json), replayed.

The corpus was recorded from a real kernel by ``python3 -m guestmem.conformance_record record``.
Replayed on the model configured like that host (its stored profile), every behaviour must agree,
except the documented departures, each of which names the upstream line that shows upstream
differs from the host.  Where /dev/kvm is present and runs the release the corpus was recorded on,
the kernel is replayed too and must still give what was recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import guestmem
from guestmem.conformance_record import (
    INEXPRESSIBLE,
    catalogue,
    departure_for,
    outcome,
    replay,
    twin_options_from_corpus,
)

CORPUS_PATH = Path(__file__).with_name("host_behaviours.json")


@pytest.fixture(scope="module")
def corpus() -> dict[str, Any]:
    with CORPUS_PATH.open() as f:
        data: dict[str, Any] = json.load(f)
    return data


@pytest.fixture(scope="module")
def twin_result(corpus: dict[str, Any]) -> dict[str, Any]:
    return replay(corpus)


def test_corpus_is_broad_and_current(corpus: dict[str, Any]) -> None:
    """At least 300 behaviours, every one of them in today's catalogue and vice versa (a catalogue
    change needs a new recording), spread over every area."""
    names = [b.name for b in catalogue()]
    assert len(corpus["behaviours"]) >= 300
    assert set(corpus["behaviours"]) == set(names)
    areas = {entry["area"] for entry in corpus["behaviours"].values()}
    assert {"gmem-create", "fallocate", "mmap", "memslot", "file", "pre-fault", "guest", "caps",
            "ioctl", "numa", "fork", "dirty-log"} <= areas
    assert corpus["profile"]["release"] and corpus["uname"]


def test_twin_agrees_with_every_recorded_behaviour(twin_result: dict[str, Any]) -> None:
    assert twin_result["disagree"] == [], "\n".join(
        f"{d['name']}: host {d['host']!r} twin {d['twin']!r}" for d in twin_result["disagree"])
    assert not twin_result["unrecorded"] and not twin_result["stale"]


def test_departures_are_documented_with_upstream_lines(twin_result: dict[str, Any]) -> None:
    for entry in twin_result["departure"]:
        dep = departure_for(entry["name"])
        assert dep is not None and entry["reason"] == dep.reason
        assert "arch/x86/kvm/" in entry["upstream"] or "virt/kvm/" in entry["upstream"]
        assert entry["host"] != entry["twin"]


def test_the_twin_switches_are_load_bearing(corpus: dict[str, Any]) -> None:
    """The model with its defaults (7.2, TDP MMU, memory attributes built in) does *not* agree
    with a 6.18 shadow-paging host: the switches are what makes the twin."""
    if corpus["profile"]["kernel"] != "6.18" or corpus["profile"]["tdp"]:
        pytest.skip("the corpus was not recorded on a 6.18 shadow-paging host")
    default = replay(corpus, lambda: guestmem.open("model", vm_types=(0,)))
    wrong = {d["name"] for d in default["disagree"]}
    assert "bind/flags=0x0/offset=0x7ffffffffffff000/size=0x4000" in wrong  # 7.2 refuses the wrap
    assert "memslot/file-overlap" in wrong  # EEXIST on 7.2
    assert "pre_fault/none/gpa=0x100000000/size=0x1000/flags=0" in wrong  # ENOSPC vs ENOENT
    assert "caps/system/KVM_CAP_MEMORY_ATTRIBUTES" in wrong


def test_inexpressible_behaviours_are_named_with_a_reason() -> None:
    """Issue #11: at most 5 groups of behaviours the interface cannot express, each with a reason."""
    assert 0 < len(INEXPRESSIBLE) <= 5
    assert all(reason.strip() for reason in INEXPRESSIBLE.values())


def test_every_new_call_has_recorded_behaviours(corpus: dict[str, Any]) -> None:
    """Each call issue #11 added to the interface is in the corpus, with outcomes that are not all
    one refusal (the catalogue reaches past the argument checks)."""
    recorded = corpus["behaviours"]
    for prefix in ("file2/gmem/", "file2/memfd/", "file2/sendfile/", "ioctl/", "mmap2/", "mprotect/",
                   "madvise/", "numa/", "fork/", "dirty_log/"):
        outcomes = {json.dumps(v["outcome"]) for k, v in recorded.items() if k.startswith(prefix)}
        assert len(outcomes) > 2, prefix


def test_twin_options_come_from_the_recorded_profile(corpus: dict[str, Any]) -> None:
    opts = twin_options_from_corpus(corpus)
    kvm = guestmem.open("model", **opts)
    assert kvm.options.kernel == corpus["profile"]["kernel"]
    assert kvm.options.tdp_mmu == corpus["profile"]["tdp"]


def _kernel_like_corpus(corpus: dict[str, Any]) -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return f"cannot open /dev/kvm: {err.strerror}"
    if os.uname().release != corpus["profile"]["release"]:
        return f"host runs {os.uname().release}, the corpus was recorded on {corpus['profile']['release']}"
    return None


@pytest.mark.kernel
def test_kernel_still_gives_what_was_recorded(corpus: dict[str, Any]) -> None:
    """The live kernel replayed: a recording that no longer holds on its own host is stale."""
    reason = _kernel_like_corpus(corpus)
    if reason:
        pytest.skip(reason)
    live = replay(corpus, lambda: guestmem.open("kernel"))
    changed = live["disagree"] + live["departure"]
    assert not changed, "\n".join(f"{d['name']}: recorded {d['host']!r}, now {d['twin']!r}" for d in changed)


def test_outcome_names_what_was_raised() -> None:
    from guestmem.errors import GuestAccessFault, KvmError

    def raise_(exc: BaseException) -> None:
        raise exc

    assert outcome(lambda: None) == "ok"
    assert outcome(lambda: 3) == 3
    assert outcome(lambda: raise_(KvmError(95, "x"))) == "EOPNOTSUPP"
    assert outcome(lambda: raise_(GuestAccessFault("read", 0))) == "SIGBUS"
    assert outcome(lambda: raise_(TypeError("t"))) == "TypeError"
    with pytest.raises(ValueError):
        outcome(lambda: raise_(ValueError("not an interface outcome")))
