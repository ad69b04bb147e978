"""Planning: what units a job becomes, their seeds and dependencies (no Ray)."""
from raykd.data import load_dataset
from raykd.driver.plan import plan_units
from raykd.job.config import job_from_dict

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


def test_a_teacher_is_asked_to_store_what_its_parts_and_heads_read_from_the_cache(tmp_path):
    """Every split and tap a neighbourhood part or a DIH head reads from the teacher cache is in
    its teacher unit's `store_outputs`; nothing is asked of a teacher when the cache is off, nor
    for parts trained on synthetic inputs (they read no dataset)."""
    from raykd.models.stitch import boundary_taps

    nd = {"method": "neighbourhood", "groups": ["stage2", "stage3"], "candidates": ["w0.5d1"]}
    units = _units(tmp_path, methods={"nd": nd, "dih": {"heads": ["stage1", "stage3"]}})
    teacher = units["seed0-teacher"]
    stored = teacher.store_outputs
    assert stored is not None and stored.cache_dir == str(tmp_path / "feature_cache")
    assert sorted(stored.taps) == ["test", "train", "val"]
    part = units["seed0-nd-stage2-w0.5d1"]
    from raykd.models import build_model
    arch = build_model("cnn", 10, 1, 8)
    wanted = set(boundary_taps(arch, part.payload.boundaries)) | {"stage1", "stage3"}
    assert wanted == {"logits", "stage1_block", "stage2_block", "stage3_block", "stage1", "stage3"}
    assert all(set(taps) == wanted for taps in stored.taps.values())
    assert all(u.store_outputs is None for k, u in units.items() if k != "seed0-teacher")
    off = _units(tmp_path, methods={"nd": nd}, teacher={"model": "cnn", "cache": False})
    assert off["seed0-teacher"].store_outputs is None
    synthetic = _units(tmp_path, methods={"nd": {**nd, "inputs": "gaussian"}})
    assert synthetic["seed0-teacher"].store_outputs is None
