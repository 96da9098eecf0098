"""The interleaving explorer: the model's threads under a deterministic scheduler.

``guestmem explore`` runs small named races (:mod:`guestmem.explore.races`) under a controller
(:mod:`guestmem.explore.scheduler`) that lets one thread run at a time and switches only at the
model's scheduling points, searches schedules with DFS under a preemption bound or with PCT
(:mod:`guestmem.explore.strategies`), checks the DESIGN invariants and per-race postconditions
after every step (:mod:`guestmem.explore.oracle`), and can plant known bugs
(:mod:`guestmem.explore.mutants`) to show that it finds them.  Floor 5: the model never imports it.
"""
