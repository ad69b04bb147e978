"""What every training loop does at an epoch's end, and at its start after a failure.

Each epoch: append the metrics to the unit's history, checkpoint the trainable state, and raise
an injected failure if a test asked for one. A unit that has its run to itself checkpoints with
`ray.train.report` (every rank calls it: it is a barrier; rank 0 attaches the checkpoint), so
Tune sees every epoch and Ray Train hands the checkpoint back when the run is fitted again. A unit
in a lane of a pack (`unit.state_dir` set) writes its state file into its own folder instead:
the lanes of a pack train different units at different speeds, and a report would make every
lane wait for the slowest at each epoch.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import ray.train
import torch

from raykd.errors import RaykdError, one_line
from raykd.files import atomic_write, torch_load, torch_save
from raykd.log import log
from raykd.train.layout import metrics_file, state_file


def report(key: str, metrics: dict, state: dict | None, rank: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0 and state is not None:
            torch.save(state, os.path.join(d, state_file(key)))
            with open(os.path.join(d, metrics_file(key)), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def save_in_folder(folder: str, key: str, metrics: dict, state: dict) -> None:
    """A packed unit's checkpoint: its state file, then its metrics (each renamed into place,
    metrics last, so metrics never name an epoch whose state is missing)."""
    torch_save(state, os.path.join(folder, state_file(key)))
    atomic_write(os.path.join(folder, metrics_file(key)),
                 lambda tmp: Path(tmp).write_text(json.dumps(metrics)))


class Progress:
    def __init__(self, unit, module: torch.nn.Module, optimizer, scheduler, device, rank: int,
                 precision=None):
        self.unit, self.module, self.optimizer, self.scheduler = unit, module, optimizer, scheduler
        self.precision = precision      # its loss scaler's state rides in the checkpoint
        self.device, self.rank = device, rank
        self.last: dict = {}

    def restore(self) -> int:
        """Load the latest checkpoint, if any; return the epoch to start from."""
        own = self.unit.state_dir and os.path.join(self.unit.state_dir, state_file(self.unit.key))
        if own and os.path.isfile(own):    # a packed unit after a retry or a restart of its pack
            return self._load(own)
        checkpoint = None if self.unit.state_dir else ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                return self._load(os.path.join(d, state_file(self.unit.key)))
        if self.unit.resume_dir:   # the last checkpoint of the pack it was trained in
            return self._load(os.path.join(self.unit.resume_dir, state_file(self.unit.key)))
        return 0

    def _load(self, path: str) -> int:
        if not os.path.isfile(path):
            return 0
        try:
            state = torch_load(path, map_location=self.device)
        except RaykdError as e:     # truncated or corrupted: a re-run could never get past it
            self.set_aside(path, e)
            return 0
        if state.get("settings", self.unit.settings) != self.unit.settings:
            if self.rank == 0:   # a checkpoint of what the unit trained before it changed
                log.info("[%s] its settings changed since its last checkpoint: training it "
                         "from the start", self.unit.key)
            return 0
        self.module.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision is not None:
            self.precision.load_state_dict(state.get("scaler", {}))
        self.last = state["metrics"]
        start = state["epoch"] + 1
        if self.rank == 0 and start > 0:
            log.info("[%s] resuming after epoch %d", self.unit.key, start)
        return start

    def set_aside(self, path: str, error: Exception) -> None:
        """A damaged checkpoint is renamed `*.damaged` (kept for a look, never read again) and
        the unit trains from the start, its old history set aside the same way."""
        if self.rank != 0:
            return
        for damaged in (path, self.unit.history_path):
            if damaged and os.path.isfile(damaged):
                os.replace(damaged, f"{damaged}.damaged")
        log.warning("[%s] its checkpoint %s is damaged (%s); set aside as %s.damaged, training "
                    "it from the start", self.unit.key, path, one_line(error), path)

    def state(self, epoch: int, metrics: dict) -> dict:
        return {"trainable": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "metrics": metrics,
                "settings": self.unit.settings,
                "scaler": self.precision.state_dict() if self.precision is not None else {}}

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """epoch is 0-based; metrics are this epoch's."""
        path = self.unit.history_path
        if self.rank == 0 and path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        self.save(epoch, metrics)
        self.last = metrics
        if self.unit.fail_at_epoch is not None and epoch + 1 == self.unit.fail_at_epoch:
            raise RuntimeError(f"injected failure after epoch {epoch + 1} of {self.unit.key}")

    def save(self, epoch: int, metrics: dict) -> None:
        if self.unit.state_dir:
            if self.rank == 0:
                save_in_folder(self.unit.state_dir, self.unit.key, metrics,
                               self.state(epoch, metrics))
        else:
            report(self.unit.key, metrics, self.state(epoch, metrics), self.rank)

    def finish(self, start_epoch: int, epochs: int) -> None:
        """A unit resumed after its last epoch trains nothing: it saves its final state again,
        marked as resumed there (its row then says `resumed_from` N, as its log line says
        "resuming after epoch N"), and a run's fit result carries its metrics."""
        if 0 < epochs <= start_epoch:
            self.last = {**self.last, "resumed_from": start_epoch}
            self.save(epochs - 1, self.last)
