"""The fuzzer's per-step watchdog: a step that never returns is reported as a hang (a fatal
finding that ends its sequence) instead of hanging the whole run."""

from __future__ import annotations

import threading
import time

from guestmem.fuzz.machine import Session, Step, StepTimeout, step_watchdog
from guestmem.fuzz.runner import FATAL


def test_spinning_step_is_a_hang_finding() -> None:
    s = Session({}, step_timeout=0.2)
    t0 = time.monotonic()
    f = s.run(Step("while True:\n    pass", "test.spin", ()))
    assert time.monotonic() - t0 < 5
    assert f is not None and f.category == "hang"
    assert f.key[:2] == ("hang", "test.spin")
    assert "hang" in FATAL


def test_watchdog_is_disarmed_after_a_quick_step() -> None:
    s = Session({}, step_timeout=0.2)
    assert s.run(Step("x = 1", "test.quick", ())) is None
    time.sleep(0.4)  # a leftover timer would fire here and raise StepTimeout into the test
    assert s.ns["x"] == 1


def test_except_exception_in_the_step_cannot_swallow_the_timeout() -> None:
    s = Session({}, step_timeout=0.2)
    code = "while True:\n    try:\n        pass\n    except Exception:\n        pass"
    f = s.run(Step(code, "test.swallow", ()))
    assert f is not None and f.category == "hang"


def test_watchdog_does_nothing_off_the_main_thread() -> None:
    result: list[str] = []

    def body() -> None:
        with step_watchdog(0.05):
            time.sleep(0.2)
        result.append("done")

    t = threading.Thread(target=body)
    t.start()
    t.join(5)
    assert result == ["done"]


def test_watchdog_raises_in_the_main_thread() -> None:
    try:
        with step_watchdog(0.05):
            time.sleep(2)
    except StepTimeout:
        return
    raise AssertionError("the watchdog did not fire")
