"""From a job spec to results rows: plan the units, run them on Ray in dependency order.

spec -> units (raykd.plan) -> concurrent Ray Train runs (raykd.train.runner), launched by the
dependency scheduler (raykd.scheduler) with their teachers attached (raykd.teacher.pool) -> rows
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

from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.log import duration, log
from raykd.methods import method_class
from raykd.plan import needed_by, plan_units, preflight, resolve_teachers
from raykd.results import ResultsTable
from raykd.scheduler import run_in_order
from raykd.specs import JobSpec
from raykd.storage import check_shared_storage
from raykd.teacher.pool import TeacherPool
from raykd.teacher.store import STORE_DIR, TeacherStore

PROGRESS_S = 30.0   # how often a running job says how many units are done, training, waiting


def default_parallelism(spec: JobSpec) -> int:
    """Runs (or a pack's lanes) the cluster can hold at once: by CPUs (GPUs with use_gpu) and
    by every custom resource each worker asks for, so no run waits for slots that never come."""
    resources = ray.cluster_resources()
    if spec.ray.use_gpu:
        per_run, have = spec.ray.workers, resources.get("GPU", 0)
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


def run_job(spec: JobSpec, fail_at: dict[str, int] | None = None, splits=None,
            only=None):
    """Run every unit of the job (or only those `only` names and what they depend on); return
    the results table as a DataFrame.

    `fail_at` (unit key -> epoch) injects a failure after that epoch's checkpoint, for tests.
    """
    from raykd.train.kinds import unit_kind
    from raykd.train.runner import OpenPack, RunSettings, fit_units

    release_finished_runs()
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    check_shared_storage(spec.output_dir)   # multi-node clusters only
    (run_dir / "job.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    splits = splits or load_dataset(spec.data)   # absent data fails here, before any run
    preflight(spec, splits)
    table = ResultsTable(run_dir)
    units = {u.key: u for u in plan_units(spec, splits)}
    if only is not None:
        keep = needed_by(units, only)
        units = {k: u for k, u in units.items() if k in keep}
    for key, epoch in (fail_at or {}).items():
        units[key].fail_at_epoch = epoch
    done = {k for k, u in units.items() if table.get(k) and Path(u.export_path).exists()}
    store = TeacherStore(Path(spec.output_dir) / STORE_DIR, spec.ray.workers) \
        if spec.teacher.reuse else None
    reused = [k for k, u in units.items() if store and u.role == "teacher" and k not in done
              and _take(store, u, table)]
    if reused:
        log.info("reusing %d trained teachers from %s: %s", len(reused), store.root,
                 ", ".join(reused))
    done |= set(reused)
    if done:
        log.info("%d of %d runs already finished in %s; running the rest", len(done), len(units),
                 run_dir)
    todo = [u for k, u in units.items() if k not in done]
    pool = TeacherPool(
        spec.name, spec.teacher, spec.teacher_cache_dir, splits.input_shape,
        users=[u.teacher_candidates for u in todo],
        most_at_once=max([len(u.teacher_candidates) if u.teacher_mode == "all" else 1
                          for u in todo] or [1]),
        run_cpus=spec.ray.workers * spec.ray.cpus_per_worker)
    tracker = start_tracking(spec, units, done, table)
    started = time.perf_counter()
    settings = RunSettings.for_job(spec, splits.num_classes, splits.input_shape)

    def packable(unit) -> bool:
        """May this unit share a run with others (each in a lane, no gradient exchange)?
        Not when packing is off, nor when it is to train data-parallel over several workers."""
        return spec.ray.pack != "off" and not (
            spec.ray.workers > 1 and unit_kind(unit.kind).data_parallel)

    def joins(unit, cpus: float) -> bool:
        return packable(unit) and unit.cpus_per_worker == cpus

    def group(key: str, others: list[str], room: int) -> tuple[list[str], int]:
        """Every ready unit that can share a run with `key` (same CPUs per worker), on as many
        lanes as there are free slots; a lane trains its units one after another."""
        mine = units[key]
        if not packable(mine):
            return [key], 1
        keys = [key] + [k for k in others if joins(units[k], mine.cpus_per_worker)]
        keys = keys[:spec.ray.pack_max]
        return keys, max(1, min(room, len(keys)))

    prepared: dict = {}
    waiting_on = {k: sum(k in u.depends_on for u in units.values()) for k in units}

    def ready_unit(key: str):
        """Resolve the unit's teachers (once); its stored rows, its unit, or None (not yet)."""
        if key in prepared:
            return prepared[key]
        unit = units[key]
        if unit.method_name:
            method_class(unit.method_name).prepare(unit, table.rows)
        unit.teacher_exports = resolve_teachers(unit, table.rows)
        stored = unit_kind(unit.kind).stored(unit)
        if stored:
            log.info("took %s from %s (trained before)", key, stored[0]["reused_from"])
            prepared[key] = stored
            return stored
        handles = pool.handles_for(unit.teacher_exports)
        if handles is None:
            return None   # its teacher service must wait for CPUs
        unit.teachers = handles
        prepared[key] = unit
        return unit

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

    def launch(keys: list[str], lanes: int):
        first = ready_unit(keys[0])
        if first is None:
            return None
        if isinstance(first, list):
            return ray.put({keys[0]: first}), [keys[0]]
        if not packable(first):
            announce([first], 1)
            return fit_units.remote([first], settings), [keys[0]]
        pack = OpenPack([first], settings, lanes, accept=join, priority=waiting_on)
        join(pack, keys[1:], announced=False)
        announce(list(pack.units.values()), lanes)
        return pack

    def join(pack, offered: list[str], announced: bool = True) -> list[str]:
        """Queue the ready units that fit this running pack; return their keys. Units found in
        the library or store are settled through the pack at once."""
        room = spec.ray.pack_max - len(pack.units) - len(pack.resolved)
        taken, fresh = [], []
        for key in offered:
            if len(taken) >= room or not joins(units[key], pack.cpus_per_worker):
                continue
            unit = ready_unit(key)
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

    def finished(key: str, rows: list[dict]) -> None:
        pool.release(units[key].teacher_candidates)
        table.add(rows)
        done.add(key)
        if store and units[key].role == "teacher":
            store.publish(units[key], rows[0])
        unit_kind(units[key].kind).store(units[key], rows)
        if tracker:
            tracker.finish(key, final_numbers(rows))
        accs = ", ".join(f"{r['method']} val_top1 {r['val_top1']:.4f} test_top1 "
                         f"{r['test_top1']:.4f}" for r in rows)
        log.info("[%d/%d] %s: %s (%s)", len(done), len(units), key, accs,
                 duration(rows[0]["wall_s"]))

    status = {"training": 0, "failed": 0, "said": time.perf_counter()}

    def summary() -> str:
        waiting = len(units) - len(done) - status["training"] - status["failed"]
        return (f"units: {len(done)} done, {status['training']} training, {waiting} waiting"
                + (f", {status['failed']} failed" if status["failed"] else "")
                + f"; {duration(time.perf_counter() - started)} elapsed")

    def tick(plain: list[str], groups: list) -> None:
        """Every PROGRESS_S, say where the job stands (what trains counted now, so that with
        the done set it never adds up to more than the job's units)."""
        now = time.perf_counter()
        if now - status["said"] >= PROGRESS_S:
            status["said"] = now
            status["training"] = len(plain) + sum(g.training() for g in groups
                                                  if hasattr(g, "training"))
            log.info(summary())

    def failed(key: str, reason: str) -> None:
        if not reason.startswith("not run"):
            pool.release(units[key].teacher_candidates)
        status["failed"] += 1
        log.warning("FAILED %s: %s", key, reason)

    try:
        failures = run_in_order({k: u.depends_on for k, u in units.items()}, launch, finished,
                                failed, spec.ray.max_parallel or default_parallelism(spec), done,
                                group=group, on_tick=tick, teardowns=_TEARDOWNS)
        status["training"] = 0
        log.info(summary())
    finally:
        pool.stop_all()
        if tracker:
            tracker.close()
    if failures:
        names = ", ".join(f"{k} ({v})" for k, v in failures.items())
        raise RaykdError(f"{len(failures)} of {len(units)} runs failed: {names}; finished runs "
                         f"are kept in {run_dir}, re-run the job to resume")
    return table.frame()


def start_tracking(spec: JobSpec, units: dict, done: set, table: ResultsTable):
    """A tracker following every unit of the job (None when the job asks for no tracking);
    units finished before are handed their stored rows, so a tracker added later catches up."""
    from raykd.tracking import Tracker, sinks_for, unit_params

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


def _take(store: TeacherStore, unit, table: ResultsTable) -> bool:
    row = store.fetch(unit)
    if row:
        table.add([row])
    return row is not None
