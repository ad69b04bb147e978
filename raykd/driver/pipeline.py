"""From a job spec to results rows: plan the units, run them on Ray in dependency order.

spec -> units (raykd.driver.plan) -> concurrent Ray Train runs (raykd.train.runner), launched by the
dependency scheduler (raykd.driver.scheduler) with their teachers attached (raykd.teacher.pool) -> rows
in RUN_DIR/results.parquet. Units with a row already are not run again; an interrupted unit
resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import ray
import yaml

from raykd.cluster.storage import check_shared_storage
from raykd.data import load_dataset
from raykd.driver.ownership import own
from raykd.driver.plan import needed_by, plan_units, preflight, resolve_teachers
from raykd.driver.scheduler import Launch, run_in_order
from raykd.errors import RaykdError, out_of_space
from raykd.job import factories
from raykd.job.config import job_factories
from raykd.job.specs import JobSpec
from raykd.log import duration, log
from raykd.methods import method_class
from raykd.outputs.results import ResultsTable
from raykd.teacher.pool import TeacherPool
from raykd.teacher.store import STORE_DIR, TeacherStore

PROGRESS_S = 30.0   # how often a running job says how many units are done, training, waiting


def default_parallelism(spec: JobSpec) -> int:
    """Runs (or a pack's lanes) the cluster can hold at once: by CPUs (GPUs with use_gpu) and
    by every custom resource each worker asks for, so no run waits for slots that never come."""
    resources = ray.cluster_resources()
    if spec.ray.gpus:
        per_run, have = spec.ray.workers * spec.ray.gpus, resources.get("GPU", 0)
    else:
        per_run, have = spec.ray.workers * spec.ray.cpus_per_worker, resources.get("CPU", 1)
    slots = math.floor(have / per_run)
    for name, amount in spec.ray.resources_per_worker.items():
        if amount > 0:
            slots = min(slots, math.floor(resources.get(name, 0) / (amount * spec.ray.workers)))
    return max(1, slots)


# Packs whose units all finished, still tearing their Ray Train run down. The job does not
# wait for them at its end (a `raykd run` exits seconds sooner), but whatever starts Ray work
# next in this process does (`release_finished_runs`), so that new runs never queue for CPUs a
# finished run still holds (Train and Tune wait for resources in coarse steps).
_TEARDOWNS: list = []
TEARDOWN_BOUND_S = 60.0   # a finished run's teardown takes seconds; past this it is stuck


def release_finished_runs(bound_s: float = TEARDOWN_BOUND_S) -> None:
    """Return once the runs this process finished have ended. A run still shutting down after
    `bound_s` is stopped: the task that launched it is killed, and its Train controller and
    workers with it (Train's placement-group cleaner then frees their CPUs). Never waits longer
    than twice `bound_s`."""
    if not _TEARDOWNS:
        return
    refs = list(_TEARDOWNS)
    _TEARDOWNS.clear()
    _, stuck = ray.wait(refs, num_returns=len(refs), timeout=bound_s)
    if stuck:
        log.warning("%d finished run%s still shutting down after %.0f s; stopping %s",
                    len(stuck), "s were" if len(stuck) > 1 else " was", bound_s,
                    "them" if len(stuck) > 1 else "it")
        for ref in stuck:
            ray.cancel(ref, force=True)
        ray.wait(stuck, num_returns=len(stuck), timeout=bound_s)


def wait_for_room(need: dict[str, float], what: str, bound_s: float = TEARDOWN_BOUND_S) -> None:
    """Return once the cluster has `need` free (e.g. {"CPU": 1}: one trial's worker), so that
    `what` starts placed, not queued behind resources nothing will give back; one line naming
    what it waited for, and what holds the resources, after `bound_s`."""
    deadline = time.monotonic() + bound_s
    while True:
        free = ray.available_resources()
        short = {k: v for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    total = ray.cluster_resources()
    held = [f"{k}: {free.get(k, 0.0):g} of {total.get(k, 0.0):g} free" for k in short]
    groups = [g for g in ray.util.placement_group_table().values() if g.get("state") == "CREATED"]
    raise RaykdError(f"{what} needs {need} and after {bound_s:.0f} s the cluster still has "
                     f"{'; '.join(held)} ({len(groups)} placement groups hold resources: "
                     "`ray list placement-groups` shows whose); free them and re-run")


def run_job(spec: JobSpec, fail_at: dict[str, int] | None = None, splits=None, only=None,
            checked: bool = False):
    """Run every unit of the job (or only those `only` names and what they depend on); return
    the results table as a DataFrame. `checked`: the caller has run `preflight` on the job.

    `fail_at` (unit key -> epoch) injects a failure after that epoch's checkpoint, for tests.
    """
    return JobRun(spec, splits, only, fail_at, checked).run()


@dataclasses.dataclass
class Progress:
    """What a running job says every PROGRESS_S: units done, training, waiting, failed."""
    total: int
    started: float = dataclasses.field(default_factory=time.perf_counter)
    said: float = dataclasses.field(default_factory=time.perf_counter)
    training: int = 0
    failed: int = 0

    def summary(self, done: int) -> str:
        waiting = self.total - done - self.training - self.failed
        return (f"units: {done} done, {self.training} training, {waiting} waiting"
                + (f", {self.failed} failed" if self.failed else "")
                + f"; {duration(time.perf_counter() - self.started)} elapsed")


class JobRun:
    """One run of a job, its steps in the order they happen: `plan` the units (finished ones
    and teachers found in the store are not run again), `schedule` them over packed Ray Train
    runs in dependency order (`pick` chooses what starts together, `launch` starts it with its
    teachers attached, `join` queues more in a running pack), `record` each unit's rows as it
    finishes, and `finish` (one line naming what failed; finished work is kept)."""

    def __init__(self, spec: JobSpec, splits=None, only=None, fail_at=None,
                 checked: bool = False):
        from raykd.train.runner import RunSettings

        self.spec, self.run_dir = spec, spec.run_dir
        self.splits = splits or load_dataset(spec.data)   # absent data fails here
        if not checked:
            preflight(spec, self.splits)
        self.only, self.fail_at = only, fail_at or {}
        self.settings = RunSettings.for_job(spec, self.splits.num_classes,
                                            self.splits.input_shape)
        self.table = ResultsTable(self.run_dir)
        self.store = TeacherStore(Path(spec.output_dir) / STORE_DIR, spec.ray.workers) \
            if spec.teacher.reuse else None
        self.prepared: dict = {}       # key -> its Unit with teachers attached, or stored rows
        # factories of the user's own that the job names: allowed, and importable, in its runs
        self.runtime_env = factories.runtime_env(job_factories(spec))

    def run(self):
        own(self.run_dir)            # one driver per run folder (raykd.driver.ownership)
        release_finished_runs()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        check_shared_storage(self.spec.output_dir)   # multi-node clusters only
        (self.run_dir / "job.yaml").write_text(
            yaml.safe_dump(dataclasses.asdict(self.spec), sort_keys=False))
        self.plan()
        self.pool = self.teacher_pool()
        self.tracker = start_tracking(self.spec, self.units, self.done, self.table)
        self.progress = Progress(len(self.units))
        try:
            failures = self.schedule()
        finally:
            self.pool.stop_all()
            if self.tracker:
                self.tracker.close()
        return self.finish(failures)

    # ---- plan ----

    def plan(self) -> None:
        """The job's units, those already finished (a row and an export), and teachers taken
        from the store."""
        units = {u.key: u for u in plan_units(self.spec, self.splits)}
        if self.only is not None:
            keep = needed_by(units, self.only)
            units = {k: u for k, u in units.items() if k in keep}
        for key, epoch in self.fail_at.items():
            units[key].fail_at_epoch = epoch
        self.units = units
        self.done = {k for k, u in units.items() if self.finished(u)}
        reused = [k for k, u in units.items() if self.store and u.role == "teacher"
                  and k not in self.done and self.take_stored(u)]
        if reused:
            log.info("reusing %d trained teachers from %s: %s", len(reused), self.store.root,
                     ", ".join(reused))
        self.done |= set(reused)
        if self.done:
            log.info("%d of %d runs already finished in %s; running the rest", len(self.done),
                     len(units), self.run_dir)
        self.waiting_on = {k: sum(k in u.depends_on for u in units.values()) for k in units}

    def finished(self, unit) -> bool:
        """Trained before with the settings it has now (a row and an export). A unit whose
        settings changed is trained again: its old history is set aside, its row replaced. Rows
        written before raykd recorded settings count as finished."""
        row = self.table.get(unit.key)
        if not row or not Path(unit.export_path).exists():
            return False
        if row.get("settings") in (None, "", unit.settings):
            return True
        log.info("%s: its settings changed since it was trained; training it again", unit.key)
        history = Path(unit.history_path)
        if history.is_file():
            history.replace(history.with_suffix(".replaced.jsonl"))
        return False

    def take_stored(self, unit) -> bool:
        row = self.store.fetch(unit)
        if row:
            self.table.add([row])
        return row is not None

    def teacher_pool(self) -> TeacherPool:
        todo = [u for k, u in self.units.items() if k not in self.done]
        return TeacherPool(
            self.spec.name, self.spec.teacher, self.spec.teacher_cache_dir,
            self.splits.input_shape, users=[u.teacher_candidates for u in todo],
            most_at_once=max([len(u.teacher_candidates) if u.teacher_mode == "all" else 1
                              for u in todo] or [1]),
            run_cpus=self.spec.ray.workers * self.spec.ray.cpus_per_worker,
            runtime_env=self.runtime_env)

    # ---- schedule ----

    def schedule(self) -> dict[str, str]:
        failures = run_in_order(
            {k: u.depends_on for k, u in self.units.items()}, self.launch,
            on_done=self.record, on_failed=self.failed,
            limit=self.spec.ray.max_parallel or default_parallelism(self.spec),
            done=self.done, pick=self.pick, on_tick=self.tick, teardowns=_TEARDOWNS)
        self.progress.training = 0
        log.info(self.progress.summary(len(self.done)))
        return failures

    def packable(self, unit) -> bool:
        """May this unit share a run with others (each in a lane, no gradient exchange)?
        Not when packing is off, nor when it is to train data-parallel over several workers."""
        from raykd.train.kinds import unit_kind

        return self.spec.ray.pack != "off" and not (
            self.spec.ray.workers > 1 and unit_kind(unit.kind).data_parallel)

    def joins(self, unit, cpus: float) -> bool:
        return self.packable(unit) and unit.cpus_per_worker == cpus

    def pick(self, key: str, others: list[str], room: int) -> tuple[list[str], int]:
        """Every ready unit that can share a run with `key` (same CPUs per worker), on as many
        lanes as there are free slots; a lane trains its units one after another."""
        mine = self.units[key]
        if not self.packable(mine):
            return [key], 1
        keys = [key] + [k for k in others if self.joins(self.units[k], mine.cpus_per_worker)]
        keys = keys[:self.spec.ray.pack_max]
        return keys, max(1, min(room, len(keys)))

    def ready_unit(self, key: str):
        """Resolve the unit's teachers (once); its stored rows, its unit, or None (not yet)."""
        from raykd.train.kinds import unit_kind

        if key in self.prepared:
            return self.prepared[key]
        unit = self.units[key]
        if unit.method_name:
            method_class(unit.method_name).prepare(unit, self.table.rows)
        unit.teacher_exports = resolve_teachers(unit, self.table.rows)
        stored = unit_kind(unit.kind).stored(unit)
        if stored:
            log.info("took %s from %s (trained before)", key, stored[0]["reused_from"])
            self.prepared[key] = stored
            return stored
        handles = self.pool.handles_for(unit.teacher_exports)
        if handles is None:
            return None   # its teacher service must wait for CPUs
        unit.teachers = handles
        self.prepared[key] = unit
        return unit

    def launch(self, keys: list[str], lanes: int) -> Launch | None:
        from raykd.train.runner import OpenPack, fit_units

        first = self.ready_unit(keys[0])
        if first is None:
            return None
        if isinstance(first, list):        # stored rows: settled without training
            return Launch(ray.put({keys[0]: first}), [keys[0]])
        if not self.packable(first):
            announce([first], 1)
            fit = fit_units.options(runtime_env=self.runtime_env) if self.runtime_env \
                else fit_units
            return Launch(fit.remote([first], self.settings), [keys[0]])
        pack = OpenPack([first], self.settings, lanes, accept=self.join,
                        priority=self.waiting_on, runtime_env=self.runtime_env)
        self.join(pack, keys[1:], announced=False)
        announce(list(pack.units.values()), lanes)
        return Launch(pack.ref, pack.keys, lanes, group=pack)

    def join(self, pack, offered: list[str], announced: bool = True) -> list[str]:
        """Queue the ready units that fit this running pack; return their keys. Units found in
        the library or store are settled through the pack at once."""
        room = self.spec.ray.pack_max - len(pack.units) - len(pack.resolved)
        taken, fresh = [], []
        for key in offered:
            if len(taken) >= room or not self.joins(self.units[key], pack.cpus_per_worker):
                continue
            unit = self.ready_unit(key)
            if isinstance(unit, list):
                pack.settle(key, unit)
                taken.append(key)
            elif unit is not None:
                fresh.append(unit)
                taken.append(key)
        if fresh and not pack.add(fresh):
            return [k for k in taken if k in pack.resolved]   # it closed meanwhile
        if fresh and announced:
            announce(fresh, 0, joined=True)
        return taken

    def tick(self, plain: list[str], groups: list) -> None:
        """Every PROGRESS_S, say where the job stands (what trains counted now, so that with
        the done set it never adds up to more than the job's units)."""
        now = time.perf_counter()
        if now - self.progress.said >= PROGRESS_S:
            self.progress.said = now
            self.progress.training = len(plain) + sum(g.training() for g in groups
                                                      if hasattr(g, "training"))
            log.info(self.progress.summary(len(self.done)))

    # ---- record ----

    def record(self, key: str, rows: list[dict]) -> None:
        """A unit finished: its rows, the store, its kind's own store, trackers, one line."""
        from raykd.train.kinds import unit_kind

        unit = self.units[key]
        self.pool.release(unit.teacher_candidates)
        self.table.add(rows)
        self.done.add(key)
        if self.store and unit.role == "teacher":
            self.store.publish(unit, rows[0])
        unit_kind(unit.kind).store(unit, rows)
        if self.tracker:
            self.tracker.finish(key, final_numbers(rows))
        accs = ", ".join(f"{r['method']} val_top1 {r['val_top1']:.4f} test_top1 "
                         f"{r['test_top1']:.4f}" for r in rows)
        log.info("[%d/%d] %s: %s (%s)", len(self.done), len(self.units), key, accs,
                 duration(rows[0]["wall_s"]))

    def failed(self, key: str, reason: str) -> None:
        if not reason.startswith("not run"):
            self.pool.release(self.units[key].teacher_candidates)
        self.progress.failed += 1
        log.warning("FAILED %s: %s", key, reason)

    # ---- finish ----

    def finish(self, failures: dict[str, str]):
        full = [k for k, v in failures.items() if out_of_space(v)]
        if full:
            raise RaykdError(f"no space left on the device holding {self.run_dir}; "
                             f"{len(failures)} of {len(self.units)} runs failed ({full[0]} first); "
                             "free space and re-run the job (finished runs are kept)")
        if failures:
            names = ", ".join(f"{k} ({v})" for k, v in failures.items())
            raise RaykdError(f"{len(failures)} of {len(self.units)} runs failed: {names}; "
                             f"finished runs are kept in {self.run_dir}, re-run the job to "
                             "resume")
        return self.table.frame()


def announce(pack: list, lanes: int, joined: bool = False) -> None:
    if joined:
        log.info("queued %s in the running pack", ", ".join(u.key for u in pack))
    elif pack[1:]:
        log.info("started a run of %d units on %d worker%s (more join as they become "
                 "ready): %s", len(pack), lanes, "s" if lanes > 1 else "",
                 ", ".join(u.key for u in pack))
    else:
        log.info("started %s (%s, %s, %d epochs)", pack[0].key, pack[0].role, pack[0].model,
                 pack[0].optim.epochs)


def start_tracking(spec: JobSpec, units: dict, done: set, table: ResultsTable):
    """A tracker following every unit of the job (None when the job asks for no tracking);
    units finished before are handed their stored rows, so a tracker added later catches up."""
    from raykd.outputs.tracking import Tracker, sinks_for, unit_params

    sinks = sinks_for(spec)
    if not sinks:
        return None
    tracker = Tracker(sinks)
    for key, unit in units.items():
        tracker.watch(key, unit.history_path, *unit_params(unit))
        if key in done:
            tracker.finish(key, final_numbers([r for r in table.rows if r.get("unit") == key]))
    return tracker


def final_numbers(rows: list[dict]) -> dict:
    """A unit's final row for trackers; a unit with several rows (DIH heads, a stitched student
    before and after fine-tuning) gets each row's values under its method's name."""
    if len(rows) == 1:
        return rows[0]
    return {f"{r['method']}/{k}": v for r in rows for k, v in r.items()}
