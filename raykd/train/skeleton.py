"""The one epoch skeleton, run in every Ray Train worker for every kind of unit.

Worker set-up, resume, the optimisation step, loss averaging, the epoch line, checkpointing and
export are written once here. A unit kind (a `UnitTrainer` subclass, registered by name) supplies
only what differs: the trainable module, its batches, the named losses of one batch, its
evaluation, its export, and its results rows (built on the driver from the final metrics).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, ClassVar, Iterable

import ray.train
import ray.train.torch
import torch
from torch import nn

from raykd.driver.units import Unit
from raykd.log import duration, log, quiet_ray_logs, setup_logging
from raykd.teacher.access import store_outputs
from raykd.train.optim import make_optimizer, make_scheduler
from raykd.train.precision import StepPrecision
from raykd.train.progress import Progress


class UnitTrainer:
    kind: ClassVar[str] = ""
    data_parallel: ClassVar[bool] = False    # may a run of this kind use several workers (DDP)?

    def __init__(self, unit: Unit, rank: int, world: int, device: torch.device):
        self.unit, self.rank, self.world, self.device = unit, rank, world, device

    # ---- in the worker ---------------------------------------------------------------
    def build(self) -> nn.Module:
        """The trainable module: what the optimizer steps, checkpoints hold and DDP wraps."""
        raise NotImplementedError

    def start(self, start_epoch: int) -> None:
        """After the checkpoint (if any) is restored, before the first epoch."""

    def train_mode(self) -> None:
        """Put whatever trains into training mode at the start of each epoch."""

    def batches(self, epoch: int) -> Iterable[tuple]:
        """One epoch's batches; each is a tuple whose first element holds the batch's samples."""
        raise NotImplementedError

    def losses(self, batch: tuple, epoch: int) -> dict[str, torch.Tensor]:
        """Named losses of one batch; the skeleton sums them, steps and logs each."""
        raise NotImplementedError

    def evaluate(self, epoch: int, final: bool, seen: int) -> dict[str, Any]:
        """Metrics after an epoch (the test split only when `final`)."""
        return {}

    def summary(self, metrics: dict) -> str:
        """This kind's part of the epoch line."""
        return ""

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """Anything to store per epoch besides metrics and checkpoint (rank 0 only)."""

    def untrained_metrics(self) -> dict:
        """Metrics of a run with zero epochs (evaluation only)."""
        raise NotImplementedError(f"a {self.kind} unit needs at least one epoch")

    def export(self) -> None:
        """Write the trained model (rank 0 only)."""
        raise NotImplementedError

    # ---- on the driver ---------------------------------------------------------------
    @classmethod
    def rows(cls, unit: Unit, metrics: dict, common: dict, num_classes: int,
             input_shape) -> list[dict]:
        """The results rows of a finished unit, from its final metrics."""
        raise NotImplementedError

    @classmethod
    def stored(cls, unit: Unit) -> list[dict] | None:
        """Rows of an identical unit trained before (by any job), its export placed at the
        unit's export path; None to train it. Called at launch, teachers resolved."""
        return None

    @classmethod
    def store(cls, unit: Unit, rows: list[dict]) -> None:
        """Keep a freshly finished unit for reuse by later jobs (called on the driver)."""


UNIT_KINDS: dict[str, type[UnitTrainer]] = {}


def register_kind(cls: type[UnitTrainer]) -> type[UnitTrainer]:
    UNIT_KINDS[cls.kind] = cls
    return cls


def train_epoch(trainer: UnitTrainer, optimizer, epoch: int,
                precision: StepPrecision) -> tuple[dict[str, float], int]:
    """One pass over the epoch's batches: the summed loss and named terms (weighted by batch
    size), and the samples seen."""
    trainer.train_mode()
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    for batch in trainer.batches(epoch):
        batch = precision.batch(batch)
        with precision.autocast():
            terms = trainer.losses(batch, epoch)
        terms = {name: value.float() for name, value in terms.items()}
        loss = sum(terms.values())
        precision.step(loss, optimizer)
        n = len(batch[0])
        seen += n
        sums["loss"] += loss.item() * n
        for name, value in terms.items():
            sums[f"loss_{name}"] += value.item() * n
    return sums, seen


def say_epoch(key: str, trainer: UnitTrainer, metrics: dict, spent: list[float]) -> None:
    """The epoch's progress line: each named loss, the kind's own summary, time and ETA."""
    epoch, epochs = metrics["epoch"], metrics["epochs"]
    parts = "  ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
    eta = sum(spent) / len(spent) * (epochs - epoch)
    log.info("[%s] epoch %d/%d  loss %.4f (%s)  %s  %.1fs  eta %s", key, epoch, epochs,
             metrics.get("loss", float("nan")), parts, trainer.summary(metrics),
             metrics["epoch_s"], duration(eta))


def run_epochs(kind: type[UnitTrainer], unit: Unit, alone: bool = False,
               threads=None) -> None:
    """Train `unit` with the trainer `kind` inside a Ray Train worker; `alone`: this worker is
    a lane of a pack and trains its unit by itself (rank 0 of 1 for the unit; the run's other
    workers train other units, and nothing here waits for them). `threads(own)`: the torch
    threads for the next epoch (a lane may borrow its idle neighbours' CPUs, raykd.train.lanes)."""
    setup_logging()
    quiet_ray_logs()
    ctx = ray.train.get_context()
    rank, world = (0, 1) if alone else (ctx.get_world_rank(), ctx.get_world_size())
    own = max(1, int(unit.cpus_per_worker))   # this worker's CPUs, one torch thread each
    torch.set_num_threads(own)
    trainer = kind(unit, rank, world, ray.train.torch.get_device())
    module = trainer.build()
    precision = StepPrecision(unit.optim, trainer.device)
    precision.prepare(module, unit.optim.compile)
    optimizer = make_optimizer(module.parameters(), unit.optim)
    scheduler = make_scheduler(optimizer, unit.optim)
    progress = Progress(unit, module, optimizer, scheduler, trainer.device, rank, precision)
    start_epoch = progress.restore()
    trainer.start(start_epoch)
    epochs = unit.optim.epochs
    spent: list[float] = []
    for epoch in range(start_epoch, epochs):
        if threads is not None and (n := threads(own)) != torch.get_num_threads():
            torch.set_num_threads(n)
        started, started_at = time.perf_counter(), time.time()
        sums, seen = train_epoch(trainer, optimizer, epoch, precision)
        scheduler.step()
        train_s = time.perf_counter() - started
        metrics = {k: v / max(seen, 1) for k, v in sums.items()}
        # wall-clock span of the epoch's training, as the worker saw it
        metrics.update(epoch=epoch + 1, epochs=epochs, resumed_from=start_epoch,
                       lr=optimizer.param_groups[0]["lr"], epoch_s=train_s,
                       threads=torch.get_num_threads(),
                       epoch_started_at=started_at, epoch_finished_at=started_at + train_s,
                       node=ray.get_runtime_context().get_node_id())
        metrics.update(trainer.evaluate(epoch, epoch == epochs - 1, seen))
        spent.append(time.perf_counter() - started)     # training and evaluation
        if rank == 0:
            say_epoch(unit.key, trainer, metrics, spent)
            trainer.end_epoch(epoch, metrics)
        progress.end_epoch(epoch, metrics)
    if epochs == 0:
        metrics = {"epoch": 0, "epochs": 0, "resumed_from": 0, **trainer.untrained_metrics()}
        progress.save(-1, metrics)
    progress.finish(start_epoch, epochs)
    if rank == 0:
        trainer.export()
        store_outputs(unit, trainer.device)
