"""Planning: a job spec becomes units (teachers per seed, then whatever each method plans).

The planner knows teachers and seeds; everything a method needs beyond one student per chain
link (DIH's heads, Neighbourhood Distillation's parts and stitched students) comes from that
method's `plan` hook, so adding a method or a unit kind never touches this file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from raykd.driver.units import OutputsToStore, Unit
from raykd.errors import RaykdError
from raykd.files import file_hash
from raykd.job.specs import JobSpec
from raykd.methods import MethodContext, method_params
from raykd.models import LOGITS, StagedModel, build_model
from raykd.models.export import load_export
from raykd.models.weights import load_weights
from raykd.teacher.replay import replay_refusal


def with_weights(model, part, where: str):
    """The architecture with the job's starting weights loaded: a file that does not fit fails
    here, on the driver, before any run."""
    if part.weights:
        load_weights(model, part.weights, part.weights_skip, f"{where}.weights")
    return model


def teacher_models(spec: JobSpec) -> list[str]:
    """One architecture per teacher of a seed."""
    return list(spec.teacher.models) or [spec.teacher.model] * spec.teacher.count


def teacher_architectures(spec: JobSpec, splits) -> list[StagedModel]:
    """Every teacher's architecture for one seed (weights are not needed for planning)."""
    if spec.teacher.checkpoint:
        return [load_export(spec.teacher.checkpoint)]
    c = splits.in_channels
    return [with_weights(build_model(m, splits.num_classes, c, splits.image_size,
                                     spec.teacher.model_args,
                                     spec.teacher.stages), spec.teacher, "teacher")
            for m in teacher_models(spec)]


@dataclass
class SeedPlan:
    """What a method's `plan` hook sees for one seed, and how it makes units."""
    spec: JobSpec
    seed: int
    teacher_arch: StagedModel           # teacher 0's architecture (shapes only)
    student_arch: StagedModel           # the job's student architecture (shapes only)
    input_shape: tuple[int, int, int]
    teachers: list[Unit]          # this seed's teacher units ([] with teacher.checkpoint)
    exports: list[str]            # this seed's teacher exports (teacher 0 first)
    units: dict[str, Unit] = field(default_factory=dict)   # planned so far in this seed
    num_classes: int = 0

    def unit(self, key: str, **kw) -> Unit:
        """A unit with the job's paths and defaults."""
        run_dir = self.spec.run_dir
        kw.setdefault("cpus_per_worker", self.spec.ray.cpus_per_worker)
        return Unit(key=key, data=self.spec.data, seed=self.seed,
                    export_path=str(run_dir / "models" / f"{key}.pt"),
                    history_path=str(run_dir / "metrics" / f"{key}.jsonl"), **kw)

    def add(self, unit: Unit) -> Unit:
        """Add a unit, or return the one already planned under its key (shared work, e.g. heads
        that two methods use, is planned once)."""
        return self.units.setdefault(unit.key, unit)

    def store_outputs(self, keys: list[str], taps: list[str],
                      splits=("train", "val", "test")) -> None:
        """Have the units `keys` (this seed's teachers) store these outputs of theirs once
        trained, for the units that read them from the teacher cache (no-op when it is off)."""
        cache_dir = self.spec.teacher_cache_dir
        for key in keys if cache_dir else []:
            unit = self.units[key]
            unit.store_outputs = unit.store_outputs or OutputsToStore(cache_dir)
            unit.store_outputs.add(splits, taps)

    def replayed(self, cls, params) -> tuple[bool, bool]:
        """Under `teacher.replay`: does this method's student read its teacher (so replays it),
        and does it read the teacher's logits alone (kd, dkd, dist: one entry per teacher, which
        the teacher's own lane fills)?"""
        if self.spec.teacher.replay is None or not cls.uses_teacher:
            return False, False
        method = cls(params, MethodContext(
            student=self.student_arch, num_classes=self.num_classes, input_shape=self.input_shape,
            teacher=self.teacher_arch, teachers=[self.teacher_arch] * len(self.exports or [1]),
            shapes_only=True))
        return bool(method.teacher_taps()), method.score_names() == [LOGITS]

    def store_replay(self, teacher_keys: list[str]) -> None:
        """Have these teachers fill their logits' replay entry once trained, before their
        students start. Other replaying methods' entries (DIH's heads) are filled by their first
        student."""
        replay, cache_dir = self.spec.teacher.replay, self.spec.teacher_cache_dir
        for key in teacher_keys if cache_dir else []:
            unit = self.units[key]
            unit.store_outputs = unit.store_outputs or OutputsToStore(cache_dir)
            unit.store_outputs.replay = replay

    @property
    def first_teacher(self) -> list[str]:
        return [t.key for t in self.teachers[:1]]

    def students(self, label: str, method_name: str, entry: dict, params, cls,
                 depends_on: list[str] = (), per_link=None, **kw) -> list[Unit]:
        """One student per chain link, each distilling from the previous link's student.
        `per_link(link, teacher_exports, teacher_keys)` may add fields to a link's unit (e.g.
        the heads trained on that link's teacher) and list extra dependencies under
        `depends_on`."""
        chain = int(entry.get("chain", 1))
        parameters = {k: v for k, v in entry.items() if k not in ("method", "chain")}
        replays, logits_only = self.replayed(cls, params)
        out: list[Unit] = []
        for link in range(1, chain + 1):
            name = label if chain == 1 else f"{label}.{link}"
            previous = out[-1] if out else None
            mode = cls.link_teacher_mode(params, link, chain)
            if not cls.uses_teacher:
                teachers, deps = [], []
            elif previous is None:
                teachers = list(self.exports)
                deps = [t.key for t in self.teachers] if mode != "first" else self.first_teacher
            else:
                teachers, deps = [previous.export_path], [previous.key]
            extra = dict(per_link(link, teachers, deps)) if per_link else {}
            fields = dict(
                role="student", label=name, method_name=method_name, method=parameters,
                model=self.spec.student.model, model_args=dict(self.spec.student.model_args),
                model_stages=list(self.spec.student.stages),
                weights=self.spec.student.weights,
                weights_skip=list(self.spec.student.weights_skip),
                optim=self.spec.student.train,
                init_from=self.spec.student.checkpoint, reinit=self.spec.student.reinit,
                diagnostics_dir=str(self.spec.run_dir / "diagnostics" / f"seed{self.seed}-{name}"),
                teacher_candidates=teachers, teacher_mode=mode,
                replay=self.spec.teacher.replay if replays else None,
                depends_on=deps + list(depends_on) + extra.pop("depends_on", []))
            student = self.unit(f"seed{self.seed}-{name}", **{**fields, **kw, **extra})
            out.append(self.add(student))
            if previous is None and logits_only:
                self.store_replay([k for k in deps if k in self.units])
        return out


def student_architecture(spec: JobSpec, splits) -> StagedModel:
    if spec.student.checkpoint:
        return load_export(spec.student.checkpoint)
    return with_weights(build_model(spec.student.model, splits.num_classes, splits.in_channels,
                                    splits.image_size, spec.student.model_args,
                                    spec.student.stages),
                        spec.student, "student")


# Fields that say where a unit's outputs go or how it is run now, not what it trains
_NOT_SETTINGS = {"export_path", "history_path", "diagnostics_dir", "teacher_exports", "teachers",
                 "resume_dir", "state_dir", "queued_at", "fail_at_epoch", "store_outputs",
                 "settings", "cpus_per_worker"}


def settle_settings(units: list[Unit]) -> None:
    """Each unit's `settings` digest: its own fields that decide what it trains, its starting
    weights' content, and its dependencies' digests (a changed teacher changes its students')."""
    by_key = {u.key: u for u in units}

    def digest(unit: Unit) -> str:
        if not unit.settings:
            fields = {k: v for k, v in dataclasses.asdict(unit).items()
                      if k not in _NOT_SETTINGS}
            if unit.weights and os.path.isfile(unit.weights):
                fields["weights_content"] = file_hash(unit.weights)
            deps = [digest(by_key[d]) for d in sorted(unit.depends_on) if d in by_key]
            blob = json.dumps([fields, deps], sort_keys=True, default=str)
            unit.settings = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return unit.settings

    for unit in units:
        digest(unit)


def plan_units(spec: JobSpec, splits) -> list[Unit]:
    """Per seed: the teachers, then each method's units (its `plan` hook)."""
    teacher_arch = teacher_architectures(spec, splits)[0]
    student_arch = student_architecture(spec, splits)
    units: list[Unit] = []
    for seed in spec.seeds:
        plan = SeedPlan(spec, seed, teacher_arch, student_arch, splits.input_shape, [], [],
                        num_classes=splits.num_classes)
        if spec.teacher.checkpoint:
            plan.exports = [spec.teacher.checkpoint]
        for k, arch in enumerate([] if spec.teacher.checkpoint else teacher_models(spec)):
            suffix = str(k) if k else ""
            plan.teachers.append(plan.add(plan.unit(
                f"seed{seed}-teacher{suffix}", role="teacher", label="ce" + (f".t{k}" if k else ""),
                method_name="ce", model=arch, model_args=dict(spec.teacher.model_args),
                model_stages=list(spec.teacher.stages), weights=spec.teacher.weights,
                weights_skip=list(spec.teacher.weights_skip), optim=spec.teacher.train)))
        plan.exports = plan.exports or [t.export_path for t in plan.teachers]
        for label, entry in spec.methods.items():
            cls, params = method_params(label, entry)
            cls.plan(plan, label, dict(entry or {}), params)
        units.extend(plan.units.values())
    settle_settings(units)
    return units


def preflight(spec: JobSpec, splits) -> None:
    """Build every method against the job's student and teacher architectures on the driver,
    so a mismatch (stage counts, feature shapes, k > classes) fails before any run starts."""
    student = student_architecture(spec, splits)
    teachers = teacher_architectures(spec, splits)
    for label, entry in spec.methods.items():
        cls, params = method_params(label, entry)
        chain = int((entry or {}).get("chain", 1))
        chosen = teachers if cls.link_teacher_mode(params, 1, chain) == "all" else teachers[:1]
        contexts = [chosen]
        if chain > 1:
            contexts.append([student])     # later links distil from the previous student
        for group in contexts:
            method = cls(params, MethodContext(student=student, num_classes=splits.num_classes,
                                               input_shape=splits.input_shape, teacher=group[0],
                                               teachers=group, shapes_only=True))
            if spec.teacher.replay is not None and method.teacher_taps() \
                    and not method.score_names():
                raise RaykdError(replay_refusal(
                    label if label == cls.name else f"{label} ({cls.name})"))
    check_replay(spec, splits)


def check_replay(spec: JobSpec, splits) -> None:
    """`teacher.replay` needs augmented training data and the teacher cache to store views in."""
    if spec.teacher.replay is None:
        return
    if splits.deterministic:
        raise RaykdError("teacher.replay: the training data is not augmented (data.augment is "
                         f"{spec.data.augment!r}, which is 'none' for {spec.data.dataset}), so "
                         "the teacher's outputs are cached once without replay; drop "
                         "teacher.replay or set data.augment to standard or cifar")
    if spec.teacher_cache_dir is None:
        raise RaykdError("teacher.replay stores the teacher's views in the teacher cache, and "
                         "teacher.cache is false; set teacher.cache: true or drop teacher.replay")


def resolve_teachers(unit: Unit, rows: list[dict]) -> list[str]:
    """The exports a unit distils from; `best` is the candidate with the highest val_top1."""
    if unit.teacher_mode == "all":
        return list(unit.teacher_candidates)
    if unit.teacher_mode == "best" and len(unit.teacher_candidates) > 1:
        scores = {r["export"]: r["val_top1"] for r in rows if r.get("role") == "teacher"}
        return [max(unit.teacher_candidates, key=lambda e: scores.get(e, -1.0))]
    return list(unit.teacher_candidates[:1])


def needed_by(units: dict[str, Unit], keys) -> set[str]:
    """The keys and everything they depend on, transitively."""
    out, todo = set(), list(keys)
    while todo:
        key = todo.pop()
        if key not in out:
            out.add(key)
            todo.extend(units[key].depends_on)
    return out
