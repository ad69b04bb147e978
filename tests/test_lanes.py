"""A packed run's work queue: free lanes take the next unit; an open queue makes idle lanes wait
for units added later; a restarted worker group gets back every unit not finished; the queue says
which unit each rank was training."""
from types import SimpleNamespace

import ray

from raykd.train.lanes import WAIT, UnitQueue


def units(*keys):
    return [SimpleNamespace(key=k) for k in keys]


def key(item):
    return item if item is None or isinstance(item, str) else item.key


def test_free_lanes_take_the_next_unit_and_a_restart_requeues_the_unfinished(ray_session):
    q = UnitQueue.remote()
    ray.get(q.add.remote(units("a", "b", "c", "d")))
    ray.get([q.join.remote(0), q.join.remote(1)])
    assert key(ray.get(q.take.remote(0))) == "a" and key(ray.get(q.take.remote(1))) == "b"
    ray.get(q.done.remote(0, "a"))
    assert key(ray.get(q.take.remote(0))) == "c", "the free lane takes the next unit"
    assert ray.get(q.running.remote()) == {0: "c", 1: "b"}
    # the worker group restarts: rank 1 joins again first
    ray.get(q.join.remote(1))
    ray.get(q.join.remote(0))
    ray.get(q.close.remote())
    taken = [key(ray.get(q.take.remote(r))) for r in (1, 0, 1, 0)]
    assert taken == ["b", "c", "d", None], "every unit but the finished one, in order, once"


def test_an_open_queue_makes_idle_lanes_wait_and_reports_what_finished(ray_session):
    q = UnitQueue.remote()
    ray.get(q.add.remote(units("a")))
    ray.get(q.join.remote(0))
    assert key(ray.get(q.take.remote(0))) == "a"
    assert ray.get(q.take.remote(0)) == WAIT, "open and empty: wait, don't leave"
    ray.get(q.done.remote(0, "a"))
    assert ray.get(q.finished_since.remote(0)) == ["a"]
    assert ray.get(q.add.remote(units("b"))) is True      # a dependant of a joins the run
    assert key(ray.get(q.take.remote(0))) == "b"
    ray.get(q.close.remote())
    assert ray.get(q.add.remote(units("c"))) is False, "a closed queue takes nothing more"
    ray.get(q.done.remote(0, "b"))
    assert ray.get(q.take.remote(0)) is None and ray.get(q.finished_since.remote(1)) == ["b"]


def test_units_others_wait_on_are_taken_first(ray_session):
    q = UnitQueue.remote()
    ray.get(q.add.remote(units("leaf1", "leaf2")))
    ray.get(q.add.remote(units("heads", "leaf3"), {"heads": 1}))   # a DIH student waits on heads
    ray.get(q.close.remote())
    assert [key(ray.get(q.take.remote(0))) for _ in range(5)] == [
        "heads", "leaf1", "leaf2", "leaf3", None]


def test_a_busy_lane_borrows_the_cpus_of_idle_lanes_on_its_node_only_when_lending(ray_session):
    q = UnitQueue.remote(True)
    ray.get(q.add.remote(units("long", "short")))
    ray.get([q.join.remote(0, "n1"), q.join.remote(1, "n1"), q.join.remote(2, "n2")])
    assert key(ray.get(q.take.remote(0))) == "long" and key(ray.get(q.take.remote(1))) == "short"
    assert ray.get(q.threads.remote(0, 1)) == 1, "both lanes of n1 busy: its own CPU"
    ray.get(q.done.remote(1, "short"))
    assert ray.get(q.take.remote(1)) == WAIT and ray.get(q.take.remote(2)) == WAIT
    assert ray.get(q.threads.remote(0, 1)) == 2, "lane 1 waits: lane 0 uses its CPU too"
    assert ray.get(q.threads.remote(0, 2)) == 4
    ray.get(q.add.remote(units("next")))
    assert key(ray.get(q.take.remote(1))) == "next"
    assert ray.get(q.threads.remote(0, 1)) == 1, "lane 1 took a unit: back to its own CPU"
    assert ray.get(q.threads.remote(2, 1)) == 1, "never another node's CPUs"
    off = UnitQueue.remote()
    ray.get(off.add.remote(units("a")))
    ray.get([off.join.remote(0, "n1"), off.join.remote(1, "n1")])
    ray.get(off.take.remote(0))
    assert ray.get(off.take.remote(1)) == WAIT and ray.get(off.threads.remote(0, 1)) == 1
