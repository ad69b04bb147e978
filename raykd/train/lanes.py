"""The work queue of a packed run: its workers (lanes) each take the next unit when they are free,
so a lane that drew short units takes more of them and the lanes of a pack end together.

A queue may stay *open*: the driver adds units as they become ready (a student once its teacher,
trained in another lane, is done), so one run's start-up serves a whole job, and idle lanes wait
for work until the driver closes the queue. The driver also reads which units finished, so their
results rows are written, and their dependants queued, while the run goes on.

A lane whose neighbours on the same node have nothing to do (waiting for a unit that depends on
it, or done) may train with their CPUs too: `threads` tells it how many torch threads to use,
asked at each epoch's start. That shortens a pack's tail, where one long unit is left, but the
numbers then depend on timing (a sum over more threads is added up in another order), so it is
`ray.lend_idle_cpus` and off for queues made outside a job.

The queue is a small actor. It survives a restart of the worker group: when a rank joins a second
time, a new attempt has begun, and every unit not finished goes back on the queue (each resumes
from its own last epoch). It also says which unit each rank was training, so a pack that fails
for good blames the right unit.
"""
from __future__ import annotations

import time

import ray

WAIT = "wait"    # take(): nothing to do yet, the queue is still open


@ray.remote(num_cpus=0)
class UnitQueue:
    def __init__(self, lend_idle_cpus: bool = False):
        self.lend_idle_cpus = lend_idle_cpus
        self.node_of: dict[int, str] = {}  # rank -> the node it runs on
        self.idle: set[int] = set()       # ranks with nothing to train at their last take()
        self.units: dict = {}             # key -> Unit, in the order they were added
        self.rank_of: dict[str, tuple[int, int]] = {}   # key -> (-priority, arrival): take order
        self.pending: list[str] = []
        self.taken: dict[int, str] = {}   # rank -> the unit it is training
        self.finished: list[str] = []     # in the order they finished
        self.joined: set[int] = set()
        self.closed = False
        self.spans: dict[str, tuple[float, float]] = {}   # key -> (taken, done) wall-clock times

    def add(self, units: list, priority: dict[str, int] | None = None) -> bool:
        """Queue more units; False once the queue is closed (then nothing is added). Units with
        a higher `priority` (e.g. more units waiting on them) are taken first; equal ones in the
        order they came."""
        if self.closed:
            return False
        for unit in units:
            self.units[unit.key] = unit
            self.rank_of[unit.key] = (-(priority or {}).get(unit.key, 0), len(self.rank_of))
            self.pending.append(unit.key)
        self.pending.sort(key=self.rank_of.__getitem__)
        return True

    def close(self) -> None:
        """No more units: lanes leave once the queue is empty."""
        self.closed = True

    def join(self, rank: int, node: str = "") -> None:
        if rank in self.joined:           # a new attempt of the worker group
            self.joined.clear()
            self.taken.clear()
            self.idle.clear()
            done = set(self.finished)
            self.pending = sorted((k for k in self.units if k not in done),
                                  key=self.rank_of.__getitem__)
        self.joined.add(rank)
        self.node_of[rank] = node

    def take(self, rank: int):
        """The next unit for this lane; WAIT while open and empty; None when closed and empty."""
        if not self.pending:
            self.idle.add(rank)
            return None if self.closed else WAIT
        self.idle.discard(rank)
        key = self.pending.pop(0)
        self.taken[rank] = key
        self.spans[key] = (time.time(), float("nan"))
        return self.units[key]

    def threads(self, rank: int, own: int) -> int:
        """Torch threads for this lane's next epoch: its own CPUs, plus an equal share of those of
        the idle lanes on its node when lending is on."""
        if not self.lend_idle_cpus:
            return own
        node = self.node_of.get(rank)
        mates = [r for r in self.joined if self.node_of.get(r) == node]
        idle = sum(r in self.idle for r in mates if r != rank)
        return own + own * idle // max(1, len(mates) - idle)

    def done(self, rank: int, key: str) -> None:
        self.finished.append(key)
        self.spans[key] = (self.spans.get(key, (time.time(),))[0], time.time())
        if self.taken.get(rank) == key:
            del self.taken[rank]

    def finished_since(self, n: int) -> list[str]:
        return self.finished[n:]

    def lane_seconds(self) -> dict[str, float]:
        """How long a lane spent on each finished unit (set-up, training, evaluation, export)."""
        return {k: done - taken for k, (taken, done) in self.spans.items() if done == done}

    def running(self) -> dict[int, str]:
        return dict(self.taken)

    def all_units(self) -> list:
        return list(self.units.values())


def work_lane(queue, rank: int, train, poll_s: float = 0.2) -> None:
    """A lane's loop in a Ray Train worker: take, train, report done; wait while the queue is
    open and empty; return once it is closed and empty. `train(unit, threads)`: `threads(own)`
    says how many torch threads a lane with `own` CPUs uses now."""
    ray.get(queue.join.remote(rank, ray.get_runtime_context().get_node_id()))
    while (unit := ray.get(queue.take.remote(rank))) is not None:
        if isinstance(unit, str):        # WAIT
            time.sleep(poll_s)
            continue
        train(unit, lambda own: ray.get(queue.threads.remote(rank, own)))
        ray.get(queue.done.remote(rank, unit.key))
