"""From a job spec to results rows: plan the units, run them on Ray in dependency order.

Data flows one way: spec -> units (teacher per seed, then one student per method and seed) ->
concurrent Ray Train runs -> rows in RUN_DIR/results.parquet. Units with a row already are not
run again; an interrupted unit resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import yaml

from raykd.config import JobSpec
from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.methods import method_params
from raykd.results import ResultsTable
from raykd.train.unit import Unit


def head_stages(spec: JobSpec, teacher_arch) -> list[str]:
    """Teacher stages that some method needs heads on, in the teacher's stage order."""
    wanted: set[str] = set()
    for label, entry in spec.methods.items():
        cls, params = method_params(label, entry)
        if cls.uses_heads:
            wanted |= set(cls.head_stages(params, teacher_arch, f"methods.{label}"))
    return [s for s in teacher_arch.stage_names if s in wanted]


def teacher_models(spec: JobSpec) -> list[str]:
    """One architecture per teacher of a seed."""
    return list(spec.teacher.models) or [spec.teacher.model] * spec.teacher.count


def plan_units(spec: JobSpec, teacher_arch=None, input_shape=None) -> list[Unit]:
    """Per seed: the teachers, the heads (if a method uses them), one student per method (or a
    chain of students, each the next one's teacher)."""
    models, metrics = spec.run_dir / "models", spec.run_dir / "metrics"
    stages = head_stages(spec, teacher_arch) if teacher_arch is not None else []
    units: list[Unit] = []

    def unit(key, **kw) -> Unit:
        return Unit(key=key, data=spec.data, export_path=str(models / f"{key}.pt"),
                    history_path=str(metrics / f"{key}.jsonl"),
                    cpus_per_worker=spec.ray.cpus_per_worker, **kw)

    for seed in spec.seeds:
        teachers: list[Unit] = []
        if spec.teacher.checkpoint:
            exports = [spec.teacher.checkpoint]
        else:
            for k, arch in enumerate(teacher_models(spec)):
                key = f"seed{seed}-teacher" + (str(k) if k else "")
                teachers.append(unit(key, role="teacher", label="ce" + (f".t{k}" if k else ""),
                                     method={"method": "ce"}, model=arch,
                                     optim=spec.teacher.train, seed=seed,
                                     train_seed=seed + 1000 * k))
            exports = [t.export_path for t in teachers]
        units.extend(teachers)
        first = [teachers[0].key] if teachers else []
        head_units = []
        groups = [stages] if spec.heads.layout == "together" else [[s] for s in stages]
        for group in (groups if stages else []):
            key = f"seed{seed}-heads" if spec.heads.layout == "together" else f"seed{seed}-head-{group[0]}"
            head_units.append(unit(
                key, role="head", label="heads", method={}, model=spec.teacher.model,
                optim=spec.heads.train, seed=seed, teacher_candidates=exports[:1],
                depends_on=list(first), head_stages=group, head_pooled=spec.heads.pooled))
        units.extend(head_units)
        for label, entry in spec.methods.items():
            cls, params = method_params(label, entry)
            mode = cls.teacher_mode(params)
            chain = int((entry or {}).get("chain", 1))
            deps = ([t.key for t in teachers] if mode != "first" else first) if cls.uses_teacher else []
            parts = []
            if cls.uses_neighbourhoods:
                for name, start, stop in cls.neighbourhood_plan(params, teacher_arch):
                    for cand in params.candidates:
                        parts.append(unit(
                            f"seed{seed}-{label}-{name}-{cand}", role="neighbourhood",
                            label=f"{label}:{name}:{cand}", method={}, model=cand,
                            optim=params.train, seed=seed, teacher_candidates=exports[:1],
                            depends_on=list(first), neighbourhood={
                                "name": name, "start": start, "stop": stop, "candidate": cand,
                                "inputs": params.inputs, "input_shape": list(input_shape),
                                "gaussian_samples": params.gaussian_samples}))
                units.extend(parts)
            previous = None
            for link in range(1, chain + 1):
                name = label if chain == 1 else f"{label}.{link}"
                student = unit(
                    f"seed{seed}-{name}", role="student", label=name, method=entry,
                    model=spec.student.model, optim=spec.student.train, seed=seed,
                    diagnostics_dir=str(spec.run_dir / "diagnostics" / f"seed{seed}-{name}"),
                    teacher_candidates=(exports if previous is None else [previous.export_path])
                    if cls.uses_teacher else [],
                    teacher_mode=mode if previous is None else "first",
                    depends_on=(deps if previous is None else [previous.key])
                    + ([u.key for u in head_units] if cls.uses_heads else []),
                    head_exports=[u.export_path for u in head_units] if cls.uses_heads else [])
                if parts:   # stitched from the distilled parts, then fine-tuned (or not)
                    student.model = "stitched"
                    student.optim = dataclasses.replace(student.optim, epochs=params.finetune_epochs)
                    student.neighbourhood_units = [p.key for p in parts]
                    student.depends_on += [p.key for p in parts]
                    if params.scratch_epochs:
                        units.append(dataclasses.replace(
                            student, key=f"{student.key}.scratch", label=f"{name}.scratch",
                            export_path=student.export_path.replace(".pt", ".scratch.pt"),
                            history_path=student.history_path.replace(".jsonl", ".scratch.jsonl"),
                            diagnostics_dir="", reinit=True, depends_on=list(student.depends_on),
                            optim=dataclasses.replace(student.optim, epochs=params.scratch_epochs)))
                units.append(student)
                previous = student
    return units


def teacher_architectures(spec: JobSpec, splits) -> list:
    """Every teacher's architecture for one seed (weights are not needed for planning)."""
    from raykd.models import build_model
    from raykd.models.export import load_export

    shape = splits.input_shape
    if spec.teacher.checkpoint:
        return [load_export(spec.teacher.checkpoint)]
    return [build_model(m, splits.num_classes, shape[0], shape[1]) for m in teacher_models(spec)]


def teacher_architecture(spec: JobSpec, splits):
    return teacher_architectures(spec, splits)[0]


def preflight(spec: JobSpec, splits) -> None:
    """Build every method against the job's student and teacher architectures on the driver,
    so a mismatch (stage counts, feature shapes, k > classes) fails before any run starts."""
    from raykd.methods import MethodContext, build_method
    from raykd.models import build_model

    shape = splits.input_shape
    student = build_model(spec.student.model, splits.num_classes, shape[0], shape[1])
    teachers = teacher_architectures(spec, splits)
    for label, entry in spec.methods.items():
        cls, params = method_params(label, entry)
        chosen = teachers if cls.teacher_mode(params) == "all" else teachers[:1]
        contexts = [chosen]
        if int((entry or {}).get("chain", 1)) > 1:
            contexts.append([student])     # later links distil from the previous student
        for group in contexts:
            build_method(label, entry, MethodContext(
                student=student, num_classes=splits.num_classes, input_shape=shape,
                teacher=group[0], teachers=group))


def resolve_placement(spec: JobSpec) -> str:
    """`auto` serves the teacher from shard actors only when the job asks for several shards or
    replicas: for one copy of a small teacher the in-process forward is faster (bench/RESULTS.md)."""
    t = spec.teacher
    if t.placement != "auto":
        return t.placement
    return "actors" if (t.shards > 1 or t.replicas > 1) else "local"


def resolve_teachers(unit: Unit, table: ResultsTable) -> list[str]:
    """The exports a unit distils from; `best` is the candidate with the highest val_top1."""
    if unit.teacher_mode == "all":
        return list(unit.teacher_candidates)
    if unit.teacher_mode == "best" and len(unit.teacher_candidates) > 1:
        scores = {r["export"]: r["val_top1"] for r in table.rows if r.get("role") == "teacher"}
        return [max(unit.teacher_candidates, key=lambda e: scores.get(e, -1.0))]
    return list(unit.teacher_candidates[:1])


def choose_stitch(unit: Unit, table: ResultsTable) -> dict:
    """The stitched student's parts: per neighbourhood the candidate with the lowest relative
    reconstruction error, jointly under the method's parameter budget."""
    from raykd.methods.neighbourhood import choose_candidates
    from raykd.models import count_params
    from raykd.models.export import load_export

    _, params = method_params(unit.label, unit.method)
    rows = [r for r in table.rows if r.get("unit") in set(unit.neighbourhood_units)]
    teacher = unit.teacher_candidates[0]
    chosen, _ = choose_candidates(rows, count_params(load_export(teacher)), params.max_params)
    parts = sorted([int(r["nb_start"]), int(r["nb_stop"]), r["export"]] for r in chosen.values())
    return {"teacher": teacher, "parts": parts}


def attach_teachers(unit: Unit, services: "TeacherServices", table: ResultsTable) -> bool:
    """Resolve which teachers the unit uses and how to reach them; False if it must wait."""
    if not unit.teacher_candidates:
        return True
    unit.teacher_exports = resolve_teachers(unit, table)
    handles = services.handles_for(unit)
    if handles is None:
        return False
    unit.teachers = handles
    return True


class TeacherServices:
    """Starts a teacher's shard actors when its first user launches and stops them when its
    last user ends, never holding more CPUs than leave room for one training run."""

    def __init__(self, spec: JobSpec, input_shape, units: list[Unit]):
        import ray

        self.spec = spec
        self.input_shape = input_shape
        self.placement = resolve_placement(spec)
        self.cache_dir = (spec.teacher.cache_dir or str(Path(spec.output_dir) / "feature_cache")
                          ) if spec.teacher.cache else None
        self.live: dict[str, object] = {}
        self.users: dict[str, int] = {}
        for u in units:
            for export in u.teacher_candidates:
                self.users[export] = self.users.get(export, 0) + 1
        t = spec.teacher
        self.service_cpus = t.cpus_per_shard * t.shards * t.replicas
        self.run_cpus = spec.ray.workers * spec.ray.cpus_per_worker
        self.total_cpus = ray.cluster_resources().get("CPU", 0)
        most = max([len(u.teacher_candidates) if u.teacher_mode == "all" else 1 for u in units] or [1])
        if self.placement == "actors" and most * self.service_cpus + self.run_cpus > self.total_cpus:
            raise RaykdError(
                f"teacher services need {most * self.service_cpus:g} CPUs ({most} teacher(s) x "
                f"shards x replicas x cpus_per_shard) plus {self.run_cpus:g} for a training run, "
                f"but the cluster has {self.total_cpus:g}; lower teacher.cpus_per_shard or use "
                "teacher.placement=local")

    def handles_for(self, unit: Unit):
        """Handles for the unit's resolved teachers, starting services as needed; None if the
        unit must wait for resources."""
        from raykd.teacher import TeacherHandle
        from raykd.teacher.service import TeacherService

        if self.placement == "local":
            return [TeacherHandle(e, "local", cache_dir=self.cache_dir) for e in unit.teacher_exports]
        missing = [e for e in unit.teacher_exports if e not in self.live]
        used = self.service_cpus * len(self.live)
        if used + self.service_cpus * len(missing) + self.run_cpus > self.total_cpus:
            return None   # wait for another teacher's users to finish
        t = self.spec.teacher
        for export in missing:
            name = f"{self.spec.name}/{Path(export).stem}"
            log(f"starting teacher service {name}: {t.shards} shard(s) x {t.replicas} replica(s)")
            service = TeacherService(
                name, export, self.input_shape, shards=t.shards, replicas=t.replicas,
                cpus_per_shard=t.cpus_per_shard, gpus_per_shard=t.gpus_per_shard,
                timeout_s=t.timeout_s, cache_dir=self.cache_dir)
            service.wait_ready()
            self.live[export] = service
        return [self.live[e].handle for e in unit.teacher_exports]

    def release(self, unit: Unit) -> None:
        for export in unit.teacher_candidates:
            self.users[export] -= 1
            if self.users[export] == 0 and export in self.live:
                self.live.pop(export).stop()

    def stop_all(self) -> None:
        for service in self.live.values():
            service.stop()
        self.live.clear()


def default_parallelism(spec: JobSpec) -> int:
    import ray

    resources = ray.cluster_resources()
    if spec.ray.use_gpu:
        per_run, have = spec.ray.workers, resources.get("GPU", 0)
    else:
        per_run, have = spec.ray.workers * spec.ray.cpus_per_worker, resources.get("CPU", 1)
    return max(1, math.floor(have / per_run))


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def log(msg: str) -> None:
    print(f"raykd: {msg}", file=sys.stderr, flush=True)


def run_job(spec: JobSpec, fail_at: dict[str, int] | None = None, splits=None):
    """Run every unit of the job; return the results table as a DataFrame.

    `fail_at` (unit key -> epoch) injects a failure after that epoch's checkpoint, for tests.
    """
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    splits = splits or load_dataset(spec.data)   # absent data fails here, before any run
    preflight(spec, splits)
    table = ResultsTable(run_dir)
    units = plan_units(spec, teacher_architecture(spec, splits), splits.input_shape)
    for unit in units:
        if fail_at and unit.key in fail_at:
            unit.fail_at_epoch = fail_at[unit.key]
    done = {u.key for u in units if table.get(u.key) and Path(u.export_path).exists()}
    pending = {u.key: u for u in units if u.key not in done}
    if done:
        log(f"{len(done)} of {len(units)} runs already finished in {run_dir}; running the rest")
    limit = spec.ray.max_parallel or default_parallelism(spec)
    services = TeacherServices(spec, splits.input_shape, [u for u in units if u.key in pending])
    try:
        return _run_units(spec, units, pending, done, table, services, limit, splits)
    finally:
        services.stop_all()


def _run_units(spec, units, pending, done, table, services, limit, splits):
    import ray

    from raykd.train.runner import fit_unit

    run_dir = spec.run_dir
    storage = str(run_dir / "ray")
    dependents: dict[str, int] = {}
    for unit in units:
        for dep in unit.depends_on:
            dependents[dep] = dependents.get(dep, 0) + 1
    in_flight: dict = {}
    failed: dict[str, str] = {}
    started = time.perf_counter()
    total = len(units)
    while pending or in_flight:
        for key, unit in list(pending.items()):
            bad = [d for d in unit.depends_on if d in failed]
            if bad:
                failed[key] = f"not run: {bad[0]} failed"
                del pending[key]
        ready = [u for u in pending.values() if all(d in done for d in u.depends_on)]
        # runs that others wait for (teachers) go first: they are the critical path
        ready.sort(key=lambda u: -dependents.get(u.key, 0))
        for unit in ready:
            if len(in_flight) >= limit:
                break
            if unit.neighbourhood_units and unit.stitch is None:
                unit.stitch = choose_stitch(unit, table)
            if not attach_teachers(unit, services, table):
                continue
            ref = fit_unit.remote(unit, storage, spec.ray.workers, spec.ray.use_gpu,
                                  spec.ray.max_failures, splits.num_classes, splits.input_shape)
            in_flight[ref] = unit
            del pending[unit.key]
            log(f"started {unit.key} ({unit.role}, {unit.model}, {unit.optim.epochs} epochs)")
        if not in_flight:
            for key in pending:   # cannot happen while resources suffice; never drop silently
                failed[key] = "not run: no resources for it and its teacher service"
            break
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        unit = in_flight.pop(ref)
        try:
            rows = ray.get(ref)
        except Exception as exc:  # a run that failed after its retries
            failed[unit.key] = _one_line(exc)
            log(f"FAILED {unit.key}: {failed[unit.key]}")
            continue
        finally:
            services.release(unit)
        table.add(rows)
        done.add(unit.key)
        accs = ", ".join(f"{r['method']} val_top1 {r['val_top1']:.4f} test_top1 {r['test_top1']:.4f}"
                         for r in rows)
        log(f"[{len(done)}/{total}] {unit.key}: {accs} ({rows[0]['wall_s']:.0f}s; "
            f"{time.perf_counter() - started:.0f}s elapsed)")
    if failed:
        names = ", ".join(f"{k} ({v})" for k, v in failed.items())
        raise RaykdError(f"{len(failed)} of {total} runs failed: {names}; finished runs are kept "
                         f"in {run_dir}, re-run the job to resume")
    return table.frame()
