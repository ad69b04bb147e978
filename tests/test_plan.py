"""Planning: what units a job becomes, their seeds and dependencies (no Ray)."""
from raykd.config import job_from_dict
from raykd.data import load_dataset
from raykd.plan import plan_units

from conftest import small_job


def _units(tmp_path, **sections):
    spec = job_from_dict(small_job(tmp_path, **sections))
    return {u.key: u for u in plan_units(spec, load_dataset(spec.data))}


def test_every_unit_has_its_own_seed_stream(tmp_path):
    # a student with the teacher's own architecture, a chain, two teachers per seed
    units = _units(tmp_path, seeds=[0, 1],
                   teacher={"model": "cnn", "count": 2, "train": {"epochs": 1}},
                   student={"model": "cnn", "train": {"epochs": 1}},
                   methods={"ce": {}, "kd": {"chain": 2}, "feed": {}, "feed_seq": {
                       "method": "feed", "chain": 2}})
    seeds = [u.random_seed for u in units.values()]
    assert len(set(seeds)) == len(seeds)
    # the same job planned again gives the same seeds (resume needs them)
    again = _units(tmp_path, seeds=[0, 1],
                   teacher={"model": "cnn", "count": 2, "train": {"epochs": 1}},
                   student={"model": "cnn", "train": {"epochs": 1}},
                   methods={"ce": {}, "kd": {"chain": 2}, "feed": {}, "feed_seq": {
                       "method": "feed", "chain": 2}})
    assert [u.random_seed for u in again.values()] == seeds
    # sequential FEED starts from one pretrained teacher; parallel FEED uses both
    assert units["seed0-feed"].teacher_mode == "all"
    assert units["seed0-feed"].teacher_candidates == [units["seed0-teacher"].export_path,
                                                      units["seed0-teacher1"].export_path]
    assert units["seed0-feed_seq.1"].teacher_mode == "first"
    assert units["seed0-feed_seq.2"].teacher_candidates == [units["seed0-feed_seq.1"].export_path]


def test_heads_trained_together_or_apart_share_their_seed(tmp_path):
    together = _units(tmp_path, methods={"dih": {}})
    apart = _units(tmp_path, methods={"dih": {}}, heads={"layout": "separate"})
    assert {u.random_seed for u in apart.values() if u.role == "head"} == {
        together["seed0-heads"].random_seed}
