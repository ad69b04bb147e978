"""Reading a job: YAML in, a validated `JobSpec` (raykd.job.specs) out, with `key=value` overrides.

A job is about 20 lines of YAML (see jobs/quickstart.yaml). Every field has a typed default, so a
job only states what differs. Overrides use dotted paths: `student.train.epochs=5`,
`methods.kd.temperature=2`, `seeds=[0,1]`. Every mistake is a `RaykdError` naming the field and
what is allowed, raised before any Ray work starts.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from raykd.data import check_dataset_name
from raykd.errors import RaykdError, one_line
from raykd.job import factories
from raykd.job.specs import JobSpec
from raykd.job.typed import apply_overrides, from_dict
from raykd.job.yaml_safe import MAX_BYTES, parse
from raykd.methods import method_params
from raykd.models import check_model_name
from raykd.models.export import read_export
from raykd.models.pretrained import resolve_weights

JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    return job_from_dict(load_raw(path, overrides))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The job file as plain YAML values, overrides applied (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise RaykdError(f"job file not found: {path}")
    if path.stat().st_size > MAX_BYTES:   # before reading it into memory
        raise RaykdError(f"{path}: larger than {MAX_BYTES // 1024} KiB; a job file is a few "
                         "hundred lines at most")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise RaykdError(f"{path}: not valid YAML ({one_line(e, first=True)})") from e
    raw = parse(text, str(path))
    if raw is None:
        raise RaykdError(f"{path}: the job file is empty; see jobs/quickstart.yaml for one")
    if not isinstance(raw, dict):
        raise RaykdError(f"{path}: a job must be a YAML mapping")
    raw.setdefault("name", path.stem)
    return apply_overrides(raw, overrides or [])


def job_from_dict(raw: dict) -> JobSpec:
    spec = from_dict(JobSpec, copy.deepcopy(raw))
    validate(spec)
    return spec


def _resolve(path: str | None) -> str | None:
    # Ray workers run in other folders: relative paths are resolved here, against the caller's
    return None if path is None else str(Path(path).expanduser().resolve())


MAX_SEEDS = 100   # planning is per seed; a job of more is a typo (seeds: 1000) or an attack


def check_name(name: str) -> None:
    """A job's name is its run folder under output_dir: one path component, never `..`."""
    if not (JOB_NAME.fullmatch(name) and name not in (".", "..")):
        raise RaykdError(f"name: {name[:60]!r} is not a job name; use letters, digits, '-', '_' "
                         "and '.' (one folder name inside output_dir, not '.' or '..')")


def validate(spec: JobSpec) -> None:
    """Check ranges and names against the registries so a bad job fails before Ray starts."""
    check_name(spec.name)
    if len(spec.seeds) > MAX_SEEDS:
        raise RaykdError(f"seeds: {len(spec.seeds)} seeds; a job takes at most {MAX_SEEDS} "
                         "(split a larger study into jobs)")
    spec.output_dir = _resolve(spec.output_dir)
    spec.data.root = _resolve(spec.data.root)
    spec.teacher.cache_dir = _resolve(spec.teacher.cache_dir)
    named_weights = spec.teacher.weights     # a timm tag, before it resolves to its file
    spec.teacher.weights = resolve_weights(spec.teacher.model, spec.teacher.weights, "teacher")
    spec.student.weights = resolve_weights(spec.student.model, spec.student.weights, "student")
    checkpoints = {}     # read once: checked here, the teacher's normalisation read below
    for part in (spec.teacher, spec.student):
        where = "teacher" if part is spec.teacher else "student"
        if part.checkpoint is None:
            continue
        part.checkpoint = _resolve(part.checkpoint)
        if not Path(part.checkpoint).is_file():
            raise RaykdError(f"{where}.checkpoint: no such file {part.checkpoint}")
        try:
            checkpoints[where] = read_export(part.checkpoint, "model")
        except RaykdError as e:
            raise RaykdError(f"{where}.checkpoint: {e}") from None
    # after resolve_weights (a bad tag is its one line) and the checkpoint's check
    teacher_norm(spec, named_weights, checkpoints.get("teacher"))
    if spec.ray.workers > 1 and 0 < spec.ray.gpus < 1:
        raise RaykdError(f"ray.gpus_per_worker={spec.ray.gpus_per_worker} with ray.workers="
                         f"{spec.ray.workers}: data-parallel workers need a whole GPU each (NCCL "
                         "refuses two ranks on one device); give 1, or workers: 1 so that units "
                         "are packed onto shared GPUs")
    if spec.student.reinit and not spec.student.checkpoint:
        raise RaykdError("student.reinit needs student.checkpoint (the architecture to re-train)")
    if spec.data.root is not None and Path(spec.data.root).exists() \
            and not Path(spec.data.root).is_dir():
        raise RaykdError(f"data.root: {spec.data.root} is a file; give the folder that holds "
                         "the dataset")
    factories.allow(job_factories(spec))   # the job file names them: this process may import them
    check_data(spec.data)
    models = [spec.teacher.model, *spec.teacher.models, spec.student.model]
    for name in models:
        check_model_name(name)
    if spec.teacher.checkpoint and (spec.teacher.count > 1 or spec.teacher.models):
        raise RaykdError("teacher.checkpoint gives one teacher; drop teacher.count/teacher.models")
    if not spec.seeds:
        raise RaykdError("seeds: give at least one seed")
    if not spec.methods:
        raise RaykdError("methods: give at least one method")
    for label, entry in spec.methods.items():
        method_params(label, entry)
    for where, optim in (("teacher.train", spec.teacher.train), ("student.train", spec.student.train),
                         ("heads.train", spec.heads.train)):
        bad = [m for m in optim.lr_milestones if not 0 < m < 1]
        if bad:
            raise RaykdError(f"{where}.lr_milestones are fractions of the run in (0, 1), got {bad}")
    check_tracking(spec)


IN_MEMORY = ("digits", "mnist5k", "gaussian")   # normalised tensors: nothing to augment


# datasets read from image files, which data.mean and data.std normalise (raykd.data.normalise)
FILE_DATASETS = ("imagefolder", "torchvision:")


def teacher_norm(spec: JobSpec, weights: str | None, checkpoint: dict | None = None) -> None:
    """Image files are normalised as the teacher's timm pretrained config says, as timm's own
    `resolve_data_config` would, when the job gives no `data.mean`/`data.std` (recorded in the
    run's job.yaml, so a re-run from it normalises the same way); a `teacher.checkpoint` as its
    export records it was trained. `weights`: the job's `teacher.weights` as written (a timm tag
    picks that tag's config); `checkpoint`: that export's payload, as validation read it."""
    data = spec.data
    if data.mean or data.std or not data.dataset.startswith(FILE_DATASETS) or spec.teacher.models:
        return
    if spec.teacher.checkpoint:
        # a trained teacher sees its inputs as it was trained on them: the normalisation its
        # export records (the job that trained it may have taken timm's)
        payload = checkpoint or {}
        if payload.get("mean") and payload.get("std"):
            data.mean, data.std = list(payload["mean"]), list(payload["std"])
        return
    from raykd.data.normalise import timm_normalisation

    found = timm_normalisation(spec.teacher.model, weights)
    if found:
        data.mean, data.std = found


def check_data(data) -> None:
    check_dataset_name(data.dataset)
    size = data.image_size
    if size is not None and not (
            (isinstance(size, int) and size > 0)
            or (isinstance(size, list) and len(size) == 2 and all(v > 0 for v in size))):
        raise RaykdError(f"data.image_size: {size!r}; give pixels (224) or [height, width], "
                         "positive")
    if data.dataset in IN_MEMORY and data.augment not in ("auto", "none"):
        raise RaykdError(f"data.augment={data.augment}: {data.dataset} is held in memory as "
                         "normalised tensors and is never augmented; allowed here: auto, none")
    if data.args and ":" not in data.dataset:
        raise RaykdError(f"data.args are the keyword arguments of a torchvision:CLASS dataset or "
                         f"a data factory of your own; {data.dataset} takes none")


def check_tracking(spec: JobSpec) -> None:
    mlflow = spec.tracking.mlflow
    if mlflow is False:
        spec.tracking.mlflow = None
    elif mlflow is not None and mlflow is not True and not (isinstance(mlflow, str) and mlflow):
        raise RaykdError(f"tracking.mlflow: expected a tracking URI (e.g. http://host:5000, "
                         f"sqlite:///path/mlflow.db) or true (a store in output_dir), got {mlflow!r}")
    if spec.tracking.mlflow is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise RaykdError("tracking.mlflow needs MLflow: pip install 'raykd[track]'") from None
    if spec.tracking.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RaykdError("tracking.tensorboard needs TensorBoard: "
                             "pip install 'raykd[track]'") from None


def allow_run_factories(run_dir: str | Path) -> list[str]:
    """A run folder's own job.yaml names the factories its exports were built by: a command
    that reads the folder (export, report, search) may import those, and only those. Returns
    their names (for the `runtime_env` of the Ray work that imports them)."""
    path = Path(run_dir) / "job.yaml"
    if not path.is_file():
        return []
    raw = parse(path.read_text(), str(path)) or {}
    teacher, student = raw.get("teacher") or {}, raw.get("student") or {}
    names = factories.factories([teacher.get("model"), *(teacher.get("models") or []),
                                 student.get("model"), (raw.get("data") or {}).get("dataset")])
    factories.allow(names)
    return names


def export_run_factories(export: str | Path) -> list[str]:
    """The factories the run folder holding `export` names (the nearest job.yaml above it)."""
    for folder in Path(export).resolve().parents:
        if (folder / "job.yaml").is_file():
            return allow_run_factories(folder)
    return []


def job_runtime_env(spec: JobSpec) -> dict | None:
    """The Ray `runtime_env` a job's driver needs: its factories of your own, allowed and on the
    path in every process it starts (None when it names none)."""
    return factories.runtime_env(job_factories(spec))


def job_factories(spec: JobSpec) -> list[str]:
    """The functions of the user's own a job names (models and data), `package.module:function`."""
    return factories.factories([spec.teacher.model, *spec.teacher.models, spec.student.model,
                                spec.data.dataset])


def check_writable(spec: JobSpec) -> None:
    """The run folder can be created and written (checked before any Ray work starts)."""
    try:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        probe = spec.run_dir / ".raykd-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RaykdError(f"output_dir: cannot write to {spec.run_dir} ({e.strerror})") from None
