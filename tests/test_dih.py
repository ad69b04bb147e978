"""DIH: the cohort loss, heads on a frozen teacher trained as Ray Train runs, cohort distillation."""
import pandas as pd
import pytest
import ray
import torch

from raykd.data import load_dataset
from raykd.driver.pipeline import run_job
from raykd.driver.plan import plan_units, preflight
from raykd.errors import RaykdError
from raykd.files import file_hash
from raykd.job.config import job_from_dict
from raykd.losses import dih_loss
from raykd.models.export import load_heads

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
    # a member with weight 0 is skipped, CE term included (the official train_dih.py:
    # `if alpha_value != 0.0: loss += kd_loss(...)`): only member 2, 0.5 T^2 KL_2 + 0.5 CE
    assert dih_loss(S, COHORT, Y, [0.0, 0.5], 2.0).item() == pytest.approx(0.8635377337573695,
                                                                          rel=1e-6)
    ce = torch.nn.functional.cross_entropy(S, Y)
    assert dih_loss(S, COHORT, Y, [0.0, 0.0], 2.0).item() == pytest.approx(ce.item())


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
    from raykd.teacher.service import TeacherClient, TeacherService

    before = file_hash(teacher_export)
    job = small_job(tmp_path, name="served", methods={"dih": {"heads": ["stage1", "stage3"],
                                                              "chain": 2}})
    # the teacher served by two shard actors: the checksum must be of *their* weights
    job["teacher"] = {"model": "cnn", "checkpoint": str(teacher_export), "placement": "actors",
                      "shards": 2, "cpus_per_shard": 0.5}
    job["heads"] = {"train": {"epochs": 2, "lr": 0.05}}
    spec = job_from_dict(job)
    df = run_job(spec)
    heads = df[df.role == "head"]
    # heads on the job's teacher for link 1, and on link 1's student for link 2
    assert sorted(heads.unit.unique()) == ["seed0-dih.1-heads-stage1+stage3",
                                           "seed0-heads-stage1+stage3"]
    assert heads.val_top1.between(0, 1).all() and heads.test_top1.between(0, 1).all()
    service = TeacherService("checksum-probe", teacher_export, (1, 8, 8), shards=2,
                             cpus_per_shard=0.5)
    try:
        service.wait_ready()
        served = TeacherClient(service.handle).checksum()
    finally:
        service.stop()
    first = heads[heads.unit == "seed0-heads-stage1+stage3"]
    # before == after, and both are the served weights' checksum (features and evaluation)
    assert set(first.teacher_checksum) == {f"{served}/{served}"}
    assert file_hash(teacher_export) == before             # and on disk
    students = df[df.role == "student"].set_index("method")
    assert sorted(students.index) == ["dih.1", "dih.2"] and students.test_top1.between(0, 1).all()
    hist = pd.read_parquet(spec.run_dir / "metrics" / "seed0-dih.2.parquet")
    assert "loss_dih" in hist and hist.loss_dih.iloc[-1] < hist.loss_dih.iloc[0]


def test_the_served_checksum_is_of_the_served_weights(ray_session, tmp_path, teacher_export):
    from raykd.models import build_model
    from raykd.models.export import save_export
    from raykd.teacher import LocalTeacher
    from raykd.teacher.service import TeacherClient, TeacherService

    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    save_export(build_model("cnn", 10, 1, 8), other, 10, 1, 8)
    sums = {}
    for name, export in (("a", teacher_export), ("b", teacher_export), ("c", other)):
        service = TeacherService(f"probe-{name}", export, (1, 8, 8), shards=2, cpus_per_shard=0.5)
        try:
            service.wait_ready()
            sums[name] = TeacherClient(service.handle).checksum()
        finally:
            service.stop()
    assert sums["a"] == sums["b"] != sums["c"]
    assert LocalTeacher(teacher_export).checksum() != LocalTeacher(other).checksum()


def test_a_dih_student_uses_the_trained_heads_and_never_untrained_ones(tmp_path):
    from raykd.methods import MethodContext, Step, build_method
    from raykd.methods.dih import HEADS
    from raykd.models import build_model
    from raykd.models.export import save_heads
    from raykd.models.heads import build_heads

    torch.manual_seed(0)
    student, teacher = build_model("cnn_small", 10, 1, 8), build_model("cnn", 10, 1, 8).eval()
    trained = build_heads(teacher, ["stage1", "stage3"], (1, 8, 8), 10, False, 1)
    ctx = MethodContext(student=student, num_classes=10, input_shape=(1, 8, 8), teacher=teacher)
    with pytest.raises(RaykdError, match="no trained heads"):
        build_method("dih", {"heads": ["stage1", "stage3"]}, ctx)
    save_heads(trained, tmp_path / "trained.pt", 10)    # as its heads unit exports them
    ctx.inputs = {HEADS: [str(tmp_path / "trained.pt")]}
    dih = build_method("dih", {"heads": ["stage1", "stage3"], "temperature": 2.0}, ctx)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with torch.no_grad():
        t = teacher.features(x, ["stage1", "stage3", "logits"])
    step = Step(x=x, y=y, student=student.features(x, ["logits"]), teacher=t, epoch=0, epochs=1)
    cohort = [trained["stage1"](t["stage1"]), trained["stage3"](t["stage3"]), t["logits"]]
    expected = dih_loss(step.student["logits"], cohort, y, 0.1, 2.0)
    assert dih.losses(step)["dih"].item() == pytest.approx(expected.item(), rel=1e-6)
    save_heads(build_heads(teacher, ["stage1", "stage3"], (1, 8, 8), 10, False, 2),
               tmp_path / "other.pt", 10)
    ctx.inputs = {HEADS: [str(tmp_path / "other.pt")]}
    other = build_method("dih", {"heads": ["stage1", "stage3"], "temperature": 2.0}, ctx)
    assert abs(other.losses(step)["dih"].item() - expected.item()) > 1e-4


def test_a_chain_works_with_the_method_taken_from_the_label(tmp_path):
    spec = job_from_dict(small_job(tmp_path, methods={"dih": {"chain": 2}}))
    units = {u.key: u for u in plan_units(spec, load_dataset(spec.data))}
    link2 = units["seed0-dih.2"]
    assert link2.method_name == "dih" and link2.teacher_candidates == [units["seed0-dih.1"].export_path]
    assert link2.method_inputs == {"heads": [units["seed0-dih.1-heads"].export_path]}
    assert units["seed0-dih.1-heads"].teacher_candidates == [units["seed0-dih.1"].export_path]
    assert set(link2.depends_on) == {"seed0-dih.1", "seed0-dih.1-heads"}
    preflight(spec, load_dataset(spec.data))


def test_heads_packed_as_workers_of_one_run_equal_heads_trained_together(ray_session, tmp_path,
                                                                         teacher_export):
    from raykd.teacher import TeacherHandle
    from raykd.train.runner import RunSettings, fit_units

    together = _dih_job(tmp_path, teacher_export, "together", "together")
    separate = _dih_job(tmp_path, teacher_export, "separate", "separate")
    splits = load_dataset(together.data)
    weights = {}
    for spec in (together, separate):
        units = [u for u in plan_units(spec, splits) if u.role == "head"]
        assert len(units) == (1 if spec is together else 2)
        for u in units:
            u.teachers = [TeacherHandle(str(teacher_export), "local")]
        # the separate heads as one pack: one run, one head per worker, no gradient exchange
        rows = ray.get(fit_units.remote(units, RunSettings(
            str(spec.run_dir / "ray"), 10, splits.input_shape, max_failures=0)))
        assert all(not isinstance(r, BaseException) for r in rows.values()), rows
        assert {r[0]["packed"] for r in rows.values()} == {len(units)}
        weights[spec.name] = load_heads([u.export_path for u in units])
    for stage in ("stage1", "stage3"):
        a = weights["together"][stage].state_dict()
        b = weights["separate"][stage].state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (stage, k)
