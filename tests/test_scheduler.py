"""The dependency scheduler, on trivial Ray tasks: order, concurrency limit, "not yet", and
failures that stop only their dependants."""
import time

import ray

from raykd.driver.scheduler import Launch, run_in_order


@ray.remote(num_cpus=0)
def job(key: str, fail: bool = False):
    started = time.time()
    time.sleep(0.2)
    if fail:
        raise ValueError(f"{key} broke\nsecond line")
    return {key: (key, started, time.time())}


def alone(fail: str = ""):
    """A launch of one key at a time (the scheduler's default pick)."""
    return lambda keys, slots: Launch(job.remote(keys[0], fail=keys[0] == fail), keys)


def test_dependencies_run_first_and_the_limit_holds(ray_session):
    tasks = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []}
    spans = {}
    failures = run_in_order(tasks, alone(),
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
    failures = run_in_order(tasks, alone(fail="a"),
                            on_done=lambda k, v: done.append(k),
                            on_failed=lambda k, r: failed_seen.append(k), limit=4)
    assert done == ["x"]
    assert failures["a"] == "second line"
    assert failures["b"] == "not run: a failed" and failures["c"] == "not run: b failed"
    assert sorted(failed_seen) == ["a", "b", "c"]


def test_not_yet_is_offered_again_and_done_keys_are_skipped(ray_session):
    offers = {"b": 0}

    def launch(keys, slots):
        if keys == ["b"] and offers["b"] == 0:   # e.g. its teacher service waits for CPUs
            offers["b"] += 1
            return None
        return Launch(job.remote(keys[0]), keys)

    ran = []
    failures = run_in_order({"a": [], "b": [], "c": ["a"], "z": []}, launch,
                            on_done=lambda k, v: ran.append(k), limit=1, done={"z"})
    assert failures == {} and sorted(ran) == ["a", "b", "c"] and offers["b"] == 1


def test_nothing_launchable_is_reported_not_dropped(ray_session):
    failures = run_in_order({"a": []}, lambda keys, slots: None)
    assert failures == {"a": "not run: it could not be launched (dependencies or resources)"}


@ray.remote(num_cpus=0)
def several(keys: list[str], broken: str = ""):
    time.sleep(0.2)
    return {k: (ValueError(f"{k} broke") if k == broken else (k, time.time())) for k in keys}


def test_grouped_launches_start_ready_tasks_together_and_fail_one_by_one(ray_session):
    tasks = {"a": [], "b": [], "c": [], "d": ["a"], "e": ["b"]}
    groups, done = [], []

    def pick(key, others, room):
        keys = [key] + [k for k in others if k in "abc"][:room - 1]
        return keys, len(keys)

    def launch(keys, slots):
        groups.append(sorted(keys))
        return Launch(several.remote(keys, broken="b"), keys, slots)

    failures = run_in_order(tasks, launch, on_done=lambda k, v: done.append(k), limit=2,
                            pick=pick)
    assert groups[0] == ["a", "b"], "two ready tasks, room for two: one launch"
    assert failures == {"b": "b broke", "e": "not run: b failed"}
    assert sorted(done) == ["a", "c", "d"], "a's group-mate failing does not fail a"


def test_a_group_counts_its_slots_not_its_keys_against_the_limit(ray_session):
    """Five tasks packed on two slots leave no room under limit 2; a group on one slot leaves
    room for one more launch beside it."""
    tasks = {k: [] for k in "abcdefg"}
    launches = []

    def pick(key, others, room):
        keys = [key] + others[:4]
        return keys, min(room, 2 if len(launches) == 0 else 1)

    def launch(keys, slots):
        launches.append((sorted(keys), slots))
        return Launch(several.remote(keys), keys, slots)

    failures = run_in_order(tasks, launch, limit=3, pick=pick)
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
        self.keys, self.closed = list(keys), False
        self.launch = Launch(teardown.remote(20), list(keys), len(keys), group=self)

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
    failures = run_in_order(tasks, lambda keys, slots: SettledGroup(keys).launch,
                            on_done=lambda k, v: done.append(k), limit=2,
                            pick=lambda key, others, room: ([key] + others, 2),
                            teardowns=teardowns)
    assert failures == {} and sorted(done) == ["a", "b"]
    assert time.monotonic() - started < 10, "waited for the group's teardown"
    # handed over, so that the next Ray work can wait for the CPUs it frees
    assert len(teardowns) == 1 and not ray.wait(teardowns, timeout=0)[0]
