"""Replayed teacher views (raykd.teacher.replay): the stored views are the views the student
trains on, bit for bit; the stored scores are the teacher's on them; the store is keyed by what
decides its contents, detects damage and resumes a killed fill; jobs that cannot use it are told
so in one line; and students of KD and DIH train on it end to end."""
import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raykd.data import load_dataset
from raykd.driver.pipeline import run_job
from raykd.driver.plan import preflight
from raykd.errors import RaykdError
from raykd.job.config import job_from_dict
from raykd.job.specs import DataSpec
from raykd.methods import MethodContext, build_method
from raykd.models import build_model
from raykd.models.export import load_export, save_export
from raykd.teacher.cache import FeatureCache
from raykd.teacher.handle import TeacherHandle
from raykd.teacher.local import Done, LocalTeacher
from raykd.teacher.replay import (
    ReplayedViews,
    class_scores,
    replay_key,
    replayed_teacher,
    score_taps,
    view_of,
    view_scores,
)
from raykd.train.batches import SeededSamples

from conftest import small_job

AUGMENTED = {"dataset": "byo_data:augmented_digits", "batch_size": 64, "train_size": 400}


def replay_job(tmp_path, views=3, topk=4, **sections):
    teacher = {"model": "cnn", "train": {"epochs": 1, "lr": 0.1},
               "replay": {"views": views, "topk": topk}}
    return job_from_dict(small_job(tmp_path, **{"data": AUGMENTED, "teacher": teacher,
                                                **sections}))


def kd(teacher_path):
    arch = load_export(teacher_path)
    return build_method("kd", {}, MethodContext(
        student=build_model("cnn_small", 10, 1, 8), num_classes=10, input_shape=(1, 8, 8),
        teacher=arch, teachers=[arch]))


class Counting:
    """The online teacher, counting its forwards; raising after `fail_after` of them."""

    def __init__(self, path, fail_after=None):
        self.inner, self.calls, self.fail_after = LocalTeacher(path), 0, fail_after

    def features(self, x, taps, index=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed mid-fill")
        self.calls += 1
        return self.inner.features(x, taps)

    def submit(self, x, taps, index=None):
        return Done(self.features(x, taps))


def replayed(spec, path, views, teacher_factory, messages, cache="cache"):
    cache_dir = str(spec.run_dir.parent / cache)
    return replayed_teacher(TeacherHandle(str(path), cache_dir=cache_dir), load_export(path),
                            teacher_factory, kd(path), spec.data, views, 10, [], "cpu",
                            say=messages.append)


def expected_view(dataset, stream_seed: int, view: int, i: int):
    """The view as the job's transform draws it from the stored parameters (the generator seed
    of (stream, view, image)), written out here independently of raykd's helper."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(((stream_seed * 1_000_003 + view) * 1_000_033 + i) % (1 << 63))
        return dataset[i][0]


def test_replayed_views_are_the_stored_views_and_carry_the_teachers_top_k(tmp_path,
                                                                          digits_teacher):
    spec = replay_job(tmp_path, views=3, topk=4)
    splits = load_dataset(spec.data)
    seed = 2_147_000_011        # a unit's augmentation seed is up to 2^31
    views = ReplayedViews(splits.train, spec.teacher.replay, student_seed=seed)
    # the view an image is drawn at (Python ints) is the row its scores are read from (tensors)
    every = torch.arange(len(splits.train))
    assert view_of(seed, 5, every, 3).tolist() == [view_of(seed, 5, i, 3) for i in range(len(every))]
    messages: list[str] = []
    teacher = replayed(spec, digits_teacher, views, lambda: LocalTeacher(digits_teacher),
                       messages)
    assert any("replay store miss" in m for m in messages)
    online = LocalTeacher(digits_teacher)
    # the fill says how much of the teacher's probability it spreads evenly (view 1 checked)
    said = next(m for m in messages if "view 1/3" in m)
    spread = float(re.search(r"; ([0-9.]+)% of the teacher's probability", said).group(1))
    first = [expected_view(splits.train, spec.teacher.replay.seed, 0, i)
             for i in range(len(splits.train))]
    p = F.softmax(online.features(torch.stack(first), ["logits"])["logits"], dim=1)
    labels = torch.tensor([int(splits.train[i][1]) for i in range(len(splits.train))])
    kept = torch.zeros_like(p, dtype=torch.bool)
    kept.scatter_(1, p.topk(4, dim=1).indices, True)
    kept[torch.arange(len(p)), labels] = True
    assert spread == pytest.approx(100 * float(p[~kept].sum() / len(p)), abs=0.06)
    seen_views = set()
    for epoch in range(4):
        views.set_epoch(epoch)
        index = torch.arange(0, 40)
        x = torch.stack([views[int(i)][0] for i in index])
        for i in range(0, 40, 7):   # bit-identical to the transform under the stored seed
            v = int(view_of(seed, epoch, i, 3))
            seen_views.add(v)
            assert torch.equal(x[i], expected_view(splits.train, spec.teacher.replay.seed, v, i))
        # the augmentation is real: another view of an image differs
        other = expected_view(splits.train, spec.teacher.replay.seed, 0, 5)
        assert any(not torch.equal(other, expected_view(splits.train, 0, v, 5)) for v in (1, 2))
        served = teacher.features(x, ["logits"], index)["logits"]
        truth = F.log_softmax(online.features(x, ["logits"])["logits"], dim=1)
        top = truth.topk(4, dim=1)
        # the stored top-k are the teacher's own on exactly this view (float16 log-probabilities)
        assert torch.equal(served.topk(4, dim=1).indices.sort(1).values,
                           top.indices.sort(1).values)
        assert torch.allclose(served.gather(1, top.indices), top.values, atol=2e-2, rtol=2e-3)
        y = torch.stack([torch.as_tensor(views[int(i)][1]) for i in index])
        assert torch.allclose(served.gather(1, y[:, None]), truth.gather(1, y[:, None]),
                              atol=2e-2, rtol=2e-3)
        # a distribution: what the top k and the label leave is spread over the other classes
        assert torch.allclose(served.exp().sum(1), torch.ones(len(x)), atol=1e-2)
    assert seen_views == {0, 1, 2}, "every stored view is trained on over the epochs"
    # a second reader hits the store: no teacher is opened
    again: list[str] = []
    replayed(spec, digits_teacher, views, lambda: pytest.fail("the teacher was opened"), again)
    assert any("replay store hit" in m for m in again)


def test_with_k_all_classes_the_replayed_teacher_is_the_teacher_at_any_temperature(
        tmp_path, digits_teacher):
    spec = replay_job(tmp_path, views=2, topk=10)
    views = ReplayedViews(load_dataset(spec.data).train, spec.teacher.replay, student_seed=3)
    teacher = replayed(spec, digits_teacher, views, lambda: LocalTeacher(digits_teacher), [])
    views.set_epoch(1)
    index = torch.arange(100, 164)
    x = torch.stack([views[int(i)][0] for i in index])
    z = LocalTeacher(digits_teacher).features(x, ["logits"])["logits"]
    served = teacher.features(x, ["logits"], index)["logits"]
    for temperature in (1.0, 4.0, 10.0):
        assert torch.allclose(F.softmax(served / temperature, 1), F.softmax(z / temperature, 1),
                              atol=2e-3)


def test_views_drawn_with_pythons_or_numpys_generator_replay_too():
    """torchvision's RandomOrder and RandomChoice draw from Python's generator, other libraries'
    transforms from NumPy's: a view is drawn from all three seeded, and the caller's Python
    stream is left as it was."""
    class Jitter(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.tensor([random.random(), np.random.rand(), torch.rand(1).item()]), 0

    samples = SeededSamples(Jitter(), seed=5)
    random.seed(1)
    np.random.seed(1)
    first = samples.draw(3, 2)[0]
    assert torch.equal(first, samples.draw(3, 2)[0])
    assert not torch.equal(first, samples.draw(3, 1)[0])
    random.seed(1)
    expected = random.random()
    random.seed(1)
    samples.draw(4, 0)
    assert random.random() == expected


def test_a_confident_teachers_remaining_mass_is_kept(tmp_path):
    """With 1,000 classes and a teacher so sure that its top log-probability rounds to 0 in
    float16, the probability outside the top k is still what the teacher gave it (stored in
    float32's terms), not what 1 minus the rounded stored probabilities leaves (nothing)."""
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    logits[:, 0] += 30                        # log p of class 0 about -1e-9
    labels = torch.randint(0, 1000, (64,))
    stored = view_scores({"logits": logits}, labels, k=10, num_classes=1000)
    served = class_scores(*(stored[t] for t in score_taps("logits")), stored["label"], 1000)
    truth = F.log_softmax(logits, dim=1)
    kept = torch.zeros_like(truth, dtype=torch.bool)
    kept.scatter_(1, truth.topk(10, dim=1).indices, True)
    kept[torch.arange(64), labels] = True
    left = truth.exp().masked_fill(kept, 0).sum(1)
    assert torch.allclose(served.exp().masked_fill(kept, 0).sum(1), left, rtol=2e-3)
    # the case in point: the top log-probability stored as exactly 0 for most rows
    assert (stored["logits.topk"][:, 0] == 0).float().mean() > 0.5 and (left > 0).all()


def test_the_store_is_keyed_by_teacher_transforms_views_and_k(tmp_path, digits_teacher):
    spec = replay_job(tmp_path, views=3, topk=4)
    other_teacher = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_export(build_model("cnn", 10, 1, 8), other_teacher, 10, 1, 8)
    base = replay_key(str(digits_teacher), spec.data, spec.teacher.replay, ["logits"], [])
    cifar = DataSpec(dataset="cifar10", augment="cifar")
    cifar_key = replay_key(str(digits_teacher), cifar, spec.teacher.replay, ["logits"], [])
    changed = {
        "teacher": replay_key(str(other_teacher), spec.data, spec.teacher.replay, ["logits"], []),
        "transform": replay_key(str(digits_teacher), DataSpec(dataset="cifar10",
                                                              augment="standard"),
                                spec.teacher.replay, ["logits"], []),
        "views": replay_key(str(digits_teacher), spec.data,
                            replay_job(tmp_path, views=4, topk=4).teacher.replay, ["logits"], []),
        "k": replay_key(str(digits_teacher), spec.data,
                        replay_job(tmp_path, views=3, topk=5).teacher.replay, ["logits"], []),
        "scores": replay_key(str(digits_teacher), spec.data, spec.teacher.replay,
                             ["head:stage1", "logits"], []),
    }
    for what, key in changed.items():
        assert key not in (base, cifar_key), f"a changed {what} hit the same store entry"
    assert base == replay_key(str(digits_teacher), replay_job(tmp_path, 3, 4).data,
                              spec.teacher.replay, ["logits"], [])
    # the data factory's code is part of the transform: an edited factory is another entry
    # (tests/test_teacher_store.py checks data_identity's fingerprint for edits)


def test_a_killed_fill_resumes_and_a_damaged_entry_is_filled_again(tmp_path, digits_teacher):
    spec = replay_job(tmp_path, views=3, topk=4)
    train = load_dataset(spec.data).train
    views = ReplayedViews(train, spec.teacher.replay, student_seed=0)
    batches_per_view = -(-len(train) // spec.data.eval_batch_size)
    dying = Counting(digits_teacher, fail_after=batches_per_view + 1)   # mid-way through view 2
    with pytest.raises(KeyboardInterrupt):
        replayed(spec, digits_teacher, views, lambda: dying, [], cache="resumed")
    messages: list[str] = []
    resumed = Counting(digits_teacher)
    replayed(spec, digits_teacher, views, lambda: resumed, messages, cache="resumed")
    assert any("resuming, 1 of 3 views stored" in m for m in messages)
    assert resumed.calls == 2 * batches_per_view, "the stored view was computed again"
    whole = Counting(digits_teacher)
    replayed(spec, digits_teacher, views, lambda: whole, [], cache="whole")
    key = replay_key(str(digits_teacher), spec.data, spec.teacher.replay, ["logits"], [])
    a = FeatureCache(spec.run_dir.parent / "resumed").load(key)
    b = FeatureCache(spec.run_dir.parent / "whole").load(key)
    # what the README and docs/teachers.md say a view of an image costs: 4k + 6 bytes
    rows = 3 * len(train)
    assert sum(t.numel() * t.element_size() for t in a.values()) == rows * (4 * 4 + 6)
    assert a.keys() == b.keys()
    for name in a:    # resuming stores what an uninterrupted fill stores
        assert torch.equal(a[name], b[name]), name
    # damage a stored array (same size): detected, discarded, filled again
    entry = spec.run_dir.parent / "whole" / key
    target = next(p for p in sorted(entry.glob("tap-*.npy")))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    refill: list[str] = []
    again = Counting(digits_teacher)
    replayed(spec, digits_teacher, views, lambda: again, refill, cache="whole")
    assert any("replay store miss" in m for m in refill) and again.calls == 3 * batches_per_view
    fresh = FeatureCache(spec.run_dir.parent / "whole").load(key)
    assert all(np.array_equal(fresh[n].numpy(), a[n].numpy()) for n in a)


@pytest.mark.parametrize("sections, message", [
    ({"methods": {"cd": {}}}, "teacher.replay: method cd reads the teacher's features"),
    ({"methods": {"hints": {"method": "fitnets"}}},
     "teacher.replay: method hints (fitnets) reads the teacher's features"),
    ({"data": {"dataset": "digits", "batch_size": 64}},
     "teacher.replay: the training data is not augmented"),
])
def test_jobs_that_cannot_replay_are_told_in_one_line_before_ray(tmp_path, sections, message):
    spec = replay_job(tmp_path, **sections)
    with pytest.raises(RaykdError) as err:
        preflight(spec, load_dataset(spec.data))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_methods_that_read_class_scores_or_no_teacher_outputs_may_replay(tmp_path):
    spec = replay_job(tmp_path, methods={"ce": {}, "ls": {"method": "kd", "transform": "ls"},
                                         "dist": {}, "dkd": {}, "top2": {"method": "kd",
                                                                         "transform": "topk",
                                                                         "k": 2}})
    preflight(spec, load_dataset(spec.data))     # no line: each is served (or needs nothing)


def test_kd_and_dih_students_train_on_replayed_views_with_every_row(ray_session, tmp_path):
    """A job on augmented data: the teacher trains online, the DIH heads on its stage maps; the
    KD (Tang's partial teacher) and DIH students train on replayed views, one fill per teacher
    and method scores (KD's by the teacher's own lane), and finish with every row."""
    spec = replay_job(tmp_path, views=2, topk=3, methods={
        "kd_pt": {"method": "kd", "transform": "pt"}, "dih": {}},
        heads={"train": {"epochs": 1, "lr": 0.05}},
        student={"model": "cnn_small", "train": {"epochs": 2, "lr": 0.1}})
    rows = run_job(spec)
    students = rows[rows.role == "student"].set_index("method")
    assert set(students.index) == {"kd_pt", "dih"}
    assert students.val_top1.notna().all() and students.test_top1.notna().all()
    assert (students.epochs == 2).all()
    manifests = [json.loads(p.read_text())
                 for p in (tmp_path / "feature_cache").glob("*/manifest.json")]
    replays = sorted(sorted(m["taps"]) for m in manifests if "label" in m["taps"])
    # KD's entry was filled by the teacher's lane once it had trained (before any student
    # started); DIH's, which needs the heads trained after the teacher, by the DIH student
    assert sorted(m["filled_by"] for m in manifests if "label" in m["taps"]) == \
        ["seed0-dih", "seed0-teacher"]
    # one replay entry per (teacher, scores): KD's logits; DIH's heads and the teacher's logits
    assert replays == [
        sorted([f"{n}.{part}" for n in ("head:stage1", "head:stage2", "head:stage3", "logits")
                for part in ("classes", "label", "rest", "topk")] + ["label"]),
        ["label", "logits.classes", "logits.label", "logits.rest", "logits.topk"]], replays
