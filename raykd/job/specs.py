"""What a job can say: the typed schema of a job spec, with a default for every field.

Pure dataclasses (no loading, no validation: see raykd.job.config). Fields with a fixed set of
values are `Literal` types, so the converter names the allowed values in its error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from raykd.job.typed import AtLeast, NonNegative, Positive

Optimizer = Literal["sgd", "adam"]
Placement = Literal["auto", "local", "actors"]
HeadLayout = Literal["together", "separate"]
Pack = Literal["auto", "off"]
Augment = Literal["auto", "standard", "cifar", "none"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class GaussianSpec:
    """Options of the synthetic `gaussian` dataset."""
    num_classes: int = 10
    channels: int = 1
    image_size: int = 8
    samples: int = 2000
    noise: float = 1.0


def image_hw(size) -> tuple[int, int]:
    """(height, width) of an image size given as pixels (square) or [height, width]."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class InputShape:
    """What model builders take of a dataset's `input_shape` (C, H, W): the channel count, and
    the image size as pixels for square images, else (height, width). Shared by the loaded splits
    and by what a sweep trial plans with (raykd.sweep.Shapes)."""
    input_shape: tuple[int, int, int]

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def image_size(self) -> int | tuple[int, int]:
        _, h, w = self.input_shape
        return h if h == w else (h, w)


@dataclass
class DataSpec:
    # a built-in name, imagefolder, torchvision:CLASS or package.module:function (raykd.data)
    dataset: str = "mnist5k"
    root: str | None = None           # local folder for cifar10/cifar100/imagenet/imagefolder/torchvision:
    # limit training images (distillation helps most with few)
    train_size: Annotated[int | None, AtLeast(1)] = None
    val_size: Annotated[int | None, AtLeast(1)] = None       # None: the dataset's default
    test_size: Annotated[int | None, AtLeast(1)] = None
    split_seed: int = 0               # the split is the same for every run seed
    batch_size: Annotated[int, AtLeast(1)] = 128
    # no-grad passes (validation, test, teacher-cache fills): on CPU, batches of 64 run
    # 1.6-1.8x faster than 512 (bench/eval_batch.py: large batches spill out of the caches)
    eval_batch_size: Annotated[int, AtLeast(1)] = 64
    # the training split's augmentation (raykd.data.augment); auto: the dataset's own recipe
    augment: Augment = "auto"
    # imagenet crop, imagefolder/torchvision resize: pixels (square) or [height, width]
    image_size: int | list[int] | None = None
    # keyword arguments of a torchvision: dataset class or a data factory of your own
    args: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)   # imagefolder normalisation (default:
    std: list[float] = field(default_factory=list)    # ImageNet's for colour, 0.5 for grey)
    loader_workers: int = 0
    gaussian: GaussianSpec = field(default_factory=GaussianSpec)


@dataclass
class OptimSpec:
    epochs: Annotated[int, AtLeast(1)] = 10
    optimizer: Optimizer = "sgd"
    lr: Annotated[float, Positive] = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    lr_decay: float = 0.2
    # mixed precision, memory layout, torch.compile (raykd.train.precision)
    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False


@dataclass
class ReplaySpec:
    """Replayed teacher views (raykd.teacher.replay): `views` augmented views per training image,
    drawn once per teacher, whose `topk` largest class log-probabilities (and the label's) are
    stored; students then train on those views with no teacher forward."""
    views: Annotated[int, AtLeast(1)] = 8
    topk: Annotated[int, AtLeast(1)] = 10
    seed: int = 0                     # the stream the stored views are drawn from


@dataclass
class TeacherSpec:
    # a zoo name, torchvision:NAME or timm:NAME (raykd.models.sources)
    model: str = "cnn_wide"
    model_args: dict[str, Any] = field(default_factory=dict)   # the builder's keyword arguments
    stages: list[str] = field(default_factory=list)   # module paths as stage1..N (sourced models)
    weights: str | None = None        # a state_dict (or raykd export) to start training from
    weights_skip: list[str] = field(default_factory=list)   # key prefixes left out, e.g. [fc]
    checkpoint: str | None = None     # a raykd model export to use instead of training one
    train: OptimSpec = field(default_factory=OptimSpec)
    # teachers per seed (independent runs, different seeds)
    count: Annotated[int, AtLeast(1)] = 1
    models: list[str] = field(default_factory=list)   # or one teacher per listed architecture
    # how students get the frozen teacher's outputs (raykd.teacher)
    placement: Placement = "auto"     # local (in each worker) | actors (shard actors) | auto
    shards: Annotated[int, AtLeast(1)] = 1                   # contiguous block ranges, one Ray actor each
    replicas: Annotated[int, AtLeast(1)] = 1                 # copies of the shard chain, load-balanced
    cpus_per_shard: float = 1.0
    gpus_per_shard: float = 0.0       # a GPU fraction per shard actor (GPU clusters)
    # a request with no answer by then fails with an error
    timeout_s: Annotated[float, Positive] = 120.0
    cache: bool = True                # store teacher outputs for deterministic inputs
    cache_dir: str | None = None      # default: OUTPUT_DIR/feature_cache (shared across jobs)
    # augmented training data: students train on stored teacher views (raykd.teacher.replay)
    replay: ReplaySpec | None = None
    reuse: bool = True                # take an identical teacher from OUTPUT_DIR/teachers


@dataclass
class StudentSpec:
    model: str = "cnn_small"          # a zoo name, torchvision:NAME or timm:NAME
    model_args: dict[str, Any] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)   # module paths as stage1..N (sourced models)
    weights: str | None = None        # a state_dict (or raykd export) to start training from
    weights_skip: list[str] = field(default_factory=list)   # key prefixes left out, e.g. [fc]
    train: OptimSpec = field(default_factory=OptimSpec)
    checkpoint: str | None = None     # start from this raykd model export (e.g. a searched
                                      # stitched student) instead of building `model`
    reinit: bool = False              # with checkpoint: its architecture, fresh weights


@dataclass
class HeadSpec:
    """Classifier heads on the teacher's stages, for methods that use them (DIH)."""
    pooled: bool = False              # average-pool before the linear layer (large maps)
    layout: HeadLayout = "together"   # together: one run trains all heads on one teacher pass;
                                      # separate: one run per head, concurrently
    train: OptimSpec = field(default_factory=lambda: OptimSpec(epochs=10))


@dataclass
class RaySpec:
    address: str | None = None        # None: the cluster in RAY_ADDRESS, else a local instance
    num_cpus: int | None = None       # for a local instance
    workers: Annotated[int, AtLeast(1)] = 1   # Ray Train workers per run (DDP when > 1)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    # a GPU or a fraction of one per worker (0.25: four packed lanes share a GPU); None: 1 with
    # use_gpu, else 0. Data-parallel workers (workers > 1) need whole GPUs
    gpus_per_worker: Annotated[float | None, NonNegative] = None

    @property
    def gpus(self) -> float:
        """GPUs per worker, as the job asks for them."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if self.use_gpu else 0.0
    max_parallel: int | None = None   # runs in flight at once (None: as resources allow)
    max_failures: int = 1             # retries of a run, each resuming from its last checkpoint
    pack: Pack = "auto"               # auto: ready units share one Ray Train run, spread over
                                      # its workers as lanes; off: one run per unit
    pack_max: Annotated[int, AtLeast(1)] = 64                # most units one run trains
    lend_idle_cpus: bool = True       # a lane whose neighbours on its node wait for work trains
                                      # with their CPUs as extra torch threads (not bit-stable)
    resources_per_worker: dict[str, float] = field(default_factory=dict)   # custom resources
                                      # each Train worker needs, e.g. {gpu_node: 1} (a node type)
    # a run whose workers cannot be placed by then fails, naming what it needs (autoscaling GPU
    # nodes take minutes)
    placement_timeout_s: Annotated[float, Positive] = 600.0


@dataclass
class SearchDim:
    """One searched parameter: uniform / loguniform [low, high], randint [low, high), choice or
    grid over `values` (grid tries every value, in every sample)."""
    type: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] = field(default_factory=list)


@dataclass
class SweepSpec:
    """`raykd sweep`: a Ray Tune search over one method entry's parameters and the student's
    training, selected on the validation split only."""
    method: str = ""                  # the `methods:` label to tune
    # dotted job keys -> dimensions: methods.LABEL.PARAM, student.train.FIELD, heads.train.FIELD
    space: dict[str, SearchDim] = field(default_factory=dict)
    num_samples: int = 8              # samples of the space (each grid value x num_samples)
    metric: Literal["val_top1"] = "val_top1"   # validation only: the test split is never read
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1             # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2
    search: Literal["random", "optuna"] = "random"
    max_concurrent: int = 2           # trials at once (each is a Ray Train run)
    seed: int | None = None           # the job seed trials train with (default: the first)
    # or several: each trial trains one run per seed (packed) and scores their mean val_top1
    seeds: list[int] = field(default_factory=list)
    workers: int = 1                  # Ray Train workers per trial (DDP when > 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0      # a GPU or a fraction of one per worker


@dataclass
class TrackingSpec:
    """Where per-epoch metrics, parameters and final rows also go (the driver logs them, so
    each is logged once, however the units were packed or resumed)."""
    mlflow: Any = None                # a tracking URI, or true: RUN_DIR's output_dir/mlflow.db
    experiment: str | None = None     # the MLflow experiment (default: the job's name)
    tensorboard: bool = False         # event files in RUN_DIR/tensorboard/UNIT


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
    sweep: SweepSpec | None = None    # read by `raykd sweep` only
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    @property
    def teacher_cache_dir(self) -> str | None:
        """Where teacher outputs are stored (raykd.teacher.cache); None when the cache is off."""
        if not self.teacher.cache:
            return None
        return self.teacher.cache_dir or str(Path(self.output_dir) / "feature_cache")
