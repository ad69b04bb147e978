"""Job specs: typed loading, overrides, and errors that name the field and the allowed values."""
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raykd.errors import RaykdError, one_line
from raykd.job.config import job_from_dict, load_job
from raykd.job.specs import JobSpec

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
    ("student.foo=1", "unknown key student.foo; allowed under student: model, model_args, "
                      "stages, weights"),
    ("student.train.epochs=abc", "student.train.epochs: expected an integer, got 'abc'"),
    ("data.augment=3", "data.augment: unknown 3; allowed: auto, standard, cifar, none"),
    ("data.augment=cifar", "data.augment=cifar: mnist5k is held in memory as normalised tensors"),
    ("data.args={root:x}", "data.args are the keyword arguments of a torchvision:CLASS dataset"),
    ("data.dataset=torchvision:MNST", "unknown torchvision dataset class 'MNST'; close: MNIST"),
    ("data.dataset=cifar7", "unknown dataset 'cifar7'; allowed: cifar10, cifar100, digits"),
    ("student.model=resnet9", "unknown model 'resnet9'; allowed:"),
    ("methods.x.method=nope", "methods.x: unknown method 'nope'; allowed: at, cd, ce, crd, dih, dist"),
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


@pytest.mark.parametrize("text,message", [
    ("", "the job file is empty"),
    ("# only a comment\n", "the job file is empty"),
    ("seeds: [0]\nseeds: [1]\n", "duplicate key 'seeds' (line 2)"),
    ("student: {train: {epochs: 0}}", "student.train.epochs must be at least 1, got 0"),
    ("teacher: {train: {epochs: -3}}", "teacher.train.epochs must be at least 1, got -3"),
    ("data: {batch_size: 0}", "data.batch_size must be at least 1, got 0"),
    ("data: {train_size: -5}", "data.train_size must be at least 1, got -5"),
    ("student: {train: {lr: 0}}", "student.train.lr must be positive, got 0.0"),
    ("methods: {kd: {temperature: 0}}", "methods.kd.temperature must be positive"),
    ("methods: {kd: {temperature: hot}}", "methods.kd.temperature: expected a number, got 'hot'"),
    ("methods: {dih: {alpha: -0.1}}", "methods.dih.alpha must be in [0, 1], got -0.1"),
    ("methods: {dih: {alphas: [0.5, 1.5]}}", "methods.dih.alphas[1] must be in [0, 1], got 1.5"),
    ("methods: {cd: {warmup: 1}}", "methods.cd.warmup must be in [0, 1) (a fraction of the run), got 1.0"),
    ("methods: {nd: {method: neighbourhood, alpha: 2}}", "methods.nd.alpha must be in [0, 1]"),
    ("methods: {nd: {method: neighbourhood, train: {epochs: 0}}}",
     "methods.nd.train.epochs must be at least 1"),
    ("methods: {nd: {method: neighbourhood, bn_recalibration: -1}}",
     "methods.nd.bn_recalibration must be >= 0 (0 turns it off), got -1"),
])
def test_bad_job_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(RaykdError) as err:
        load_job(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_paths_that_cannot_work_are_refused_before_ray(tmp_path):
    from raykd.job.config import check_writable

    a_file = tmp_path / "plain.txt"
    a_file.write_text("not a folder")
    with pytest.raises(RaykdError, match="data.root: .* is a file"):
        load_job(_write(tmp_path, {"data": {"dataset": "cifar10", "root": str(a_file)}}))
    fake = tmp_path / "teacher.pt"
    fake.write_bytes(b"not a torch file at all")
    with pytest.raises(RaykdError, match="teacher.checkpoint: .*teacher.pt: not a raykd file"):
        load_job(_write(tmp_path, {"teacher": {"checkpoint": str(fake)}}))
    spec = load_job(_write(tmp_path, {"output_dir": str(a_file / "below")}))
    with pytest.raises(RaykdError, match="output_dir: cannot write to"):
        check_writable(spec)
    with pytest.raises(RaykdError, match="unbalanced brackets"):
        load_job(_write(tmp_path, {}), ["seeds=[0,1"])


def test_an_export_carrying_a_pickled_callable_is_refused(tmp_path):
    import os

    import torch

    marker = tmp_path / "ran"

    class Payload:   # unpickling this would run os.system
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"kind": "model", "arch": Payload()}, bad)
    from raykd.models.export import load_export
    with pytest.raises(RaykdError, match="evil.pt: not a raykd file that can be loaded safely"):
        load_export(bad)
    assert not marker.exists()


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.text(alphabet="abcdeklmnorstuy._=[]{}:,0123456789- '\"", max_size=30),
                          max_size=3))
def test_random_overrides_load_or_fail_with_one_line(tmp_path_factory, overrides):
    path = tmp_path_factory.mktemp("prop") / "job.yaml"
    path.write_text("seeds: [0]\n")
    try:
        load_job(path, overrides)
    except RaykdError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=150, deadline=None)
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "seeds", "data", "student", "teacher", "methods", "train",
                         "epochs", "lr", "kd", "ray", "heads", "x"]), inner, max_size=4),
    max_leaves=12))
def test_random_yaml_loads_or_fails_with_one_line(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("prop") / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_job(path)
    except RaykdError as e:
        assert str(e) and "\n" not in str(e)


def test_an_exception_is_told_in_one_short_line():
    e = ValueError("Traceback (most recent call last):\n  ...\n\n  boom  \n")
    assert one_line(e) == "boom"
    assert one_line(e, first=True, typed=True) == "ValueError: Traceback (most recent call last):"
    assert one_line(KeyError()) == "KeyError" and one_line(OSError(" \n "), typed=True) == "OSError"
    assert one_line(ValueError("x" * 10**6)) == "x" * 300 + "…", "a quoted value is never megabytes"
    assert one_line(ValueError("abcdef"), typed=True, limit=3) == "ValueError: abc…"


def _bomb(levels: int = 9) -> str:
    """A 'billion laughs' job: each alias level multiplies the value by nine."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize("text,message", [
    (_bomb() + "\nseeds: *l8\n", "its aliases expand to more than 100,000 values"),
    (_bomb() + "\nmethods: {kd: {teachers: *l8}}\n", "its aliases expand to more than"),
    ("seeds: [" + ",".join(["0"] * 600_000) + "]\n", "larger than 1024 KiB"),
    ("seeds: [" + ",".join(str(i) for i in range(10_000)) + "]\nmethods: {kd: {}}\n",
     "seeds: 10000 seeds; a job takes at most 100"),
    ("name: ../escape\nmethods: {kd: {}}\n", "name: '../escape' is not a job name"),
    ("name: /tmp/abs\nmethods: {kd: {}}\n", "name: '/tmp/abs' is not a job name"),
    ("name: ''\nmethods: {kd: {}}\n", "name: '' is not a job name"),
    ("name: ..\nmethods: {kd: {}}\n", "name: '..' is not a job name"),
])
def test_hostile_job_files_are_one_line_in_seconds_and_bounded_memory(tmp_path, text, message):
    """Each in a fresh process (the `raykd` command's own reading of a job), killed past 60 s;
    its peak memory must stay within 300 MB of what importing raykd takes."""
    import subprocess
    import sys

    path = tmp_path / "job.yaml"
    path.write_text(text)
    code = ("import resource, sys\nfrom raykd.job.config import load_job\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_job(sys.argv[1])\nexcept Exception as e:\n"
            "    print(type(e).__name__ + ': ' + str(e))\n"
            "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=60)
    out = done.stdout.strip().splitlines()
    assert out[0].startswith("RaykdError: ") and message in out[0], done.stdout[-500:]
    assert len(out[0]) < 400, "a one-line error quotes a short prefix, never the value"
    assert int(out[-1].split()[1]) < 300_000, out[-1]


def test_gpu_fractions_reach_the_runs_scaling_config_and_ddp_needs_whole_gpus(tmp_path):
    """`ray.gpus_per_worker: 0.25` puts four packed lanes on one GPU: the job's runs ask Ray Train
    for a quarter GPU per worker (checked without a GPU); data-parallel workers with fractions are
    refused in one line (NCCL refuses two ranks on one device)."""
    from raykd.train.runner import RunSettings, trainer_for

    from conftest import small_job

    spec = job_from_dict(small_job(tmp_path, ray={"workers": 1, "gpus_per_worker": 0.25}))
    settings = RunSettings.for_job(spec, 10, (1, 8, 8))
    scaling = trainer_for({"units": []}, settings, 1, 1.0, "x").scaling_config
    assert scaling.use_gpu and scaling.resources_per_worker["GPU"] == 0.25
    assert RunSettings.for_job(job_from_dict(small_job(tmp_path)), 10, (1, 8, 8)) \
        .gpus_per_worker == 0.0, "CPU unless asked"
    with pytest.raises(RaykdError, match="data-parallel workers need a whole GPU each"):
        job_from_dict(small_job(tmp_path, ray={"workers": 2, "gpus_per_worker": 0.5}))
