"""A generic dependency scheduler over Ray object references.

Tasks are keys with the keys they depend on. A task is launched once all its dependencies are
done, at most `limit` at a time, those that most others wait on first (the critical path).
`launch(key)` returns an ObjectRef, or None for "not yet" (e.g. a teacher service needs CPUs that
another run holds): the task is offered again after the next completion. A task whose result
raises is failed, and so is everything that depends on it ("not run: X failed"); the others go on.

Grouping: with `group(key, others, room)`, a launch may start several ready tasks at once (one
Ray Train run whose workers train them): `group` picks the keys to start together (`key` first)
and how many of the `room` free slots they take (`(keys, slots)`; a plain list takes a slot a
key), `launch(keys, slots)` returns a reference (or `(reference, keys it really started)`, or
None), and the reference's value is {key: value}, where an exception instance fails just that
key. Slots, not keys, count against `limit`: a group of ten tasks on two workers takes two.

Open groups: `launch` may instead return an object with `ref`, `keys`, `offer(keys) -> keys it
took` and `poll() -> {key: value}` for keys finished so far, and `close()`. Ready tasks are
offered to open groups first (a run whose workers take more work as it becomes ready), finished
keys are polled while the group runs, so their dependants can join it, and a group is closed once
nothing is left to start, or when a ready task it will not take finds no free slot (so it drains
and gives its slots back).
Nothing here knows what a task is.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import ray


def one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def run_in_order(tasks: Mapping[str, list[str]], launch: Callable[[Any], Any],
                 on_done: Callable[[str, Any], None] = lambda key, value: None,
                 on_failed: Callable[[str, str], None] = lambda key, reason: None,
                 limit: int = 1, done: Iterable[str] = (),
                 group: Callable[[str, list[str], int], list[str]] | None = None,
                 poll_s: float = 0.5,
                 on_tick: Callable[[list[str], list[Any]], None] | None = None,
                 teardowns: list | None = None) -> dict[str, str]:
    """Run `tasks` (key -> dependency keys) to completion; return {key: reason} for the failed
    and the not-run. Keys in `done` count as finished already. `on_tick(keys, groups)` is
    called at every turn with the keys of plain launches in flight and the open groups.
    `teardowns` collects the refs of closed groups left to finish in the background."""
    done = set(done)
    pending = [k for k in tasks if k not in done]
    dependents: dict[str, int] = {}
    for deps in tasks.values():
        for dep in deps:
            dependents[dep] = dependents.get(dep, 0) + 1
    in_flight: dict[Any, list[str]] = {}
    slots: dict[Any, int] = {}          # what each launch in flight counts against `limit`
    groups: dict[Any, Any] = {}         # groups in flight that report keys as they finish
    open_refs: set = set()              # those still taking more keys
    failed: dict[str, str] = {}

    def fail(key: str, reason: str) -> None:
        failed[key] = reason
        on_failed(key, reason)

    def busy() -> int:
        return sum(slots.values())

    def settle(key: str, value: Any) -> None:
        if isinstance(value, BaseException):
            fail(key, one_line(value))
        else:
            done.add(key)
            on_done(key, value)

    while pending or in_flight:
        for key in list(pending):
            bad = [d for d in tasks[key] if d in failed]
            if bad:
                pending.remove(key)
                fail(key, f"not run: {bad[0]} failed")
        ready = sorted((k for k in pending if all(d in done for d in tasks[k])),
                       key=lambda k: -dependents.get(k, 0))
        for ref in open_refs:
            open_group = groups[ref]
            offered = [k for k in ready if k in pending]
            for k in open_group.offer(offered) if offered else []:
                pending.remove(k)
                in_flight[ref].append(k)
        for key in ready:
            if busy() >= limit:
                break
            if key not in pending:      # started with an earlier key's group
                continue
            if group is None:
                keys, width, started = [key], 1, launch(key)
            else:
                others = [k for k in ready if k != key and k in pending]
                picked = group(key, others, limit - busy())
                keys, width = picked if isinstance(picked, tuple) else (picked, len(picked))
                started = launch(keys, width)
            if started is None:
                continue
            if hasattr(started, "offer"):
                ref, keys = started.ref, started.keys
                groups[ref] = started
                open_refs.add(ref)
            else:
                ref, keys = started if isinstance(started, tuple) else (started, keys)
            in_flight[ref] = list(keys)
            slots[ref] = max(1, min(width, len(keys)))
            for k in keys:
                pending.remove(k)
        stuck = any(k in pending and all(d in done for d in tasks[k]) for k in ready)
        if open_refs and (not pending or (stuck and busy() >= limit)):
            for ref in open_refs:
                groups[ref].close()
            open_refs.clear()
        if not in_flight:
            for key in list(pending):   # nothing runs and nothing can start: never drop silently
                pending.remove(key)
                fail(key, "not run: it could not be launched (dependencies or resources)")
            break
        if on_tick:
            on_tick([k for ref, keys in in_flight.items() if ref not in groups for k in keys],
                    list(groups.values()))
        finished, _ = ray.wait(list(in_flight), num_returns=1,
                               timeout=poll_s if groups or on_tick else None)
        for ref, open_group in list(groups.items()):
            for key, value in open_group.poll().items():
                in_flight[ref].remove(key)
                settle(key, value)
            if ref not in open_refs and not in_flight[ref] and ref not in finished:
                # closed and every unit settled: its run's teardown (seconds of Ray Train
                # shutting its workers down) goes on without holding up the end
                del in_flight[ref], slots[ref], groups[ref]
                if teardowns is not None:
                    teardowns.append(ref)
        if not finished:
            continue
        [ref] = finished
        keys = in_flight.pop(ref)
        slots.pop(ref)
        groups.pop(ref, None)
        open_refs.discard(ref)
        try:
            value = ray.get(ref)
        except Exception as exc:   # the task failed (after any retries of its own)
            for key in keys:
                fail(key, one_line(exc))
            continue
        values = value if group is not None else {keys[0]: value}
        for key in keys:
            settle(key, values[key])
    return failed
