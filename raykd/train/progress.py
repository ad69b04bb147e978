"""What every training loop does at an epoch's end, and at its start after a failure.

Each epoch: append the metrics to the unit's history, checkpoint the trainable state with
`ray.train.report` (every rank calls it: it is a barrier; rank 0 attaches the checkpoint), and
raise an injected failure if a test asked for one. On start: resume from the run's latest
checkpoint, which Ray Train hands back when a run of the same name is fitted again.
"""
from __future__ import annotations

import json
import os
import tempfile

import ray.train
import torch

from raykd.files import torch_load
from raykd.log import log


def state_file(key: str) -> str:
    """A unit's file in a run's checkpoint (a pack's workers' files are merged into one)."""
    return f"state-{key}.pt"


def report(key: str, metrics: dict, state: dict | None, rank: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0 and state is not None:
            torch.save(state, os.path.join(d, state_file(key)))
            with open(os.path.join(d, f"metrics-{key}.json"), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


class Progress:
    def __init__(self, unit, module: torch.nn.Module, optimizer, scheduler, device, rank: int):
        self.unit, self.module, self.optimizer, self.scheduler = unit, module, optimizer, scheduler
        self.device, self.rank = device, rank
        self.last: dict = {}

    def restore(self) -> int:
        """Load the latest checkpoint, if any; return the epoch to start from."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                return self._load(os.path.join(d, state_file(self.unit.key)))
        if self.unit.resume_dir:   # the last checkpoint of the pack it was trained in
            return self._load(os.path.join(self.unit.resume_dir, state_file(self.unit.key)))
        return 0

    def _load(self, path: str) -> int:
        if not os.path.isfile(path):
            return 0
        state = torch_load(path, map_location=self.device)
        self.module.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.last = state["metrics"]
        start = state["epoch"] + 1
        if self.rank == 0 and start > 0:
            log.info("[%s] resuming after epoch %d", self.unit.key, start)
        return start

    def state(self, epoch: int, metrics: dict) -> dict:
        return {"trainable": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "metrics": metrics}

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """epoch is 0-based; metrics are this epoch's."""
        path = self.unit.history_path
        if self.rank == 0 and path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        report(self.unit.key, metrics, self.state(epoch, metrics), self.rank)
        self.last = metrics
        if self.unit.fail_at_epoch is not None and epoch + 1 == self.unit.fail_at_epoch:
            raise RuntimeError(f"injected failure after epoch {epoch + 1} of {self.unit.key}")

    def finish(self, start_epoch: int, epochs: int) -> None:
        """A run that had already finished reports its final state again, so the fit's result
        carries its metrics."""
        if 0 < epochs <= start_epoch:
            report(self.unit.key, self.last, self.state(epochs - 1, self.last), self.rank)
