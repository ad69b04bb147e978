"""The dependency scheduler, on trivial Ray tasks: order, concurrency limit, "not yet", and
failures that stop only their dependants."""
import time

import ray

from raykd.scheduler import run_in_order


@ray.remote(num_cpus=0)
def job(key: str, fail: bool = False):
    started = time.time()
    time.sleep(0.2)
    if fail:
        raise ValueError(f"{key} broke\nsecond line")
    return key, started, time.time()


def test_dependencies_run_first_and_the_limit_holds(ray_session):
    tasks = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []}
    spans = {}
    failures = run_in_order(tasks, lambda k: job.remote(k),
                            on_done=lambda k, v: spans.__setitem__(k, v[1:]), limit=2)
    assert failures == {} and set(spans) == set(tasks)
    for key, deps in tasks.items():
        for dep in deps:
            assert spans[dep][1] <= spans[key][0], f"{key} started before {dep} ended"
    events = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most <= 2


def test_a_failure_stops_its_dependants_only(ray_session):
    tasks = {"a": [], "b": ["a"], "c": ["b"], "x": []}
    done, failed_seen = [], []
    failures = run_in_order(tasks, lambda k: job.remote(k, fail=(k == "a")),
                            on_done=lambda k, v: done.append(k),
                            on_failed=lambda k, r: failed_seen.append(k), limit=4)
    assert done == ["x"]
    assert failures["a"] == "second line"
    assert failures["b"] == "not run: a failed" and failures["c"] == "not run: b failed"
    assert sorted(failed_seen) == ["a", "b", "c"]


def test_not_yet_is_offered_again_and_done_keys_are_skipped(ray_session):
    offers = {"b": 0}

    def launch(key):
        if key == "b" and offers["b"] == 0:   # e.g. its teacher service waits for CPUs
            offers["b"] += 1
            return None
        return job.remote(key)

    ran = []
    failures = run_in_order({"a": [], "b": [], "c": ["a"], "z": []}, launch,
                            on_done=lambda k, v: ran.append(k), limit=1, done={"z"})
    assert failures == {} and sorted(ran) == ["a", "b", "c"] and offers["b"] == 1


def test_nothing_launchable_is_reported_not_dropped(ray_session):
    failures = run_in_order({"a": []}, lambda k: None)
    assert failures == {"a": "not run: it could not be launched (dependencies or resources)"}


@ray.remote(num_cpus=0)
def several(keys: list[str], broken: str = ""):
    time.sleep(0.2)
    return {k: (ValueError(f"{k} broke") if k == broken else (k, time.time())) for k in keys}


def test_grouped_launches_start_ready_tasks_together_and_fail_one_by_one(ray_session):
    tasks = {"a": [], "b": [], "c": [], "d": ["a"], "e": ["b"]}
    groups, done = [], []

    def group(key, others, room):
        return [key] + [k for k in others if k in "abc"][:room - 1]

    def launch(keys, slots):
        groups.append(sorted(keys))
        return several.remote(keys, broken="b")

    failures = run_in_order(tasks, launch, on_done=lambda k, v: done.append(k), limit=2,
                            group=group)
    assert groups[0] == ["a", "b"], "two ready tasks, room for two: one launch"
    assert failures == {"b": "b broke", "e": "not run: b failed"}
    assert sorted(done) == ["a", "c", "d"], "a's group-mate failing does not fail a"


def test_a_group_counts_its_slots_not_its_keys_against_the_limit(ray_session):
    """Five tasks packed on two slots leave no room under limit 2; a group on one slot leaves
    room for one more launch beside it."""
    tasks = {k: [] for k in "abcdefg"}
    launches = []

    def group(key, others, room):
        keys = [key] + others[:4]
        return keys, min(room, 2 if len(launches) == 0 else 1)

    def launch(keys, slots):
        launches.append((sorted(keys), slots))
        return several.remote(keys)

    failures = run_in_order(tasks, launch, limit=3, group=group)
    assert failures == {}
    assert launches[0] == (["a", "b", "c", "d", "e"], 2)
    assert launches[1] == (["f", "g"], 1), "one slot was left beside the first group"
    assert len(launches) == 2


@ray.remote(num_cpus=0)
def teardown(seconds: float) -> dict:
    time.sleep(seconds)
    return {}


class SettledGroup:
    """An open group (as raykd's packed runs are) whose units all settle at its first poll, and
    whose run then takes a long time to tear down."""

    def __init__(self, keys):
        self.keys, self.ref, self.closed = list(keys), teardown.remote(20), False

    def offer(self, keys):
        return []

    def close(self):
        self.closed = True

    def poll(self):
        out, self.keys = {k: k for k in self.keys}, []
        return out


def test_a_closed_group_whose_units_all_settled_does_not_hold_up_the_end(ray_session):
    tasks = {"a": [], "b": []}
    done, teardowns = [], []
    started = time.monotonic()
    failures = run_in_order(tasks, lambda keys, slots: SettledGroup(keys),
                            on_done=lambda k, v: done.append(k), limit=2,
                            group=lambda key, others, room: [key] + others, teardowns=teardowns)
    assert failures == {} and sorted(done) == ["a", "b"]
    assert time.monotonic() - started < 10, "waited for the group's teardown"
    # handed over, so that the next Ray work can wait for the CPUs it frees
    assert len(teardowns) == 1 and not ray.wait(teardowns, timeout=0)[0]
