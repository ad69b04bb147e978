"""DIH: the cohort loss, heads on a frozen teacher trained as Ray Train runs, cohort distillation."""
import pytest
import ray
import torch

from raykd.config import job_from_dict
from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.files import file_hash
from raykd.losses import dih_loss
from raykd.models.export import load_heads
from raykd.pipeline import run_job
from raykd.plan import plan_units, preflight, teacher_architectures

from conftest import small_job

S = torch.tensor([[1.0, 0.0, -1.0]])
COHORT = [torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0, 0.0]])]
Y = torch.tensor([1])


def test_dih_loss_golden_values():
    # hand-computed with math.exp from the paper's loss: sum_j [a T^2 KL_j + (1 - a) CE], a=0.1, T=2
    assert dih_loss(S, COHORT, Y, 0.1, 2.0).item() == pytest.approx(2.6476144228971257, rel=1e-6)
    # ce_once: sum_j a T^2 KL_j + (1 - a) CE
    once = dih_loss(S, COHORT, Y, 0.1, 2.0, ce_once=True).item()
    assert once == pytest.approx(1.3807690548971832, rel=1e-6)
    # per-member weights a_j = (0.2, 0.5)
    assert dih_loss(S, COHORT, Y, [0.2, 0.5], 2.0).item() == pytest.approx(2.153575978493284, rel=1e-6)
    with pytest.raises(ValueError, match="2 cohort members"):
        dih_loss(S, COHORT, Y, [0.1, 0.1, 0.1], 2.0)


def test_a_stage_that_does_not_exist_is_a_clear_error(tmp_path):
    spec = job_from_dict(small_job(tmp_path, methods={"dih": {"heads": ["stage1", "stage9"]}}))
    with pytest.raises(RaykdError, match="the teacher has no stage 'stage9'; it has stage1, stage2, stage3"):
        preflight(spec, load_dataset(spec.data))


@pytest.fixture
def teacher_export(digits_teacher):
    return digits_teacher


def _dih_job(tmp_path, teacher_export, name, layout):
    job = small_job(tmp_path, name=name, methods={"dih": {"heads": ["stage1", "stage3"]}})
    job["teacher"] = {"model": "cnn", "checkpoint": str(teacher_export)}
    job["heads"] = {"layout": layout, "train": {"epochs": 2, "lr": 0.05}}
    return job_from_dict(job)


def test_heads_then_cohort_distillation_with_the_teacher_untouched(ray_session, tmp_path, teacher_export):
    before = file_hash(teacher_export)
    spec = _dih_job(tmp_path, teacher_export, "together", "together")
    df = run_job(spec)
    heads = df[df.role == "head"]
    assert sorted(heads.method) == ["stage1", "stage3"]
    assert heads.val_top1.between(0, 1).all() and heads.test_top1.between(0, 1).all()
    assert heads.teacher_checksum.nunique() == 1          # checked before and after in the worker
    assert file_hash(teacher_export) == before             # and on disk
    student = df[df.role == "student"].iloc[0]
    assert student.method == "dih" and 0 <= student.test_top1 <= 1
    import pandas as pd
    hist = pd.read_parquet(spec.run_dir / "metrics" / "seed0-dih.parquet")
    assert "loss_dih" in hist and hist.loss_dih.iloc[-1] < hist.loss_dih.iloc[0]


def test_heads_as_separate_runs_equal_heads_trained_together(ray_session, tmp_path, teacher_export):
    from raykd.teacher import TeacherHandle
    from raykd.train.runner import fit_unit

    together = _dih_job(tmp_path, teacher_export, "together", "together")
    separate = _dih_job(tmp_path, teacher_export, "separate", "separate")
    splits = load_dataset(together.data)
    weights = {}
    for spec in (together, separate):
        units = [u for u in plan_units(spec, teacher_architectures(spec, splits)[0])
                 if u.role == "head"]
        assert len(units) == (1 if spec is together else 2)
        for u in units:
            u.teachers = [TeacherHandle(str(teacher_export), "local")]
        ray.get([fit_unit.remote(u, str(spec.run_dir / "ray"), 1, False, 0, 10, splits.input_shape)
                 for u in units])
        weights[spec.name] = load_heads([u.export_path for u in units])
    for stage in ("stage1", "stage3"):
        a = weights["together"][stage].state_dict()
        b = weights["separate"][stage].state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (stage, k)
