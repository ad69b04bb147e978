"""FEED: the loss, several teachers trained concurrently, parallel and sequential FEED, and the
teacher choices of KD (first, best by validation, ensemble)."""
import pytest
import torch

from raykd.data import load_dataset
from raykd.driver.pipeline import run_job
from raykd.driver.plan import preflight
from raykd.errors import RaykdError
from raykd.job.config import job_from_dict
from raykd.losses import feed_loss
from raykd.models import build_model, count_params
from raykd.models.export import load_export

from conftest import small_job


def test_feed_loss_golden_values():
    # one sample, maps [3, 4] and [1, 0]: N = [.6, .8] and [1, 0]; mean |diff| = (0.4 + 0.8) / 2
    s = torch.tensor([[[[3.0]], [[4.0]]]])
    t = torch.tensor([[[[1.0]], [[0.0]]]])
    assert feed_loss([s], [t]).item() == pytest.approx(0.6)
    # two samples, per-sample normalisation: (|.7071 - 0| + |.7071 - 1| + 0 + 0) / 4 = 0.25
    s2 = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).reshape(2, 2, 1, 1)
    t2 = torch.tensor([[0.0, 2.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    assert feed_loss([s2], [t2]).item() == pytest.approx(0.25, abs=1e-6)
    # summed over teachers; the teacher side gets no gradient
    assert feed_loss([s, s2], [t, t2]).item() == pytest.approx(0.85, abs=1e-6)
    with pytest.raises(ValueError, match="one transformed map per teacher"):
        feed_loss([s], [t, t])


def test_mismatched_feature_shapes_fail_at_start_up(tmp_path):
    job = small_job(tmp_path, methods={"feed": {}})
    job["data"] = {"dataset": "mnist5k"}
    job["teacher"] = {"model": "resnet8"}     # stage3 7x7 against cnn_small's 3x3
    spec = job_from_dict(job)
    with pytest.raises(RaykdError, match=r"teacher 0's stage3 is 64x7x7 but the student's stage3 is 32x3x3"):
        preflight(spec, load_dataset(spec.data))


def test_several_teachers_parallel_and_sequential_feed(ray_session, tmp_path):
    job = small_job(tmp_path, name="feed", methods={
        "kd_best": {"method": "kd", "teachers": "best"},
        "kd_ensemble": {"method": "kd", "teachers": "ensemble"},
        "feed": {},
        "feed_seq": {"method": "feed", "chain": 2}})
    job["teacher"] = {"model": "cnn", "count": 2, "train": {"epochs": 2, "lr": 0.1}}
    job["student"]["train"]["epochs"] = 2
    spec = job_from_dict(job)
    df = run_job(spec).set_index("method")
    teachers = df[df.role == "teacher"]
    assert sorted(teachers.index) == ["ce", "ce.t1"]
    assert teachers.loc["ce", "val_top1"] != teachers.loc["ce.t1", "val_top1"], "different seeds"
    best = teachers.val_top1.idxmax()
    assert df.loc["kd_best", "teachers"] == teachers.loc[best, "unit"]
    assert df.loc["kd_ensemble", "teachers"] == "seed0-teacher,seed0-teacher1"
    assert df.loc["feed", "teachers"] == "seed0-teacher,seed0-teacher1"
    # sequential FEED starts from one pretrained teacher (not parallel FEED over both); the
    # second link distils from the first link's student
    assert df.loc["feed_seq.1", "teachers"] == "seed0-teacher"
    assert df.loc["feed_seq.2", "teachers"] == "seed0-feed_seq.1"
    # the exported students carry no transformations
    plain = count_params(build_model("cnn_small", 10, 1, 8))
    for name in ("feed", "feed_seq.1", "feed_seq.2"):
        assert count_params(load_export(df.loc[name, "export"])) == plain
        assert df.loc[name, "params"] == plain


def test_the_transformation_is_factor_transfers_translator():
    """Channels go in -> in -> out -> out, each conv followed by BatchNorm and LeakyReLU(0.1), as
    Factor Transfer's translator (RepDistiller models/util.py `Translator`): the width changes in
    the second convolution, which matters when student and teacher widths differ."""
    from torch import nn

    from raykd.methods.feed import transformation

    t = transformation(16, 40)
    convs = [(m.in_channels, m.out_channels) for m in t if isinstance(m, nn.Conv2d)]
    assert convs == [(16, 16), (16, 40), (40, 40)]
    assert [type(m).__name__ for m in t] == ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3
    assert all(m.negative_slope == 0.1 for m in t if isinstance(m, nn.LeakyReLU))
    assert t(torch.randn(2, 16, 4, 4)).shape == (2, 40, 4, 4)
