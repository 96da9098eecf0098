"""PCT schedules fanned out over Ray (``guestmem explore --strategy pct --workers N``).

Ray is optional (``pip install '.[explore]'``) and imported only here, only when asked for.  Each
PCT schedule is a pure function of (race, mutant, seed, index, depth, length), so workers run
batches of indices and the driver scans the results in index order and stops at the first
failing index: for the same seed and schedule budget the answer is the same whatever the number
of workers (a time budget, by nature, is not).
"""

from __future__ import annotations

from collections.abc import Callable

from guestmem.explore.races import Race
from guestmem.explore.strategies import Outcome


class RayMissing(RuntimeError):
    """Ray is not installed (or the cluster cannot be reached)."""


def _run_batch(race_id: str, mutant: str | None, seed: int, depth: int, length: int,
               indices: list[int]) -> list[Outcome]:
    from guestmem.explore import races, strategies

    race = races.BY_ID[race_id]
    return [strategies.pct_schedule(race, mutant, seed, i, depth, length) for i in indices]


class RayMapper:
    """A pool of ``workers`` Ray tasks in flight; :meth:`bind` gives the map function PCT uses."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RayMissing("--workers needs Ray, which is not installed: pip install 'guestmem[explore]' "
                             "(or run without --workers: in-process, no Ray)") from None
        self.ray = ray
        self.workers = workers
        try:
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, ignore_reinit_error=True, log_to_driver=False,
                         include_dashboard=False)
        except Exception as e:  # connection refused, bad address, ...
            raise RayMissing(f"cannot start or join Ray: {e}") from None
        self.remote = ray.remote(_run_batch)

    def bind(self, race: Race, mutant: str | None, seed: int, depth: int, length: int
             ) -> Callable[[list[int]], list[Outcome]]:
        def run(indices: list[int]) -> list[Outcome]:
            chunks = [indices[i::self.workers] for i in range(self.workers)]
            refs = [self.remote.remote(race.id, mutant, seed, depth, length, c) for c in chunks if c]
            by_index: dict[int, Outcome] = {}
            for chunk, outs in zip([c for c in chunks if c], self.ray.get(refs), strict=True):
                by_index.update(zip(chunk, outs, strict=True))
            return [by_index[i] for i in indices]
        return run

    def close(self) -> None:
        self.ray.shutdown()


def local_mapper(race: Race, mutant: str | None, seed: int, depth: int, length: int,
                 workers: int) -> Callable[[list[int]], list[Outcome]]:
    """The same batching as :class:`RayMapper`, run in-process (for tests of the fan-out logic)."""
    def run(indices: list[int]) -> list[Outcome]:
        chunks = [indices[i::workers] for i in range(workers)]
        by_index: dict[int, Outcome] = {}
        for chunk in chunks:
            by_index.update(zip(chunk, _run_batch(race.id, mutant, seed, depth, length, chunk), strict=True))
        return [by_index[i] for i in indices]
    return run

