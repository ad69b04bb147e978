"""Typed job specs: YAML in, dataclasses out, `key=value` overrides, errors that name the field.

A job is about 20 lines of YAML (see jobs/quickstart.yaml). Every field has a typed default, so a
job only states what differs. Overrides use dotted paths: `student.train.epochs=5`,
`methods.kd.temperature=2`, `seeds=[0,1]`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raykd.errors import RaykdError


@dataclass
class GaussianSpec:
    """Options of the synthetic `gaussian` dataset."""
    num_classes: int = 10
    channels: int = 1
    image_size: int = 8
    samples: int = 2000
    noise: float = 1.0


@dataclass
class DataSpec:
    dataset: str = "mnist5k"
    root: str | None = None           # local folder for cifar10/cifar100/imagenet
    train_size: int | None = None     # limit training images (distillation helps most with few)
    val_size: int | None = None       # None: the dataset's default
    test_size: int | None = None
    split_seed: int = 0               # the split is the same for every run seed
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True              # standard augmentation for the torchvision datasets
    image_size: int | None = None     # imagenet crop size (default 224)
    loader_workers: int = 0
    gaussian: GaussianSpec = field(default_factory=GaussianSpec)


@dataclass
class OptimSpec:
    epochs: int = 10
    optimizer: str = "sgd"            # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    lr_decay: float = 0.2


@dataclass
class TeacherSpec:
    model: str = "cnn_wide"
    checkpoint: str | None = None     # a raykd model export to use instead of training one
    train: OptimSpec = field(default_factory=OptimSpec)
    count: int = 1                    # teachers per seed (independent runs, different seeds)
    models: list[str] = field(default_factory=list)   # or one teacher per listed architecture
    # how students get the frozen teacher's outputs (raykd.teacher)
    placement: str = "auto"           # local (in each worker) | actors (shard actors) | auto
    shards: int = 1                   # contiguous block ranges, one Ray actor each
    replicas: int = 1                 # copies of the shard chain, load-balanced
    cpus_per_shard: float = 1.0
    gpus_per_shard: float = 0.0       # a GPU fraction per shard actor (GPU clusters)
    timeout_s: float = 120.0          # a request with no answer by then fails with an error
    cache: bool = True                # store teacher outputs for deterministic inputs
    cache_dir: str | None = None      # default: OUTPUT_DIR/feature_cache (shared across jobs)


@dataclass
class StudentSpec:
    model: str = "cnn_small"
    train: OptimSpec = field(default_factory=OptimSpec)


@dataclass
class HeadSpec:
    """Classifier heads on the teacher's stages, for methods that use them (DIH)."""
    pooled: bool = False              # average-pool before the linear layer (large maps)
    layout: str = "together"          # together: one run trains all heads on one teacher pass;
                                      # separate: one run per head, concurrently
    train: OptimSpec = field(default_factory=lambda: OptimSpec(epochs=10))


@dataclass
class RaySpec:
    address: str | None = None        # None: the cluster in RAY_ADDRESS, else a local instance
    num_cpus: int | None = None       # for a local instance
    workers: int = 1                  # Ray Train workers per run (DDP when > 1)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_parallel: int | None = None   # runs in flight at once (None: as resources allow)
    max_failures: int = 1             # retries of a run, each resuming from its last checkpoint


@dataclass
class JobSpec:
    name: str = "job"
    output_dir: str = "runs"          # RUN_DIR = output_dir/name
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    heads: HeadSpec = field(default_factory=HeadSpec)
    # label -> {method: NAME (defaults to the label), other keys: that method's parameters}
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"kd": {}})
    ray: RaySpec = field(default_factory=RaySpec)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


# ---- typed conversion -------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def convert(tp, value, path: str):
    """Convert a YAML value to the annotated type, or raise RaykdError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RaykdError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RaykdError(f"{path}: expected a list, got {value!r}")
        return [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RaykdError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): (v if v is not None else {}) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RaykdError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RaykdError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RaykdError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RaykdError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported field type {tp} at {path}")


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are RaykdErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    where = f"{path}." if path else ""
    if unknown:
        raise RaykdError(
            f"unknown key {where}{unknown[0]!s}; allowed under {path or 'the job'}: {', '.join(names)}")
    kwargs = {k: convert(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


# ---- loading and overrides --------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RaykdError(f"override {text!r} is not key=value (e.g. student.train.epochs=5)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RaykdError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise RaykdError(f"override {text!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise RaykdError(f"job file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RaykdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise RaykdError(f"{path}: a job must be a YAML mapping")
    raw.setdefault("name", path.stem)
    return job_from_dict(apply_overrides(raw, overrides or []))


def job_from_dict(raw: dict) -> JobSpec:
    spec = from_dict(JobSpec, raw)
    validate(spec)
    return spec


def validate(spec: JobSpec) -> None:
    """Check names against the registries so a bad job fails before Ray starts."""
    from raykd.data.registry import check_dataset_name
    from raykd.methods import method_params
    from raykd.models import check_model_name

    # Ray workers run in other folders: relative paths are resolved here, against the caller's
    spec.output_dir = str(Path(spec.output_dir).expanduser().resolve())
    if spec.data.root is not None:
        spec.data.root = str(Path(spec.data.root).expanduser().resolve())
    if spec.teacher.checkpoint is not None:
        ckpt = Path(spec.teacher.checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise RaykdError(f"teacher.checkpoint: no such file {ckpt}")
        spec.teacher.checkpoint = str(ckpt)
    check_dataset_name(spec.data.dataset)
    check_model_name(spec.teacher.model)
    for name in spec.teacher.models:
        check_model_name(name)
    if spec.teacher.count < 1:
        raise RaykdError(f"teacher.count must be at least 1, got {spec.teacher.count}")
    if spec.teacher.checkpoint and (spec.teacher.count > 1 or spec.teacher.models):
        raise RaykdError("teacher.checkpoint gives one teacher; drop teacher.count/teacher.models")
    check_model_name(spec.student.model)
    if not spec.seeds:
        raise RaykdError("seeds: give at least one seed")
    if not spec.methods:
        raise RaykdError("methods: give at least one method")
    for label, entry in spec.methods.items():
        method_params(label, entry)
    if spec.heads.layout not in ("together", "separate"):
        raise RaykdError(f"heads.layout: unknown {spec.heads.layout!r}; allowed: together, separate")
    for where, optim in (("teacher.train", spec.teacher.train), ("student.train", spec.student.train),
                         ("heads.train", spec.heads.train)):
        if optim.optimizer not in ("sgd", "adam"):
            raise RaykdError(f"{where}.optimizer: unknown {optim.optimizer!r}; allowed: sgd, adam")
        if optim.epochs < 1:
            raise RaykdError(f"{where}.epochs must be at least 1, got {optim.epochs}")
        bad = [m for m in optim.lr_milestones if not 0 < m < 1]
        if bad:
            raise RaykdError(f"{where}.lr_milestones are fractions of the run in (0, 1), got {bad}")
    t = spec.teacher
    if t.placement not in ("auto", "local", "actors"):
        raise RaykdError(f"teacher.placement: unknown {t.placement!r}; allowed: auto, local, actors")
    if t.shards < 1 or t.replicas < 1:
        raise RaykdError("teacher.shards and teacher.replicas must be at least 1")
    if t.timeout_s <= 0:
        raise RaykdError(f"teacher.timeout_s must be positive, got {t.timeout_s}")
    if t.cache_dir is not None:
        t.cache_dir = str(Path(t.cache_dir).expanduser().resolve())
    if spec.ray.workers < 1:
        raise RaykdError(f"ray.workers must be at least 1, got {spec.ray.workers}")
    if spec.data.batch_size < 1:
        raise RaykdError(f"data.batch_size must be at least 1, got {spec.data.batch_size}")
