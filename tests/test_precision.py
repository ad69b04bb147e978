"""Mixed precision, channels_last and torch.compile in the training step (raykd.train.precision),
on CPU: bf16 losses track fp32's, fp16's loss scaler resumes from the checkpoint, compile keeps
the module's checkpoint keys, and a real run trains with all of them."""
import pytest
import torch

from raykd.driver.pipeline import run_job
from raykd.files import torch_load
from raykd.job.config import job_from_dict
from raykd.job.specs import OptimSpec
from raykd.losses import kd_loss
from raykd.models import build_model
from raykd.train.precision import StepPrecision

from conftest import small_job

CPU = torch.device("cpu")


def test_bf16_losses_track_fp32_within_two_percent():
    torch.manual_seed(0)
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn", 10, 1, 28).eval()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def losses(precision):
        step = StepPrecision(OptimSpec(precision=precision), CPU)
        with step.autocast():
            z_s = student(x)
            with torch.no_grad():
                z_t = teacher(x)
            ce = torch.nn.functional.cross_entropy(z_s, y)
            kd = kd_loss(z_s, z_t, 4.0)
        return ce.float().item(), kd.float().item(), z_s.dtype

    ce32, kd32, dtype32 = losses("fp32")
    ce16, kd16, dtype16 = losses("bf16")
    assert dtype32 == torch.float32 and dtype16 == torch.bfloat16, "bf16 really ran"
    assert ce16 == pytest.approx(ce32, rel=0.02) and kd16 == pytest.approx(kd32, rel=0.02)


def test_the_fp16_loss_scaler_is_checkpointed_and_restored(tmp_path):
    from types import SimpleNamespace

    from raykd.train.progress import Progress

    model = build_model("cnn_small", 10, 1, 28)
    unit = SimpleNamespace(key="u", settings="s", state_dir=str(tmp_path), history_path="",
                           resume_dir="", fail_at_epoch=None)

    def progress():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        precision = StepPrecision(OptimSpec(precision="fp16"), CPU)
        return Progress(unit, model, opt, sched, CPU, 0, precision), precision

    first, scaler = progress()
    x = torch.randn(8, 1, 28, 28)
    with scaler.autocast():
        loss = model(x).float().logsumexp(1).mean()
    scaler.step(loss, first.optimizer)
    scaler.scaler.update(1234.0)         # a scale the default would never have
    first.save(0, {"epoch": 1})
    assert torch_load(tmp_path / "state-u.pt")["scaler"]["scale"] == 1234.0
    resumed, restored = progress()
    assert resumed.restore() == 1 and restored.scaler.get_scale() == 1234.0


def test_compile_and_channels_last_keep_the_modules_checkpoint_keys():
    model = build_model("cnn_small", 10, 1, 28)
    keys = list(model.state_dict())
    step = StepPrecision(OptimSpec(channels_last=True), CPU)
    step.prepare(model, compile_it=True)
    assert list(model.state_dict()) == keys
    (x,) = step.batch((torch.randn(4, 1, 28, 28),))
    assert x.is_contiguous(memory_format=torch.channels_last)
    out = model(x)
    out.sum().backward()
    assert out.shape == (4, 10) and all(p.grad is not None for p in model.parameters())


def test_a_run_trains_in_bf16_and_fp16_with_channels_last(ray_session, tmp_path):
    job = small_job(tmp_path, name="mixed", methods={"kd": {"temperature": 4, "alpha": 0.9}})
    job["teacher"]["train"].update(precision="fp16")
    job["student"]["train"].update(precision="bf16", channels_last=True)
    spec = job_from_dict(job)
    df = run_job(spec).set_index("unit")
    assert df.val_top1.between(0, 1).all() and (df.epochs == 3).all()
    assert df.loc["seed0-teacher", "val_top1"] > 0.5, "an fp16 teacher still learns digits"
    [state] = list((spec.run_dir / "ray").rglob("state-seed0-teacher.pt"))[:1]
    assert torch_load(state)["scaler"]["scale"] > 0, "the fp16 unit's checkpoint holds its scaler"
