"""Methods against real models: the dict of named losses, extra modules, start-up checks."""
import pandas as pd
import pytest
import torch

from raykd.driver.pipeline import run_job
from raykd.driver.plan import preflight
from raykd.errors import RaykdError
from raykd.job.config import job_from_dict
from raykd.methods import MethodContext, Step, build_method, method_names
from raykd.models import build_model, count_params

from conftest import small_job


def _step(student, teacher, method, epoch=0, epochs=10, n=4):
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    with torch.no_grad():
        t_out = teacher.eval().features(x, method.teacher_taps())
    return Step(x=x, y=y, student=student.features(x, method.student_taps()), teacher=t_out,
                epoch=epoch, epochs=epochs)


def _ctx(student, teacher):
    return MethodContext(student=student, num_classes=10, input_shape=(1, 28, 28), teacher=teacher)


def test_channel_distillation_losses_connectors_and_edt_weights():
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn_wide", 10, 1, 28)
    cd = build_method("cd", {"edt": True}, _ctx(student, teacher))
    # one connector per stage, mapping student widths (8, 16, 32) to the teacher's (64, 128, 256)
    assert [c[0].out_channels for c in cd.modules()] == [64, 128, 256]
    warm = cd.losses(_step(student, teacher, cd, epoch=0))
    assert set(warm) == {"ce", "gkd", "cd"}
    assert warm["ce"].item() == 0 and warm["gkd"].item() == 0 and warm["cd"].item() > 0
    later = cd.losses(_step(student, teacher, cd, epoch=9))
    assert later["ce"].item() > 0
    assert cd.loss_weights(9, 10) == pytest.approx({"ce": 1.0, "gkd": 0.1, "cd": 6 * 0.9 ** 2})
    # gradients reach the connectors and the student
    sum(later.values()).backward()
    assert cd.modules()[0][0].weight.grad is not None


def test_stage_count_mismatch_fails_at_start_up(tmp_path):
    from raykd.data import load_dataset

    job = small_job(tmp_path, methods={"cd": {}})
    job["teacher"] = {"model": "resnet18"}          # 4 stages against the student's 3
    spec = job_from_dict(job)
    with pytest.raises(RaykdError, match="the student has 3 stages and the teacher 4"):
        preflight(spec, load_dataset(spec.data))
    job = small_job(tmp_path, methods={"kd": {"transform": "topk", "k": 11}})
    spec = job_from_dict(job)
    with pytest.raises(RaykdError, match="k=11 exceeds the 10 classes"):
        preflight(spec, load_dataset(spec.data))


@pytest.mark.parametrize("transform", ["none", "ls", "pt", "sim", "topk"])
def test_tang_reweighting_is_the_runs_true_gradient_ratio(transform):
    # w must be d L / d z_y divided by plain CE's (p_y - 1), at the run's temperature (T=4)
    torch.manual_seed(0)
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn_wide", 10, 1, 28)
    kd = build_method("kd", {"transform": transform, "k": 3, "temperature": 4.0, "alpha": 0.9},
                      _ctx(student, teacher))
    step = _step(student, teacher, kd, n=6)
    z = step.student["logits"].detach().requires_grad_(True)
    step.student = {**step.student, "logits": z}
    terms = kd.losses(step)
    assert set(terms) == {"ce", "kd"} and all(torch.isfinite(v) for v in terms.values())
    (grad,) = torch.autograd.grad(sum(terms.values()), z)
    y = step.y[:, None]
    p_y = torch.softmax(z.detach(), 1).gather(1, y).squeeze(1)
    true_ratio = grad.gather(1, y).squeeze(1) / ((p_y - 1) / len(y))   # both are batch means
    diag = kd.diagnostics(step)
    assert torch.allclose(diag["reweight"], true_ratio, atol=1e-4), (diag["reweight"], true_ratio)
    if transform in ("ls", "sim"):   # untempered targets: the teacher never runs
        assert kd.teacher_taps() == [] and "teacher_true_conf" not in diag
    else:
        assert diag["teacher_true_conf"].shape == (6,)


def test_ls_is_exactly_label_smoothing_at_any_temperature():
    torch.manual_seed(1)
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn_wide", 10, 1, 28)
    kd = build_method("kd", {"transform": "ls", "epsilon": 0.1, "temperature": 4.0, "alpha": 0.9},
                      _ctx(student, teacher))
    step = _step(student, teacher, kd, n=5)
    z = step.student["logits"].detach().requires_grad_(True)
    step.student = {**step.student, "logits": z}
    (ours,) = torch.autograd.grad(sum(kd.losses(step).values()), z)
    (reference,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(z, step.y, label_smoothing=0.1), z)
    assert torch.allclose(ours, reference, atol=1e-6)



def test_cd_and_topk_train_in_a_real_run(ray_session, tmp_path, capsys):
    from raykd.cli import main

    teacher_path = tmp_path / "teacher.pt"
    from raykd.models.export import save_export
    torch.manual_seed(0)
    save_export(build_model("cnn", 10, 1, 8), teacher_path, 10, 1, 8)
    job = small_job(tmp_path, name="cd_tang", methods={
        "cd_gkd_edt": {"method": "cd", "edt": True},
        "kd_top3": {"method": "kd", "transform": "topk", "k": 3},
        "at": {}, "dkd": {}, "dist": {}, "fitnets": {}, "rkd": {}, "crd": {}})
    job["teacher"] = {"model": "cnn", "checkpoint": str(teacher_path)}
    job["student"]["train"]["epochs"] = 4
    spec = job_from_dict(job)
    df = run_job(spec)
    assert sorted(df.method) == ["at", "cd_gkd_edt", "crd", "dist", "dkd", "fitnets", "kd_top3",
                                 "rkd"]
    assert df.val_top1.between(0, 1).all()
    # the exported CD student has exactly the plain student's parameters (no connectors)
    plain = count_params(build_model("cnn_small", 10, 1, 8))
    assert (df.params == plain).all()
    from raykd.models.export import load_export
    assert count_params(load_export(df[df.method == "cd_gkd_edt"].export.iloc[0])) == plain
    # EDT's weights are logged per epoch: CD-only warm-up, then CE on, CD decayed
    hist = pd.read_parquet(spec.run_dir / "metrics" / "seed0-cd_gkd_edt.parquet")
    assert list(hist.w_ce) == [0.0, 1.0, 1.0, 1.0]
    # CD decays in force from 1-based epochs round(0.3 x 4) = 1 and round(0.8 x 4) = 3
    assert list(hist.w_cd.round(4)) == [5.4, 5.4, 4.86, 4.86]
    assert (hist.loss_ce.iloc[0] == 0.0) and hist.loss_ce.iloc[1] > 0
    # KD-topk stored Tang's diagnostics per epoch and `raykd results` summarises them
    diag = pd.read_parquet(spec.run_dir / "diagnostics" / "seed0-kd_top3" / "epoch-0004.parquet")
    assert len(diag) == 1097 and diag.teacher_true_conf.between(0, 1).all()
    capsys.readouterr()
    main(["results", str(spec.run_dir)])
    out = capsys.readouterr().out
    assert "reweight" in out and "teacher_true_conf" in out


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_keeps_the_contract(name, tmp_path):
    """Finite scalar losses, gradients that reach the student and the method's own modules,
    taps that resolve on both models, and logged weights named after its losses."""
    from raykd.models.export import save_heads
    from raykd.models.heads import build_heads

    torch.manual_seed(0)
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn_wide", 10, 1, 28)
    teacher.eval()
    # DIH's trained heads, as its plan hands them to its students (their exports)
    save_heads(build_heads(teacher, teacher.stage_names, (1, 28, 28), 10, False, 0),
               tmp_path / "heads.pt", 10)
    ctx = MethodContext(student=student, num_classes=10, input_shape=(1, 28, 28), teacher=teacher,
                        teachers=[teacher], inputs={"heads": [str(tmp_path / "heads.pt")]},
                        train_size=100)
    method = build_method(name, {}, ctx)
    for tap in method.student_taps():
        student.resolve_tap(tap)
    for tap in method.teacher_taps():
        teacher.resolve_tap(tap)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with torch.no_grad():
        t_out = teacher.features(x, method.teacher_taps()) if method.teacher_taps() else {}
    step = Step(x=x, y=y, student=student.features(x, sorted(set(method.student_taps()) |
                                                               {"logits"})),
                teacher=t_out, epoch=5, epochs=10, teachers=[t_out], index=torch.arange(6))
    terms = method.losses(step)
    assert terms and all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    extra = method.modules()
    if extra is not None:
        assert all(p.grad is not None for p in extra.parameters()), "a module gets no gradient"
    assert set(method.loss_weights(5, 10)) <= set(terms)


def test_a_student_started_from_trained_weights_is_scored_on_test_only_outside_sweeps(
        tmp_path, digits_teacher):
    """A stitched or `student.checkpoint` student is scored before training; a sweep trial
    (evaluate_test False) must not read the test split for it."""
    import byo_data

    from raykd.driver.units import Unit
    from raykd.job import factories
    from raykd.job.specs import DataSpec, OptimSpec
    from raykd.train.model import ModelTrainer

    factories.allow(["byo_data:counted_digits"])

    def initial(evaluate_test: bool) -> tuple[dict, int]:
        """The initial scores, and how many test images were read building and evaluating
        the trainer's final epoch (counted by the dataset itself)."""
        unit = Unit(key="s", role="student", label="ce", method_name="ce", model="cnn",
                    optim=OptimSpec(epochs=1), data=DataSpec(dataset="byo_data:counted_digits"),
                    seed=0, export_path=str(tmp_path / "s.pt"), init_from=str(digits_teacher),
                    evaluate_test=evaluate_test)
        byo_data.TEST_READS.clear()
        trainer = ModelTrainer(unit, 0, 1, torch.device("cpu"))
        trainer.build()
        trainer.evaluate(0, final=True, seen=0)
        return trainer.initial, len(byo_data.TEST_READS)

    scores, reads = initial(True)
    assert set(scores) == {"initial_val_top1", "initial_test_top1", "started_from"}
    assert reads == 2 * 300, "read twice: the initial score and the final one"
    scores, reads = initial(False)       # a sweep trial
    assert set(scores) == {"initial_val_top1", "started_from"} and reads == 0
