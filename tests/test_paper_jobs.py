"""Every paper job in jobs/ runs end to end (every unit: teachers, heads, neighbourhood parts,
students, chains) for one optimisation step, on synthetic arrays of its input shape: CIFAR and
ImageNet are absent here, and a GPU too, so data, epochs and devices are overridden and nothing
else. A job that cannot plan, build its methods against its own architectures, train or export
fails here."""
from pathlib import Path

import pytest

from raykd.driver.pipeline import run_job
from raykd.job.config import load_job

JOBS = Path(__file__).resolve().parent.parent / "jobs"
# channels, image size and classes of each paper dataset, the images made small: a job's models
# and methods are what is tested, and every model here takes any size its strides allow (a
# ResNet's ImageNet stem and four stages downsample by 32: 64 leaves it a 2x2 map)
SHAPES = {"cifar10": (3, 16, 10), "cifar100": (3, 16, 100), "imagenet": (3, 64, 1000)}
PAPER_JOBS = sorted(p.name for p in JOBS.glob("*.yaml")
                    if p.name.startswith(("cifar", "imagenet")))


def one_step(job: Path, out: Path) -> list[str]:
    """Overrides that keep the job's models and methods and make every unit one step long."""
    spec = load_job(job)
    channels, size, classes = SHAPES[spec.data.dataset]
    batch = 4
    overrides = [
        f"output_dir={out}", "seeds=[0]",
        f"data={{dataset: gaussian, batch_size: {batch}, eval_batch_size: 8, train_size: "
        f"{batch}, val_size: 4, test_size: 4, loader_workers: 0, gaussian: {{num_classes: "
        f"{classes}, channels: {channels}, image_size: {size}, samples: 40}}}}",
        "teacher.train.epochs=1", "student.train.epochs=1", "heads.train.epochs=1",
        "ray.use_gpu=false", "ray.workers=1", "ray.cpus_per_worker=1", "ray.max_failures=0",
        "teacher.cache=false"]
    for label, entry in spec.methods.items():
        for key in ("finetune_epochs", "scratch_epochs"):
            if entry and entry.get(key):
                overrides.append(f"methods.{label}.{key}=1")
        if entry and isinstance(entry.get("train"), dict):
            overrides.append(f"methods.{label}.train.epochs=1")
    return overrides


def test_every_paper_dataset_is_covered():
    assert len(PAPER_JOBS) >= 8
    for name in PAPER_JOBS:
        assert load_job(JOBS / name).data.dataset in SHAPES


@pytest.mark.parametrize("name", PAPER_JOBS)
def test_paper_job_runs_one_step_end_to_end(ray_session, tmp_path, name):
    spec = load_job(JOBS / name, one_step(JOBS / name, tmp_path))
    df = run_job(spec)
    students = df[df.role == "student"]
    for label in spec.methods:   # every method trained a student (chains: every link)
        assert any(m == label or m.startswith(f"{label}.") for m in students.method), label
    assert df.val_top1.between(0, 1).all() and (df.epochs <= 1).all()
    assert all(Path(e).is_file() for e in df.export)
