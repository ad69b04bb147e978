"""The one training loop. It runs in every Ray Train worker, for teachers and students alike.

The loop asks the method which taps it needs, gets the student's and the teacher's activations,
sums the method's named losses and logs each of them. It never looks at which method it runs.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from raykd.data import load_dataset
from raykd.methods import MethodContext, Step, build_method
from raykd.models import build_model
from raykd.models.export import load_export, save_export
from raykd.models.heads import load_heads
from raykd.models.stitch import build_stitched
from raykd.teacher import open_teacher
from raykd.teacher.cache import cached_teacher
from raykd.train.optim import make_optimizer, make_scheduler
from raykd.train.progress import Progress, report
from raykd.train.unit import Unit


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, device, rank: int = 0,
             world: int = 1) -> float:
    """Top-1 accuracy; with several workers each scores a disjoint shard and counts are summed."""
    shard = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in DataLoader(shard, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        correct[0] += (model(x).argmax(1) == y).sum()
        correct[1] += len(y)
    if world > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return float(correct[0] / correct[1].clamp_min(1))


class WithIndex(torch.utils.data.Dataset):
    """Yields (x, y, index) so a cached teacher can look its outputs up."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def with_teacher(loader, teachers, taps, device):
    """Yield (x, y, pending outputs of each teacher), asking for batch i+1 before batch i is
    trained on, so teachers served by actors work while the student steps."""
    previous = None
    for x, y, index in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        pending = [t.submit(x, taps, index) for t in teachers] if taps else []
        if previous is not None:
            yield previous
        previous = (x, y, pending)
    if previous is not None:
        yield previous


def open_teachers(unit: Unit, taps: list[str], splits, device, rank: int) -> list:
    """The unit's teachers; for deterministic inputs, their stored outputs (computed once)."""
    teachers = [open_teacher(h, device) for h in unit.teachers]
    if not (taps and splits.deterministic):
        return teachers
    return [cached_teacher(t, h.cache_dir, h.export_path, unit.data, "train", splits.train, taps,
                           unit.data.eval_batch_size,
                           log=lambda m: rank == 0 and print(f"[{unit.key}] {m}", flush=True))
            if h.cache_dir else t for t, h in zip(teachers, unit.teachers)]


def write_diagnostics(folder: str, epoch: int, values: dict[str, list[torch.Tensor]]) -> None:
    import pandas as pd

    os.makedirs(folder, exist_ok=True)
    frame = pd.DataFrame({k: torch.cat(v).numpy() for k, v in values.items()})
    frame.insert(0, "epoch", epoch)
    frame.to_parquet(os.path.join(folder, f"epoch-{epoch:04d}.parquet"), index=False)


def quiet_ray_logs() -> None:
    """Ray Train logs every checkpoint and report at INFO; our own epoch line says enough."""
    for name in ("ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # this module names its logger by file path, outside the "ray.train" tree
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


class TrainableParts(torch.nn.Module):
    """The student plus the method's extra modules, so one optimizer, one checkpoint and one
    DDP wrapper cover both. Its forward returns the student's requested taps."""

    def __init__(self, model: torch.nn.Module, extra: torch.nn.Module | None):
        super().__init__()
        self.model = model
        self.extra = extra if extra is not None else torch.nn.Identity()

    def forward(self, x, taps):
        return self.model.features(x, taps)


def train_unit(config: dict) -> None:
    unit: Unit = config["unit"]
    quiet_ray_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(unit.cpus_per_worker)))
    device = ray.train.torch.get_device()
    seed = unit.seed if unit.train_seed is None else unit.train_seed
    torch.manual_seed(seed)

    splits = load_dataset(unit.data)
    if unit.stitch:
        model = build_stitched(unit.stitch)   # the teacher's stem and head, candidates between
        if unit.reinit:                       # same architecture, fresh weights (the baseline)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    else:
        model = build_model(unit.model, splits.num_classes, splits.in_channels, splits.image_size)
    # a model that starts from trained weights (a stitched student) is scored before training
    initial = {f"initial_{name}": evaluate(model.to(device), part, unit.data.eval_batch_size, device)
               for name, part in (("val_top1", splits.val), ("test_top1", splits.test))} \
        if unit.stitch and not unit.reinit else {}
    architectures = [load_export(h.export_path) for h in unit.teachers]
    method = build_method(unit.label, unit.method, MethodContext(
        student=model, num_classes=splits.num_classes, input_shape=splits.input_shape,
        teacher=architectures[0] if architectures else None, teachers=architectures,
        heads=load_heads(unit.head_exports) if unit.head_exports else None))
    trainable = TrainableParts(model, method.modules()).to(device)
    optimizer = make_optimizer(trainable.parameters(), unit.optim)
    scheduler = make_scheduler(optimizer, unit.optim)
    epochs = unit.optim.epochs

    progress = Progress(unit, trainable, optimizer, scheduler, device, rank)
    start_epoch = progress.restore()

    # DDP (gloo or nccl) when there are several workers; a method's extra modules ride along
    wrapped = ray.train.torch.prepare_model(trainable, move_to_device=False) if world > 1 \
        else trainable
    student = trainable.model

    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed) if world > 1 else None
    student_taps = sorted(set(method.student_taps()) | {"logits"})
    teacher_taps = method.teacher_taps() if unit.teachers else []
    teachers = open_teachers(unit, teacher_taps, splits, device, rank)

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(
            WithIndex(splits.train), batch_size=unit.data.batch_size, sampler=sampler,
            shuffle=sampler is None, drop_last=False, num_workers=unit.data.loader_workers,
            generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        trainable.train()
        sums: dict[str, float] = defaultdict(float)
        diagnostics: dict[str, list[torch.Tensor]] = defaultdict(list)
        seen = 0
        for x, y, pending in with_teacher(loader, teachers, teacher_taps, device):
            teacher_outs = [p.result() for p in pending]
            student_out = wrapped(x, student_taps)
            step = Step(x=x, y=y, student=student_out,
                        teacher=teacher_outs[0] if teacher_outs else {}, epoch=epoch,
                        epochs=epochs, teachers=teacher_outs)
            terms = method.losses(step)
            found = method.diagnostics(step) if unit.diagnostics_dir else None
            for name, values in (found or {}).items():
                diagnostics[name].append(values.detach().float().cpu())
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(y)
            seen += n
            sums["loss"] += loss.item() * n
            for name, value in terms.items():
                sums[f"loss_{name}"] += value.item() * n
        scheduler.step()
        train_s = time.perf_counter() - started
        metrics = {k: v / max(seen, 1) for k, v in sums.items()}
        metrics.update(**initial, epoch=epoch + 1, epochs=epochs, resumed_from=start_epoch,
                       lr=optimizer.param_groups[0]["lr"], epoch_s=train_s,
                       train_images=seen * world,
                       **{f"w_{k}": v for k, v in method.loss_weights(epoch, epochs).items()},
                       val_top1=evaluate(student, splits.val, unit.data.eval_batch_size, device,
                                         rank, world))
        if epoch == epochs - 1:
            # reported for the final model only; nothing is ever selected on it
            metrics["test_top1"] = evaluate(student, splits.test, unit.data.eval_batch_size,
                                            device, rank, world)
        if rank == 0:
            parts = "  ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
            print(f"[{unit.key}] epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f} ({parts})"
                  f"  val_top1 {metrics['val_top1']:.4f}  {train_s:.1f}s", flush=True)
        if rank == 0 and diagnostics:
            write_diagnostics(unit.diagnostics_dir, epoch + 1, diagnostics)
        progress.end_epoch(epoch, metrics)

    if epochs == 0:   # evaluation only (e.g. a stitched student without fine-tuning)
        metrics = {**initial, "epoch": 0, "epochs": 0, "resumed_from": 0,
                   "val_top1": initial.get("initial_val_top1"),
                   "test_top1": initial.get("initial_test_top1")}
        report(metrics, progress.state(-1, metrics), rank)
    progress.finish(start_epoch, epochs)
    if rank == 0:
        save_export(student, unit.export_path, splits.num_classes, splits.in_channels,
                    splits.image_size)

