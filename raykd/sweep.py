"""`raykd sweep`: a Ray Tune search over one method entry's parameters and the student's
training, selected on the validation split; then the best configuration over the job's seeds.

Shape (Ray 2.60, Train V2): every trial is a Tune *function* trial that builds and fits a
`TorchTrainer` running the same worker as `raykd run` (raykd.train.kinds.train_worker); Train's
`TuneReportCallback` forwards each epoch's `val_top1` to Tune, so ASHA can stop a trial early.
Teachers, DIH heads and neighbourhood parts are trained once, before any trial (they are the
tuned student's dependencies in the job's plan), and trials read teacher outputs from the cache.
A trial driver holds one unit of the custom resource `raykd_trial` and no CPU, so trials run
side by side on a small machine; on a cluster the head node must offer that resource.
Outputs under RUN_DIR: sweep/tune (Tune's experiment: per-trial logs, TensorBoard-readable),
sweep.parquet (one row per trial), sweep.png, best.yaml, and results.parquet.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from raykd.errors import RaykdError, one_line
from raykd.job.config import job_from_dict
from raykd.job.specs import InputShape, JobSpec, SearchDim, SweepSpec
from raykd.job.typed import set_key
from raykd.log import log

TRIAL_RESOURCE = "raykd_trial"
SWEEP_DIR = "sweep"


# ---- the search space ------------------------------------------------------------------

def check_dim(key: str, dim: SearchDim) -> list:
    """Representative values of one dimension (to validate the key); one-line errors."""
    where = f"sweep.space.{key}"
    if dim.type in ("choice", "grid"):
        if not dim.values:
            raise RaykdError(f"{where}: {dim.type} needs a non-empty `values` list")
        return list(dim.values)
    if dim.low is None or dim.high is None:
        raise RaykdError(f"{where}: {dim.type} needs `low` and `high`")
    if dim.low > dim.high or (dim.type == "randint" and dim.low == dim.high):
        raise RaykdError(f"{where}: low ({dim.low:g}) must be below high ({dim.high:g})")
    if dim.type == "loguniform" and dim.low <= 0:
        raise RaykdError(f"{where}: loguniform needs low > 0, got {dim.low:g}")
    if dim.type == "randint":
        if dim.low != int(dim.low) or dim.high != int(dim.high):
            raise RaykdError(f"{where}: randint needs integer bounds")
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


def tune_space(space: dict[str, SearchDim]) -> dict:
    from ray import tune

    make = {"uniform": lambda d: tune.uniform(d.low, d.high),
            "loguniform": lambda d: tune.loguniform(d.low, d.high),
            "randint": lambda d: tune.randint(int(d.low), int(d.high)),
            "choice": lambda d: tune.choice(list(d.values)),
            "grid": lambda d: tune.grid_search(list(d.values))}
    return {key: make[dim.type](dim) for key, dim in space.items()}


def with_values(raw: dict, values: dict) -> dict:
    """The raw job with each dotted key set to its sampled value."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        set_key(out, key.split("."), _plain(value), f"sweep.space.{key}")
    return out


def check_sweep(raw: dict, spec: JobSpec) -> SweepSpec:
    """Everything that can be wrong with a sweep, before any trial starts."""
    sweep = spec.sweep
    if sweep is None:
        raise RaykdError("the job has no `sweep:` section; see docs/sweeps.md")
    if sweep.method not in spec.methods:
        raise RaykdError(f"sweep.method: no methods entry {sweep.method!r}; the job has "
                         f"{', '.join(spec.methods)}")
    if not sweep.space:
        raise RaykdError("sweep.space: give at least one dimension, e.g. "
                         "methods.kd.temperature: {type: uniform, low: 1, high: 8}")
    allowed = (f"methods.{sweep.method}.", "student.train.", "heads.train.")
    for key, dim in sweep.space.items():
        if not key.startswith(allowed):
            raise RaykdError(f"sweep.space.{key}: searchable keys start with "
                             f"{', '.join(allowed)}")
        for value in check_dim(key, dim):   # every value must make a valid job
            job_from_dict(with_values(raw, {key: value}))
    for name in ("num_samples", "max_concurrent", "workers", "grace_period"):
        if getattr(sweep, name) < 1:
            raise RaykdError(f"sweep.{name} must be at least 1, got {getattr(sweep, name)}")
    if sweep.reduction_factor < 2:
        raise RaykdError(f"sweep.reduction_factor must be at least 2, got {sweep.reduction_factor}")
    if sweep.seed is not None and sweep.seeds:
        raise RaykdError("give sweep.seed (one) or sweep.seeds (several), not both")
    for seed in [sweep.seed] if sweep.seed is not None else sweep.seeds:
        if seed not in spec.seeds:
            key = "sweep.seed" if sweep.seed is not None else "sweep.seeds"
            raise RaykdError(f"{key}: {seed} is not one of the job's seeds {spec.seeds}")
    if len(set(sweep.seeds)) != len(sweep.seeds):
        raise RaykdError(f"sweep.seeds {sweep.seeds} repeats a seed")
    if len(sweep.seeds) > 1 and sweep.scheduler == "asha":
        raise RaykdError(f"sweep.seeds: a trial of {len(sweep.seeds)} seeds reports its mean "
                         "after all its runs, so ASHA could not stop it early; set "
                         "sweep.scheduler: fifo")
    warn_early_stops_in_warmup(raw, spec)
    return sweep


def trial_seeds(spec: JobSpec) -> list[int]:
    """The job seeds every trial trains: `sweep.seeds`, else `sweep.seed`, else the first."""
    sweep = spec.sweep
    if sweep.seeds:
        return list(sweep.seeds)
    return [spec.seeds[0] if sweep.seed is None else sweep.seed]


def warn_early_stops_in_warmup(raw: dict, spec: JobSpec) -> None:
    """One line when ASHA may stop trials before the tuned method's warm-up (CE off) is over,
    for any value in the searched space: trials would be compared on the warm-up's loss."""
    import math

    from raykd.methods import method_params

    sweep = spec.sweep
    if sweep.scheduler != "asha":
        return
    jobs = [spec] + [job_from_dict(with_values(raw, {key: value}))
                     for key, dim in sweep.space.items() for value in check_dim(key, dim)]
    longest = 0.0
    for job in jobs:
        cls, params = method_params(sweep.method, job.methods[sweep.method])
        longest = max(longest, cls.warmup_fraction(params) * job.student.train.epochs)
    if sweep.grace_period < longest:
        log.warning("sweep: ASHA may stop trials after %d epoch(s), inside a warm-up of up to "
                    "%.1f epochs in the searched space; raise sweep.grace_period to %d to "
                    "compare trials after it", sweep.grace_period, longest, math.ceil(longest))


def check_prerequisites(raw: dict, spec: JobSpec, shapes) -> None:
    """Refuse, in one line, a searched key that changes what the tuned student's prerequisites
    (teachers, DIH heads, ND parts) train, or the number of epochs: a sweep trains the
    prerequisites once, before any trial, so every trial would distil from the same ones and
    best.yaml would record a value that never took effect; and ASHA schedules on the base
    epoch count. Checked by planning the job with each dimension's representative values and
    comparing the prerequisite units with the base plan's."""
    from raykd.driver.plan import needed_by, plan_units

    sweep = spec.sweep
    seeds = trial_seeds(spec)
    targets = {f"seed{seed}-{sweep.method}" for seed in seeds}

    def prerequisites(job: JobSpec) -> dict:
        tuned = copy.deepcopy(job)
        tuned.seeds = seeds
        units = {u.key: u for u in plan_units(tuned, shapes)}
        keys = needed_by(units, sorted(targets)) - targets
        # what each trains (its settings digest), not where its outputs go or what it stores
        # for its dependants (a teacher stores replay views only for students that read them)
        return {k: units[k].settings for k in sorted(keys)}

    base = prerequisites(spec)
    for key, dim in sweep.space.items():
        if key.endswith(".epochs"):
            raise RaykdError(f"sweep.space.{key}: epochs cannot be searched (ASHA stops trials "
                             "by epoch against the job's own count); set it in the job")
        for value in check_dim(key, dim):
            changed = [k for k, unit in prerequisites(job_from_dict(
                with_values(raw, {key: value}))).items() if base.get(k) != unit]
            if changed:
                raise RaykdError(f"sweep.space.{key}: changes what {changed[0]} trains, which "
                                 "a sweep trains once before its trials; tune it in a sweep "
                                 "of its own, or set it in the job")


def absolute_paths(raw: dict, spec: JobSpec) -> dict:
    """The raw job with every path as the driver resolved it."""
    out = copy.deepcopy(raw)
    for key, value in (("output_dir", spec.output_dir), ("data.root", spec.data.root),
                       ("teacher.cache_dir", spec.teacher.cache_dir),
                       ("teacher.checkpoint", spec.teacher.checkpoint),
                       ("student.checkpoint", spec.student.checkpoint)):
        if value is not None:
            set_key(out, key.split("."), value, key)
    return out


# ---- one trial --------------------------------------------------------------------------

@dataclass(frozen=True)
class Shapes(InputShape):
    """What planning needs of a dataset (a trial plans its unit without loading the data)."""
    num_classes: int
    input_shape: tuple[int, int, int]


def trial_unit(raw: dict, values: dict, sweep: SweepSpec, run_dir: Path, trial_id: str,
               rows: list[dict], teacher_cache: str | None, shapes: Shapes, seed: int,
               fail: bool = False):
    """The tuned student of one trial for one of its seeds, as a unit with its teachers
    attached (in-process, from the cache): what `raykd run` would train, without the test
    split. Only the tuned method is planned, for that seed."""
    from raykd.driver.plan import plan_units, resolve_teachers
    from raykd.methods import method_class
    from raykd.teacher import TeacherHandle

    spec = job_from_dict(with_values(raw, values))
    spec.seeds, spec.methods = [seed], {sweep.method: spec.methods[sweep.method]}
    units = {u.key: u for u in plan_units(spec, shapes)}
    unit = units[f"seed{seed}-{sweep.method}"]
    method_class(unit.method_name).prepare(unit, rows)
    unit.teacher_exports = resolve_teachers(unit, rows)
    unit.teachers = [TeacherHandle(e, "local", cache_dir=teacher_cache)
                     for e in unit.teacher_exports]
    # one seed keeps a trial's files in its own folder; several, one folder per seed in it
    several = len(sweep.seeds) > 1
    folder = run_dir / SWEEP_DIR / "trials" / trial_id / (f"seed{seed}" if several else "")
    unit.export_path, unit.history_path = str(folder / "model.pt"), str(folder / "metrics.jsonl")
    unit.diagnostics_dir = ""
    # every trial starts from the tuned student's own initialisation and batch order, so trials
    # differ by their configuration only
    unit.seed_stream = unit.key
    unit.key = f"trial-{trial_id}" + (f"-seed{seed}" if several else "")
    unit.evaluate_test, unit.cpus_per_worker = False, sweep.cpus_per_worker
    unit.fail_at_epoch = 1 if fail else None
    return unit


def fill_teacher_cache(unit, splits) -> None:
    """Store the tuned method's teacher outputs on the training split once, here, so that no
    trial runs a teacher over the training set (they all read the cache)."""
    from raykd.methods import MethodContext, build_method
    from raykd.models.export import load_export
    from raykd.teacher import LocalTeacher
    from raykd.teacher.cache import cached_teacher
    from raykd.train.model import student_model

    if not splits.deterministic or not unit.teachers or not unit.teachers[0].cache_dir:
        return
    teachers = [load_export(h.export_path) for h in unit.teachers]
    # the student's architecture, as a trial builds it (not calibrated: only its shapes count)
    student, _ = student_model(unit, splits, "cpu", calibrate=False)
    method = build_method(unit.method_name, unit.method, MethodContext(
        student=student, num_classes=splits.num_classes, input_shape=splits.input_shape,
        teacher=teachers[0], teachers=teachers, inputs=unit.method_inputs, shapes_only=True))
    taps = method.teacher_taps()
    for handle in unit.teachers if taps else []:
        cached_teacher(LocalTeacher(handle.export_path), handle.cache_dir, handle.export_path,
                       unit.data, "train", splits.train, taps, unit.data.eval_batch_size)


def finished_trial(unit) -> dict | None:
    """The final epoch's metrics of a trial whose model is already exported, else None.

    Its driver can be killed after the export but before Tune or Train record the trial's end
    (Train registers a reported checkpoint asynchronously), so a resumed sweep could otherwise
    train the last epoch again from an older checkpoint."""
    history, export = Path(unit.history_path), Path(unit.export_path)
    if not (history.is_file() and export.is_file()):
        return None
    lines = [line for line in history.read_text().splitlines() if line.strip()]
    last = json.loads(lines[-1]) if lines else {}
    return last if last.get("epoch") == unit.optim.epochs else None


def make_trial(raw: dict, sweep: SweepSpec, run_dir: Path, rows: list[dict],
               teacher_cache: str | None, fail_when: dict | None, settings, shapes: Shapes,
               seeds: list[int]):
    """The Tune function trial (closed over plain, picklable values); `settings`: how its Train
    run is made (raykd.train.runner.RunSettings); `seeds`: the job seeds it trains."""

    def trial(config: dict) -> None:
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        fail = bool(fail_when) and all(config.get(k) == v for k, v in fail_when.items())
        units = [trial_unit(raw, config, sweep, run_dir, trial_id, rows, teacher_cache, shapes,
                            seed, fail and i == 0) for i, seed in enumerate(seeds)]
        # the sampled values, for trackers (raykd.outputs.tracking follows this trial's history)
        folder = run_dir / SWEEP_DIR / "trials" / trial_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({k: _plain(v) for k, v in config.items()}))
        if len(units) == 1:
            train_one_seed(units[0], settings, sweep)
        else:
            train_seeds(units, settings, sweep)

    return trial


def train_one_seed(unit, settings, sweep: SweepSpec) -> None:
    """A trial of one seed: its Train run reports every epoch to Tune as it ends (so ASHA can
    stop it early)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.train.runner import fit, trainer_for

    done = finished_trial(unit)
    if done is not None:   # trained and exported before its driver was killed
        tune.report(done)
        return
    # named by the trial: a restored trial continues its Train run
    _, error = fit(trainer_for({"units": [unit]}, settings, sweep.workers, sweep.cpus_per_worker,
                               unit.key, callbacks=(TuneReportCallback(),)), settings)
    if error is not None:
        raise error


def train_seeds(units: list, settings, sweep: SweepSpec) -> None:
    """A trial of several seeds: their runs as one pack over `sweep.workers` lanes (a restored
    trial trains only what is unfinished), then each epoch's mean val_top1 over the seeds
    reported to Tune, with its standard deviation."""
    import statistics

    import ray
    from ray import tune

    from raykd.train.runner import fit_units

    pending = [u for u in units if finished_trial(u) is None]
    if pending:
        outcomes = ray.get(fit_units.remote(pending, settings, lanes=sweep.workers))
        failed = [o for o in outcomes.values() if isinstance(o, Exception)]
        if failed:
            raise failed[0]
    curves = [epoch_curve(u) for u in units]
    for epoch in range(1, units[0].optim.epochs + 1):
        values = [curve[epoch] for curve in curves]
        tune.report({"epoch": epoch, "val_top1": statistics.fmean(values),
                     "val_top1_std": statistics.stdev(values), "seeds": len(values)})


def epoch_curve(unit) -> dict[int, float]:
    """A finished trial run's val_top1 by epoch (an epoch trained again after a resume: its
    last record)."""
    lines = Path(unit.history_path).read_text().splitlines()
    return {int(r["epoch"]): float(r["val_top1"]) for r in map(json.loads, filter(None, lines))
            if "val_top1" in r}


# ---- the sweep ---------------------------------------------------------------------------

def run_sweep(raw: dict, fail_when: dict | None = None):
    """Train the prerequisites, search, write the sweep's outputs, then run the best
    configuration over the job's seeds. `fail_when` ({key: value}) makes matching trials fail
    after their first epoch, for tests. Returns (sweep table, results table)."""
    return Sweep(raw, fail_when).run()


# where a job runs and how it reports, not what a trial computes: these may change on resume
_NOT_TRIAL = ("output_dir", "tracking.", "ray.address", "ray.num_cpus", "ray.max_parallel",
              "ray.placement_timeout_s", "sweep.max_concurrent")


def trial_fields(spec) -> dict:
    """The resolved job as dotted keys, without those that cannot change what a trial
    computes (where it runs, how it is tracked)."""
    flat: dict = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = value

    walk(dataclasses.asdict(spec), "")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()
            if not any(k == n or k.startswith(n) for n in _NOT_TRIAL)}


class Sweep:
    """One `raykd sweep`, its steps in the order they happen: check the run folder and the
    cluster, train what every trial needs (`prerequisites`), `search` with Tune, write the
    trials' table and plot, pick the `best` configuration on validation, and `run_best` over
    the job's seeds."""

    def __init__(self, raw: dict, fail_when: dict | None = None):
        from raykd.data import load_dataset

        self.spec = job_from_dict(copy.deepcopy(raw))
        self.sweep = check_sweep(raw, self.spec)
        self.raw = absolute_paths(raw, self.spec)   # trials run in Tune's own working folders
        self.fail_when = fail_when
        self.run_dir = self.spec.run_dir
        self.folder = self.run_dir / SWEEP_DIR
        self.seeds = trial_seeds(self.spec)
        self.targets = [f"seed{seed}-{self.sweep.method}" for seed in self.seeds]
        self.splits = load_dataset(self.spec.data)
        self.shapes = Shapes(self.splits.num_classes, tuple(self.splits.input_shape))
        check_prerequisites(raw, self.spec, self.shapes)

    def run(self):
        self.check_folder()
        slots = self.check_trial_slots()
        epochs = self.prerequisites()
        table = self.search(slots, epochs)
        return table, self.run_best(self.best(table))

    def check_folder(self) -> None:
        """A run folder holds one sweep, run by one driver: resuming it with a job changed in
        anything a trial depends on (the `sweep:` section, a method, the data, a model, ...) is
        refused, naming the first changed key."""
        from raykd.driver.ownership import own

        own(self.run_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = self.folder / "sweep.yaml"
        section = yaml.safe_dump(dataclasses.asdict(self.sweep), sort_keys=True)
        if stored.exists() and stored.read_text() != section:
            raise RaykdError(f"{self.run_dir} holds a sweep with another `sweep:` section; give "
                             "the job a new name (name=...) or restore the old section")
        stored.write_text(section)
        stored_job = self.folder / "job.yaml"
        now = trial_fields(self.spec)
        if stored_job.exists():
            before = yaml.safe_load(stored_job.read_text()) or {}
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                key = changed[0]
                raise RaykdError(
                    f"{self.run_dir} holds a sweep of a job whose {key} was "
                    f"{before.get(key)!r}, now {now.get(key)!r}: its trials would mix both; give "
                    "the job a new name (name=...) or restore the old value")
        stored_job.write_text(yaml.safe_dump(now, sort_keys=True))

    def check_trial_slots(self) -> int:
        import ray

        have = int(ray.cluster_resources().get(TRIAL_RESOURCE, 0))
        if have < 1:
            raise RaykdError(f"the Ray cluster offers no '{TRIAL_RESOURCE}' resource, so no "
                             f"trial could start; add `resources: {{{TRIAL_RESOURCE}: N}}` to the "
                             "head node")
        return have

    def prerequisites(self) -> int:
        """Train what the tuned student depends on (teachers, DIH heads, ND parts), once; wait
        until their run has given its CPUs back; fill the teacher cache the trials read.
        Returns the tuned student's epochs."""
        from raykd.driver.pipeline import release_finished_runs, run_job, wait_for_room
        from raykd.driver.plan import plan_units
        from raykd.outputs.results import ResultsTable

        units = {u.key: u for u in plan_units(self.spec, self.shapes)}
        before = sorted({key for target in self.targets for key in units[target].depends_on})
        if before:
            log.info("sweep: training what every trial needs first: %s", ", ".join(sorted(before)))
            run_job(self.spec, splits=self.splits, only=before, checked=True)
        # the trials' runs start on the CPUs the prerequisites' run frees: never queued behind it
        release_finished_runs()
        need = {"CPU": self.sweep.workers * self.sweep.cpus_per_worker}
        if self.sweep.gpus_per_worker:
            need["GPU"] = self.sweep.workers * self.sweep.gpus_per_worker
        wait_for_room(need, "the sweep's first trial")
        self.rows = ResultsTable(self.run_dir).rows
        for seed in self.seeds:
            fill_teacher_cache(self.trial_unit("probe", {}, seed), self.splits)
        return units[self.targets[0]].optim.epochs

    def trial_unit(self, trial_id: str, values: dict, seed: int):
        return trial_unit(self.raw, values, self.sweep, self.run_dir, trial_id, self.rows,
                          self.spec.teacher_cache_dir, self.shapes, seed)

    def search(self, slots: int, epochs: int):
        """Run (or resume) the Tune experiment; write sweep.parquet and sweep.png."""
        from ray import tune

        from raykd.train.runner import RunSettings

        sweep = self.sweep
        settings = RunSettings(str(self.folder / "train"), self.shapes.num_classes,
                               self.shapes.input_shape, workers=sweep.workers,
                               gpus_per_worker=sweep.gpus_per_worker, max_failures=0,
                               placement_timeout_s=self.spec.ray.placement_timeout_s)
        trainable = tune.with_resources(
            make_trial(self.raw, sweep, self.run_dir, self.rows, self.spec.teacher_cache_dir,
                       self.fail_when, settings, self.shapes, self.seeds), {TRIAL_RESOURCE: 1})
        experiment = self.folder / "tune"
        if tune.Tuner.can_restore(str(experiment)):
            log.info("sweep: resuming %s (finished trials are kept)", experiment)
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=tune_space(sweep.space),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode="max", num_samples=sweep.num_samples,
                    max_concurrent_trials=min(sweep.max_concurrent, slots),
                    scheduler=scheduler(sweep, epochs), search_alg=search_alg(sweep)),
                run_config=tune.RunConfig(name="tune", storage_path=str(self.folder), verbose=1))
        tracker = track_trials(self.spec, self.folder / "trials", sweep.method)
        started = time.perf_counter()
        try:
            table = sweep_table(tuner.fit(), list(sweep.space), epochs)
            several = len(self.seeds) > 1
            for row in table.to_dict("records") if tracker else []:
                for seed in self.seeds:
                    tracker.finish(f"trial-{row['trial']}" + (f"-seed{seed}" if several else ""),
                                   row)
        finally:
            if tracker:
                tracker.close()
        table.attrs["search_s"] = time.perf_counter() - started   # the trials alone
        table.to_parquet(self.run_dir / "sweep.parquet", index=False)
        plot_sweep(table, list(sweep.space), self.run_dir / "sweep.png")
        log.info("sweep: %d trials (%d finished, %d stopped early, %d failed) in %.0f s",
                 len(table), int((table.status == "finished").sum()),
                 int((table.status == "stopped").sum()), int((table.status == "failed").sum()),
                 table.attrs["search_s"])
        return table

    def best(self, table) -> dict:
        """The values of the best trial on validation: the highest last val_top1 among those
        that ran every epoch (or, when none did, among those not failed)."""
        done = table[table.status == "finished"]
        pool = done if len(done) else table[table.status != "failed"]
        if not len(pool):
            raise RaykdError(f"every trial failed; see {self.folder / 'tune'} for their errors")
        best = pool.sort_values(["last_val_top1", "best_val_top1"], ascending=False).iloc[0]
        values = {k: _plain(best[k]) for k in self.sweep.space}
        log.info("sweep: best %s (val_top1 %.4f)", values, best["last_val_top1"])
        return values

    def run_best(self, values: dict):
        """Write best.yaml (the job with the best values, the tuned method only) and run it
        over the job's seeds."""
        from raykd.driver.pipeline import run_job

        best_raw = with_values(self.raw, values)
        best_raw.pop("sweep", None)
        best_raw["methods"] = {self.sweep.method: best_raw["methods"][self.sweep.method]}
        (self.run_dir / "best.yaml").write_text(yaml.safe_dump(best_raw, sort_keys=False))
        return run_job(job_from_dict(copy.deepcopy(best_raw)), splits=self.splits)


def track_trials(spec: JobSpec, trials: Path, method: str):
    """A tracker following every trial's history as trials appear, one tracked run per trial
    and seed (None without tracking)."""
    from raykd.outputs.tracking import Tracker, sinks_for

    sinks = sinks_for(spec)
    if not sinks:
        return None
    several = len(trial_seeds(spec)) > 1

    def describe(path: Path):
        trial = path.parent.parent if several else path.parent
        config = trial / "config.json"
        params = json.loads(config.read_text()) if config.is_file() else {}
        name = f"trial-{trial.name}" + (f"-{path.parent.name}" if several else "")
        return name, params, {"role": "trial", "label": method}

    tracker = Tracker(sinks)
    tracker.watch_folders(trials, "*/seed*/metrics.jsonl" if several else "*/metrics.jsonl",
                          describe)
    return tracker


def scheduler(sweep: SweepSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    # time in raykd's reported epochs, which count across resumes
    return ASHAScheduler(time_attr="epoch", max_t=epochs,
                         grace_period=min(sweep.grace_period, epochs),
                         reduction_factor=sweep.reduction_factor)


def search_alg(sweep: SweepSpec):
    if sweep.search == "random":
        return None
    if any(d.type == "grid" for d in sweep.space.values()):
        raise RaykdError("sweep.search optuna cannot take grid dimensions; use choice")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=0)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def sweep_table(grid, keys: list[str], epochs: int):
    """One row per trial: sampled values, best and last val_top1 (a trial of several seeds:
    their mean), epochs run, status, wall time."""
    import pandas as pd

    rows = []
    for result in grid:
        history = result.metrics_dataframe
        vals = history["val_top1"] if history is not None and "val_top1" in history else []
        ran = int(history["epoch"].max()) if len(vals) else 0
        status = ("failed" if result.error is not None else
                  "finished" if ran >= epochs else "stopped")
        rows.append({
            "trial": (result.metrics or {}).get("trial_id", Path(result.path).name),
            **{k: _plain(result.config.get(k)) for k in keys},
            "best_val_top1": float(max(vals)) if len(vals) else float("nan"),
            "last_val_top1": float(list(vals)[-1]) if len(vals) else float("nan"),
            # a trial of several seeds: the spread of its last epoch's val_top1 over them
            "last_val_top1_std": float(history["val_top1_std"].iloc[-1])
            if len(vals) and "val_top1_std" in history else float("nan"),
            "epochs": ran, "status": status,
            "wall_s": float((result.metrics or {}).get("time_total_s", float("nan"))),
            "error": "" if result.error is None else one_line(result.error)})
    return pd.DataFrame(rows)


def plot_sweep(table, keys: list[str], path: Path) -> None:
    """val_top1 (last epoch) against each searched parameter, stopped trials hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for status, face in (("finished", "#4c72b0"), ("stopped", "none")):
            part = table[table.status == status]
            ax.scatter([str(v) if isinstance(v, str) else v for v in part[key]],
                       part["last_val_top1"], facecolors=face, edgecolors="#4c72b0",
                       label=status)
        ax.set_xlabel(key.split(".", 1)[-1], fontsize=8)
        ax.set_ylabel("val_top1 (last epoch)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
