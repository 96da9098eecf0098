"""The hostile stateful fuzzer (issue 9): no input, however hostile, breaks the model's promises.

Floor 5: it drives the public interface (and reads the model's objects to judge it).
:mod:`~guestmem.fuzz.machine` runs and judges steps, :mod:`~guestmem.fuzz.oracle` says what a
hostile argument is owed, :mod:`~guestmem.fuzz.snapshot` is the observable state,
:mod:`~guestmem.fuzz.runner` runs for a time budget and shrinks, :mod:`~guestmem.fuzz.reproducer`
prints scripts, :mod:`~guestmem.fuzz.differential` runs the kernel against the model, and
:mod:`~guestmem.fuzz.threads` is the concurrent driver.  ``guestmem fuzz`` is in
:mod:`~guestmem.fuzz.cli`.
"""
