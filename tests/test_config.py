"""Job specs: typed loading, overrides, and errors that name the field and the allowed values."""
from pathlib import Path

import pytest
import yaml

from raykd.config import load_job
from raykd.errors import RaykdError
from raykd.specs import JobSpec

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _write(tmp_path, data) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_every_shipped_job_loads_and_is_short():
    paths = sorted(JOBS.glob("*.yaml"))
    assert paths
    for path in paths:
        spec = load_job(path)
        assert isinstance(spec, JobSpec)
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) <= 30, f"{path.name} has {len(lines)} lines"


def test_defaults_and_dotted_overrides(tmp_path):
    spec = load_job(_write(tmp_path, {"methods": {"kd": {"temperature": 2}}}),
                    ["student.train.epochs=3", "seeds=[4,5]", "methods.kd.alpha=0.5",
                     "teacher.train.weight_decay=1e-4", "data.train_size=400"])
    assert spec.name == "job"  # from the file name
    assert spec.student.train.epochs == 3 and spec.seeds == [4, 5]
    assert spec.methods["kd"] == {"temperature": 2, "alpha": 0.5}
    assert spec.teacher.train.weight_decay == pytest.approx(1e-4)
    assert spec.data.train_size == 400
    assert spec.student.train.lr == 0.05  # typed default


@pytest.mark.parametrize("override,message", [
    ("student.foo=1", "unknown key student.foo; allowed under student: model, train"),
    ("student.train.epochs=abc", "student.train.epochs: expected an integer, got 'abc'"),
    ("data.augment=3", "data.augment: expected true or false"),
    ("data.dataset=cifar7", "unknown dataset 'cifar7'; allowed: cifar10, cifar100, digits"),
    ("student.model=resnet9", "unknown model 'resnet9'; allowed:"),
    ("methods.x.method=nope", "methods.x: unknown method 'nope'; allowed: cd, ce, dih, feed, kd"),
    ("methods.kd.alpha=1.5", "methods.kd.alpha must be in [0, 1]"),
    ("methods.kd.temp=4",
     "unknown key methods.kd.temp; allowed under methods.kd: temperature, alpha, transform"),
    ("student.train.optimizer=lbfgs", "student.train.optimizer: unknown 'lbfgs'; allowed: sgd, adam"),
    ("student.train.lr_milestones=[60,120]", "fractions of the run"),
    ("seeds=[]", "seeds: give at least one seed"),
    ("teacher.placement=gpu", "teacher.placement: unknown 'gpu'; allowed: auto, local, actors"),
    ("heads.layout=mixed", "heads.layout: unknown 'mixed'; allowed: together, separate"),
    ("methods.kd.transform=soft", "methods.kd.transform: unknown 'soft'; allowed: none, ls, pt"),
    ("methods.kd.teachers=all", "methods.kd.teachers: unknown 'all'; allowed: first, best"),
    ("methods.nd.method=neighbourhood methods.nd.inputs=noise", "methods.nd.inputs: unknown"),
    ("epochs", "is not key=value"),
])
def test_bad_input_names_the_field(tmp_path, override, message):
    with pytest.raises(RaykdError) as err:
        load_job(_write(tmp_path, {}), override.split(" "))
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RaykdError, match="job file not found"):
        load_job(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(RaykdError, match="not valid YAML"):
        load_job(bad)
    bad.write_text("- a list")
    with pytest.raises(RaykdError, match="must be a YAML mapping"):
        load_job(bad)
