"""A generic dependency scheduler over Ray object references.

Tasks are keys with the keys they depend on. A task is launched once all its dependencies are
done, at most `limit` at a time, those that most others wait on first (the critical path).
`launch(key)` returns an ObjectRef, or None for "not yet" (e.g. a teacher service needs CPUs that
another run holds): the task is offered again after the next completion. A task whose result
raises is failed, and so is everything that depends on it ("not run: X failed"); the others go on.
Nothing here knows what a task is.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import ray


def one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def run_in_order(tasks: Mapping[str, list[str]], launch: Callable[[str], Any],
                 on_done: Callable[[str, Any], None] = lambda key, value: None,
                 on_failed: Callable[[str, str], None] = lambda key, reason: None,
                 limit: int = 1, done: Iterable[str] = ()) -> dict[str, str]:
    """Run `tasks` (key -> dependency keys) to completion; return {key: reason} for the failed
    and the not-run. Keys in `done` count as finished already."""
    done = set(done)
    pending = [k for k in tasks if k not in done]
    dependents: dict[str, int] = {}
    for deps in tasks.values():
        for dep in deps:
            dependents[dep] = dependents.get(dep, 0) + 1
    in_flight: dict[Any, str] = {}
    failed: dict[str, str] = {}

    def fail(key: str, reason: str) -> None:
        failed[key] = reason
        on_failed(key, reason)

    while pending or in_flight:
        for key in list(pending):
            bad = [d for d in tasks[key] if d in failed]
            if bad:
                pending.remove(key)
                fail(key, f"not run: {bad[0]} failed")
        ready = sorted((k for k in pending if all(d in done for d in tasks[k])),
                       key=lambda k: -dependents.get(k, 0))
        for key in ready:
            if len(in_flight) >= limit:
                break
            ref = launch(key)
            if ref is None:
                continue
            in_flight[ref] = key
            pending.remove(key)
        if not in_flight:
            for key in list(pending):   # nothing runs and nothing can start: never drop silently
                pending.remove(key)
                fail(key, "not run: it could not be launched (dependencies or resources)")
            break
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        key = in_flight.pop(ref)
        try:
            value = ray.get(ref)
        except Exception as exc:   # the task failed (after any retries of its own)
            fail(key, one_line(exc))
            continue
        done.add(key)
        on_done(key, value)
    return failed
