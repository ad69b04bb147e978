"""A generic dependency scheduler over Ray object references.

Tasks are keys with the keys they depend on. A task is launched once all its dependencies are
done, at most `limit` slots at a time, those that most others wait on first (the critical path).
Nothing here knows what a task is.

`launch(keys, slots)` starts one or more ready keys together and returns a `Launch`, or None
for "not yet" (e.g. a teacher service needs CPUs that another run holds): those keys are
offered again after the next completion. Which ready keys start together, and on how many of
the free slots, is `pick(key, others, room) -> (keys, slots)`'s choice (by default each key
alone on one slot): one Ray Train run whose workers train several units, say. Slots, not keys,
count against `limit`: a group of ten tasks on two workers takes two.

A launch's `ref` resolves to {key: value}; an exception instance as a value fails just that key,
and a `ref` that raises fails all its keys. A failed task fails everything that depends on it
("not run: X failed"); the others go on.

Open groups: a `Launch` may carry an `OpenGroup`, a run whose workers take more work as it
becomes ready. Ready tasks are offered to open groups first, finished keys are polled while the
group runs (so their dependants can join it), and a group is closed once nothing is left to
start, or when a ready task it will not take finds no free slot (so it drains and gives its
slots back). A closed group whose keys have all settled no longer holds up the end: its `ref`
(the run's teardown) is handed to `teardowns`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

import ray

from raykd.errors import one_line


class OpenGroup(Protocol):
    def offer(self, keys: list[str]) -> list[str]:
        """Take what it can of these ready keys; return the keys it took."""

    def poll(self) -> dict[str, Any]:
        """{key: value} for its keys finished since the last poll."""

    def close(self) -> None:
        """Take no more keys: drain and end."""


@dataclass
class Launch:
    """What one `launch` started: `ref` resolves to {key: value} for `keys`; `slots` of the
    limit it holds; `group`, when it is an open group."""
    ref: Any
    keys: list[str]
    slots: int = 1
    group: OpenGroup | None = None


def alone(key: str, others: list[str], room: int) -> tuple[list[str], int]:
    """The default `pick`: every key starts on its own, on one slot."""
    return [key], 1


def run_in_order(tasks: Mapping[str, list[str]],
                 launch: Callable[[list[str], int], Launch | None], **options) -> dict[str, str]:
    """Run `tasks` (key -> dependency keys) to completion; return {key: reason} for the failed
    and the not-run. `options`: those of `Scheduler`."""
    return Scheduler(tasks, launch, **options).run()


class Scheduler:
    """One run of `tasks` to completion (see the module's docstring).

    `on_done(key, value)` and `on_failed(key, reason)` are called as keys settle; keys in `done`
    count as finished already; `on_tick(keys, groups)` is called at every turn with the keys of
    plain launches in flight and the open groups; `teardowns` collects the refs of closed groups
    left to finish in the background."""

    def __init__(self, tasks: Mapping[str, list[str]],
                 launch: Callable[[list[str], int], Launch | None],
                 on_done: Callable[[str, Any], None] = lambda key, value: None,
                 on_failed: Callable[[str, str], None] = lambda key, reason: None,
                 limit: int = 1, done: Iterable[str] = (),
                 pick: Callable[[str, list[str], int], tuple[list[str], int]] = alone,
                 poll_s: float = 0.5,
                 on_tick: Callable[[list[str], list[Any]], None] | None = None,
                 teardowns: list | None = None):
        self.tasks, self.launch, self.pick = tasks, launch, pick
        self.on_done, self.on_failed, self.on_tick = on_done, on_failed, on_tick
        self.limit, self.poll_s, self.teardowns = limit, poll_s, teardowns
        self.done = set(done)
        self.pending = [k for k in tasks if k not in self.done]
        self.dependents: dict[str, int] = {}
        for deps in tasks.values():
            for dep in deps:
                self.dependents[dep] = self.dependents.get(dep, 0) + 1
        self.in_flight: dict[Any, Launch] = {}   # ref -> what it started, keys not settled
        self.open_refs: set = set()              # groups still taking more keys
        self.failed: dict[str, str] = {}

    def run(self) -> dict[str, str]:
        while self.pending or self.in_flight:
            self.fail_orphans()
            ready = self.ready()
            self.offer_to_open_groups(ready)
            self.launch_ready(ready)
            self.close_idle_groups(ready)
            if not self.in_flight:
                self.give_up()
                break
            if self.on_tick:
                self.on_tick([k for launch in self.in_flight.values() if launch.group is None
                              for k in launch.keys],
                             [launch.group for launch in self.in_flight.values() if launch.group])
            self.collect()
        return self.failed

    # ---- one turn, in order ----

    def fail_orphans(self) -> None:
        """Pending keys whose dependency failed are not run."""
        for key in list(self.pending):
            bad = [d for d in self.tasks[key] if d in self.failed]
            if bad:
                self.pending.remove(key)
                self.fail(key, f"not run: {bad[0]} failed")

    def ready(self) -> list[str]:
        """Pending keys whose dependencies are done, those that most others wait on first."""
        return sorted((k for k in self.pending if all(d in self.done for d in self.tasks[k])),
                      key=lambda k: -self.dependents.get(k, 0))

    def offer_to_open_groups(self, ready: list[str]) -> None:
        for ref in self.open_refs:
            offered = [k for k in ready if k in self.pending]
            for key in self.in_flight[ref].group.offer(offered) if offered else []:
                self.pending.remove(key)
                self.in_flight[ref].keys.append(key)

    def launch_ready(self, ready: list[str]) -> None:
        for key in ready:
            if self.busy() >= self.limit:
                break
            if key not in self.pending:      # started with an earlier key's group
                continue
            others = [k for k in ready if k != key and k in self.pending]
            keys, slots = self.pick(key, others, self.limit - self.busy())
            started = self.launch(keys, slots)
            if started is None:
                continue
            started.keys = list(started.keys)
            started.slots = max(1, min(started.slots, len(started.keys)))
            self.in_flight[started.ref] = started
            if started.group is not None:
                self.open_refs.add(started.ref)
            for k in started.keys:
                self.pending.remove(k)

    def close_idle_groups(self, ready: list[str]) -> None:
        """Close open groups once nothing is left to start, or when a ready key they would not
        take finds no free slot."""
        stuck = any(k in self.pending for k in ready)
        if self.open_refs and (not self.pending or (stuck and self.busy() >= self.limit)):
            for ref in self.open_refs:
                self.in_flight[ref].group.close()
            self.open_refs.clear()

    def give_up(self) -> None:
        """Nothing runs and nothing can start: never drop a key silently."""
        for key in list(self.pending):
            self.pending.remove(key)
            self.fail(key, "not run: it could not be launched (dependencies or resources)")

    def collect(self) -> None:
        """Settle what finished: keys polled from open groups, then at most one whole launch."""
        groups = any(launch.group for launch in self.in_flight.values())
        finished, _ = ray.wait(list(self.in_flight), num_returns=1,
                               timeout=self.poll_s if groups or self.on_tick else None)
        for ref, launch in list(self.in_flight.items()):
            if launch.group is None:
                continue
            for key, value in launch.group.poll().items():
                launch.keys.remove(key)
                self.settle(key, value)
            if ref not in self.open_refs and not launch.keys and ref not in finished:
                # closed and every key settled: its teardown (seconds of Ray Train shutting
                # its workers down) goes on without holding up the end
                del self.in_flight[ref]
                if self.teardowns is not None:
                    self.teardowns.append(ref)
        for ref in finished:
            launch = self.in_flight.pop(ref)
            self.open_refs.discard(ref)
            try:
                values = ray.get(ref)
            except Exception as exc:   # the launch failed (after any retries of its own)
                for key in launch.keys:
                    self.fail(key, one_line(exc))
                continue
            for key in launch.keys:
                self.settle(key, values[key])

    # ---- helpers ----

    def busy(self) -> int:
        return sum(launch.slots for launch in self.in_flight.values())

    def settle(self, key: str, value: Any) -> None:
        if isinstance(value, BaseException):
            self.fail(key, one_line(value))
        else:
            self.done.add(key)
            self.on_done(key, value)

    def fail(self, key: str, reason: str) -> None:
        self.failed[key] = reason
        self.on_failed(key, reason)
