"""Experiment tracking: each unit's per-epoch metrics, parameters and final rows, sent to MLflow
and/or TensorBoard event files.

The driver logs, never the workers: rank 0 of every unit already appends each epoch to the
unit's history file (RUN_DIR/metrics/KEY.jsonl; a sweep trial's in its trial folder), and a
thread in the driver follows those files and forwards new epochs. So nothing is logged by two
workers of a data-parallel run or two lanes of a pack, a tracking server needs to be reachable
from the driver only, and on resume each sink is asked what it already holds (MLflow: the run's
metric history; TensorBoard: its event files) and gets only the epochs after that: nothing is
logged twice, however often the job is interrupted.

Sinks: `MLflowSink` (one parent run per RUN_DIR, one child run per unit, found again by tags on
resume), `TensorBoardSink` (RUN_DIR/tensorboard/UNIT, so `tensorboard --logdir RUN_DIR` shows
every unit's curves).
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Callable

from raykd.errors import one_line
from raykd.log import log

TB_DIR = "tensorboard"
FINAL = "final/"          # final rows' numbers: a unit's last record
# per-epoch bookkeeping, not learning signals: not sent to trackers
SKIP = {"epoch", "epochs", "resumed_from", "epoch_started_at", "epoch_finished_at", "node",
        "teacher_hash", "teacher_checksum_before", "teacher_checksum_after", "seed",
        "started_at", "finished_at", "trained_from", "trained_until"}


def numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in SKIP and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


def flat_params(value, prefix: str = "") -> dict[str, str]:
    """Nested parameters as dotted keys with string values (what trackers store)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(value)[:500]} if prefix else {}


# ---- sinks ---------------------------------------------------------------------------------

class MLflowSink:
    """One MLflow experiment (default: the job's name), a parent run for RUN_DIR, a child run per
    unit. Runs are found again by their tags, so a resumed job adds to the same runs."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, artifacts: Path):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifacts.as_uri())
        self.run_dir = str(run_dir)
        runs = self.client.search_runs(
            [self.experiment], filter_string=f"tags.`raykd.run_dir` = '{self.run_dir}'",
            max_results=5000)
        self.runs = {r.data.tags.get("raykd.unit", ""): r for r in runs}
        parent = self.runs.get("")
        self.parent = parent.info.run_id if parent else self.client.create_run(
            self.experiment, run_name=run_dir.name,
            tags={"raykd.run_dir": self.run_dir, "raykd.unit": ""}).info.run_id

    def logged_until(self, key: str) -> int:
        run = self.runs.get(key)
        if run is None:
            return 0
        if run.info.status == "FINISHED":
            return 1 << 30
        history = self.client.get_metric_history(run.info.run_id, "epoch")
        return int(max((m.step for m in history), default=0))

    def start(self, key: str, params: dict, tags: dict) -> None:
        if self.runs.get(key) is not None:
            return
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment, run_name=key, tags={
            "raykd.run_dir": self.run_dir, "raykd.unit": key, "mlflow.parentRunId": self.parent,
            **{f"raykd.{k}": str(v) for k, v in tags.items()}})
        flat = flat_params(params)
        if flat:
            self.client.log_batch(run.info.run_id,
                                  params=[Param(k, v) for k, v in sorted(flat.items())])
        self.runs[key] = self.client.get_run(run.info.run_id)

    def epochs(self, key: str, records: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(r["epoch"])) for r in records
                   for k, v in {**numbers(r), "epoch": float(r["epoch"])}.items()]
        for i in range(0, len(metrics), 900):        # MLflow takes at most 1000 per batch
            self.client.log_batch(self.runs[key].info.run_id, metrics=metrics[i:i + 900])

    def finish(self, key: str, final: dict, step: int) -> None:
        from mlflow.entities import Metric

        run = self.runs.get(key)
        if run is None or run.info.status == "FINISHED":
            return
        now = int(time.time() * 1000)
        metrics = [Metric(FINAL + k, v, now, step) for k, v in numbers(final).items()]
        if metrics:
            self.client.log_batch(run.info.run_id, metrics=metrics)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        self.runs[key] = self.client.get_run(run.info.run_id)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """RUN_DIR/tensorboard/UNIT: one event folder per unit, scalars by their metric names."""

    def __init__(self, root: Path):
        self.root = root
        self.writers: dict = {}
        self.done: set[str] = set()

    def _writer(self, key: str):
        if key not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[key] = SummaryWriter(str(self.root / key))
        return self.writers[key]

    def logged_until(self, key: str) -> int:
        folder = self.root / key
        if not folder.is_dir():
            return 0
        steps, tags = read_scalars(folder)
        if any(t.startswith(FINAL) for t in tags):
            self.done.add(key)
            return 1 << 30
        return max(steps, default=0)

    def start(self, key: str, params: dict, tags: dict) -> None:
        pass

    def epochs(self, key: str, records: list[dict]) -> None:
        writer = self._writer(key)
        for r in records:
            for name, value in numbers(r).items():
                writer.add_scalar(name, value, int(r["epoch"]))
        writer.flush()

    def finish(self, key: str, final: dict, step: int) -> None:
        if key in self.done:
            return
        writer = self._writer(key)
        for name, value in numbers(final).items():
            writer.add_scalar(FINAL + name, value, step)
        writer.flush()
        self.done.add(key)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def read_scalars(folder: Path) -> tuple[list[int], set[str]]:
    """The steps and tags of every scalar in a folder's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    return [e.step for t in tags for e in acc.Scalars(t)], tags


def sinks_for(spec) -> list:
    """The sinks a job asks for (`tracking:` section); none when it asks for nothing."""
    t, out = spec.tracking, []
    if t.mlflow is not None:
        root = Path(spec.output_dir)
        uri = f"sqlite:///{root / 'mlflow.db'}" if t.mlflow is True else str(t.mlflow)
        quiet_mlflow()
        try:
            out.append(MLflowSink(uri, t.experiment or spec.name, spec.run_dir,
                                  root / "mlflow-artifacts"))
        except Exception as e:    # a tracking server that is down must not stop the training
            log.warning("tracking.mlflow: %s unreachable (%s); the job runs without it, "
                        "re-run it later to log what it trained", uri,
                        one_line(e, first=True, typed=True, limit=200))
    if t.tensorboard:
        out.append(TensorBoardSink(spec.run_dir / TB_DIR))
    return out


def quiet_mlflow() -> None:
    import logging
    import os

    # a server that is down is found in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

    # the embedded store's first use logs its schema migrations at INFO
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---- following history files ---------------------------------------------------------------

class Followed:
    def __init__(self, key: str, path: Path, params: dict, tags: dict):
        self.key, self.path, self.params, self.tags = key, path, params, tags
        self.offset, self.until, self.started = 0, None, False
        self.final: dict | None = None
        self.last_epoch = 0


class Tracker:
    """Follows history files from a thread in the driver and forwards new epochs to the sinks.

    watch(key, path, params, tags): a unit to follow (its file may not exist yet);
    watch_folders(pattern, describe): also follow every file matching a glob under a root,
    found as they appear (sweep trials); finish(key, row): its final row, logged after its last
    epoch; close(): one last pass, then the sinks are closed.
    """

    def __init__(self, sinks: list, poll_s: float = 2.0):
        self.sinks, self.poll_s = sinks, poll_s
        self.units: dict[str, Followed] = {}
        self.finals: dict[str, dict] = {}     # final rows of units not yet found on disk
        self.globs: list[tuple[Path, str, Callable]] = []
        self.lock = threading.Lock()
        self.closed: set[str] = set()          # units whose final row was logged
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raykd-tracking", daemon=True)
        self.failed = False
        self.thread.start()

    def watch(self, key: str, path: str | Path, params: dict, tags: dict | None = None) -> None:
        with self.lock:
            if key not in self.units and key not in self.closed:
                self.units[key] = Followed(key, Path(path), params, tags or {})
                self.units[key].final = self.finals.pop(key, None)

    def watch_folders(self, root: Path, pattern: str, describe: Callable) -> None:
        """describe(path) -> (key, params, tags) for each history file matching root/pattern."""
        with self.lock:
            self.globs.append((Path(root), pattern, describe))

    def finish(self, key: str, row: dict) -> None:
        with self.lock:
            if key in self.units:
                self.units[key].final = dict(row)
            else:
                self.finals[key] = dict(row)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self._pass()
        for sink in self.sinks:
            sink.close()

    def _loop(self) -> None:
        while not self.stopping.wait(self.poll_s):
            self._pass()

    def _pass(self) -> None:
        if self.failed:
            return
        try:
            self._discover()
            with self.lock:
                units = list(self.units.values())
            for unit in units:
                self._follow(unit)
        except Exception as e:   # a tracker that is down must not stop the training
            self.failed = True
            log.warning("tracking stopped: %s (training goes on; results.parquet has every row)",
                        one_line(e, first=True, typed=True))

    def _discover(self) -> None:
        for root, pattern, describe in list(self.globs):
            for path in root.glob(pattern):
                key, params, tags = describe(path)
                self.watch(key, path, params, tags)

    def _follow(self, unit: Followed) -> None:
        if unit.until is None:
            if not unit.path.is_file() and unit.final is None:
                return
            unit.until = {id(s): s.logged_until(unit.key) for s in self.sinks}
        fresh = self._read(unit)
        for sink in self.sinks:
            done_until = unit.until[id(sink)]
            new = [r for r in fresh if int(r["epoch"]) > done_until]
            if not new and (unit.started or done_until > 0):
                continue
            if not unit.started:
                sink.start(unit.key, unit.params, unit.tags)
            if new:
                sink.epochs(unit.key, new)
                unit.until[id(sink)] = int(new[-1]["epoch"])
        unit.started = True
        for r in fresh:
            unit.last_epoch = max(unit.last_epoch, int(r["epoch"]))
        if unit.final is not None:
            for sink in self.sinks:
                sink.finish(unit.key, unit.final, unit.last_epoch)
            with self.lock:
                self.units.pop(unit.key, None)
                self.closed.add(unit.key)

    def _read(self, unit: Followed) -> list[dict]:
        """The complete lines appended since the last read, an epoch once (the first time seen)."""
        if not unit.path.is_file():
            return []
        with open(unit.path, "rb") as f:
            f.seek(unit.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1    # a line being written is left for the next pass
        unit.offset += end
        out = []
        for line in data[:end].splitlines():
            if line.strip():
                record = json.loads(line)
                if "epoch" in record and int(record["epoch"]) > unit.last_epoch:
                    out.append(record)
                    unit.last_epoch = int(record["epoch"])
        return out


def unit_params(unit) -> tuple[dict, dict]:
    """What a unit is, as tracker parameters and tags."""
    import dataclasses

    params = {"model": unit.model, "method": unit.method_name or unit.role,
              "seed": unit.seed, "dataset": unit.data.dataset,
              "train": dataclasses.asdict(unit.optim)}
    if unit.method:
        params["params"] = dict(unit.method)
    tags = {"role": unit.role, "label": unit.label or unit.role, "seed": unit.seed}
    return params, tags
