"""Teachers and students: a staged model trained under a distillation method.

The method names the student and teacher taps it needs; this kind gets the student's and the
teachers' activations, and the skeleton sums the method's named losses. It never looks at which
method it runs.
"""
from __future__ import annotations

import os
from collections import defaultdict

import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from raykd.data import load_dataset
from raykd.methods import MethodContext, Step, build_method, method_class
from raykd.models import build_model, count_macs, count_params
from raykd.models.export import load_export, model_name, save_export
from raykd.models.staged import latency_ms
from raykd.models.weights import load_weights
from raykd.teacher.access import open_replayed, open_teachers
from raykd.teacher.replay import ReplayedViews
from raykd.train.batches import (
    WithIndex,
    at_epoch,
    epoch_order,
    evaluate,
    loader_options,
    training_samples,
    with_teacher,
)
from raykd.train.skeleton import UnitTrainer, register_kind


class TrainableParts(torch.nn.Module):
    """The student plus the method's extra modules, so one optimizer, one checkpoint and one
    DDP wrapper cover both. Its forward returns the student's requested taps."""

    def __init__(self, model: torch.nn.Module, extra: torch.nn.Module | None):
        super().__init__()
        self.model = model
        self.extra = extra if extra is not None else torch.nn.Identity()

    def forward(self, x, taps):
        return self.model.features(x, taps)


def write_diagnostics(folder: str, epoch: int, values: dict[str, list[torch.Tensor]]) -> None:
    import pandas as pd

    os.makedirs(folder, exist_ok=True)
    frame = pd.DataFrame({k: torch.cat(v).numpy() for k, v in values.items()})
    frame.insert(0, "epoch", epoch)
    frame.to_parquet(os.path.join(folder, f"epoch-{epoch:04d}.parquet"), index=False)


@register_kind
class ModelTrainer(UnitTrainer):
    kind = "model"
    data_parallel = True

    def build(self):
        unit, device = self.unit, self.device
        torch.manual_seed(unit.random_seed)
        self.splits = splits = load_dataset(unit.data)
        model, started_from = student_model(unit, splits, device)
        # a model that starts from trained weights (a stitched student) is scored before
        # training; on the test split only where the unit may read it (never a sweep trial)
        scored = [("val_top1", splits.val)] + (
            [("test_top1", splits.test)] if unit.evaluate_test else [])
        self.initial = {
            **{f"initial_{name}": evaluate(model.to(device), part, unit.data.eval_batch_size,
                                           device) for name, part in scored},
            "started_from": started_from} if started_from else {}
        self.architectures = architectures = [load_export(h.export_path) for h in unit.teachers]
        self.method = build_method(unit.method_name, unit.method, MethodContext(
            student=model, num_classes=splits.num_classes, input_shape=splits.input_shape,
            train_size=len(splits.train),
            teacher=architectures[0] if architectures else None, teachers=architectures,
            inputs=unit.method_inputs))
        # replayed views for a student that reads its teacher (kd's ls and sim read none)
        self.replaying = bool(unit.replay and unit.teachers and self.method.teacher_taps())
        self.train_samples = ReplayedViews(splits.train, unit.replay, unit.augmentation_seed) \
            if self.replaying else training_samples(splits, unit.augmentation_seed)
        self.trainable = TrainableParts(model, self.method.modules()).to(device)
        self.student = model
        return self.trainable

    def start(self, start_epoch):
        unit = self.unit
        # DDP (gloo or nccl) with several workers; a method's extra modules ride along
        self.wrapped = ray.train.torch.prepare_model(self.trainable, move_to_device=False) \
            if self.world > 1 else self.trainable
        self.sampler = DistributedSampler(
            self.splits.train, num_replicas=self.world, rank=self.rank, shuffle=True,
            seed=unit.random_seed) if self.world > 1 else None
        self.student_taps = sorted(set(self.method.student_taps()) | {"logits"})
        self.teacher_taps = self.method.teacher_taps() if unit.teachers else []
        # a unit with no epoch left to train (only evaluated) opens no teacher: opening may
        # fill the teacher's cache over the training split, which a data-free job never reads
        if start_epoch >= unit.optim.epochs:
            self.teachers = []
        elif self.replaying:   # the method's class scores on stored views
            self.teacher_taps = self.method.score_names()
            self.teachers = open_replayed(unit, self.method, self.architectures,
                                          self.train_samples, self.splits.num_classes,
                                          self.device)
        else:
            self.teachers = open_teachers(unit.teachers, self.teacher_taps, unit.data,
                                          self.splits, self.device, unit.key)

    def train_mode(self):
        self.trainable.train()
        self.diagnostics = defaultdict(list)

    def batches(self, epoch):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        loader = DataLoader(
            WithIndex(at_epoch(self.train_samples, epoch)), batch_size=self.unit.data.batch_size,
            sampler=self.sampler, shuffle=self.sampler is None, drop_last=False,
            generator=epoch_order(self.unit.random_seed, epoch),
            **loader_options(self.unit.data, self.device))
        return with_teacher(loader, self.teachers, self.teacher_taps, self.device)

    def losses(self, batch, epoch):
        x, y, pending, index = batch
        teacher_outs = [p.result() for p in pending]
        step = Step(x=x, y=y, student=self.wrapped(x, self.student_taps),
                    teacher=teacher_outs[0] if teacher_outs else {}, epoch=epoch,
                    epochs=self.unit.optim.epochs, teachers=teacher_outs,
                    index=index.to(self.device))
        if self.unit.diagnostics_dir:
            for name, values in (self.method.diagnostics(step) or {}).items():
                self.diagnostics[name].append(values.detach().float().cpu())
        return self.method.losses(step)

    def evaluate(self, epoch, final, seen):
        unit, eval_batch = self.unit, self.unit.data.eval_batch_size
        if self.world > 1:
            # score what is exported: rank 0's model, BatchNorm statistics included (each rank
            # updated its own copy on its own last batches since DDP last broadcast them)
            for buffer in self.student.buffers():
                dist.broadcast(buffer, 0)
        metrics = {**self.initial, "train_images": self.total_seen(seen), "worker_images": seen,
                   **{f"w_{k}": v for k, v in
                      self.method.loss_weights(epoch, unit.optim.epochs).items()},
                   "val_top1": evaluate(self.student, self.splits.val, eval_batch, self.device,
                                        self.rank, self.world)}
        if final and unit.evaluate_test:   # for the final model only; nothing is selected on it
            metrics["test_top1"] = evaluate(self.student, self.splits.test, eval_batch,
                                            self.device, self.rank, self.world)
        return metrics

    def total_seen(self, seen: int) -> int:
        """Training images seen this epoch by all data-parallel workers together."""
        if self.world == 1:
            return seen
        count = torch.tensor([seen], dtype=torch.float64, device=self.device)
        dist.all_reduce(count)
        return int(count.item())

    def summary(self, metrics):
        return f"val_top1 {metrics['val_top1']:.4f}"

    def end_epoch(self, epoch, metrics):
        if self.diagnostics:
            write_diagnostics(self.unit.diagnostics_dir, epoch + 1, self.diagnostics)

    def untrained_metrics(self):
        return {**self.initial, "val_top1": self.initial.get("initial_val_top1"),
                "test_top1": self.initial.get("initial_test_top1")}

    def export(self):
        s = self.splits
        save_export(self.student, self.unit.export_path, s.num_classes, s.in_channels,
                    s.image_size, self.unit.data.mean, self.unit.data.std)

    @classmethod
    def rows(cls, unit, metrics, common, num_classes, input_shape):
        """A model's row; a student that started from a trained model (its method's, e.g. a
        stitched one, or `student.checkpoint`) also gets a row for that model, before training."""
        model = load_export(unit.export_path)    # what was trained and exported, counted
        row = {**common, "method": unit.label, "model": model_name(model),
               "val_top1": metrics.get("val_top1"),
               "test_top1": metrics.get("test_top1"), "params": count_params(model),
               "macs": count_macs(model, input_shape),
               # batch 1, one thread, eager PyTorch (`raykd export` adds ONNX / TorchScript's)
               "latency_ms": latency_ms(model, input_shape)}
        if not metrics.get("started_from"):
            return [row]
        before = {**row, "method": f"{unit.label}.{metrics['started_from']}",
                  "epochs": 0,
                  "val_top1": metrics["initial_val_top1"],
                  "test_top1": metrics.get("initial_test_top1")}
        return [before] if unit.optim.epochs == 0 else [before, row]


def student_model(unit, splits, device, calibrate: bool = True) -> tuple[torch.nn.Module, str]:
    """The model a `model` unit trains, and what trained model it starts from ("" for fresh
    weights; else the label its row before training gets: the method's `start_label` for one
    its method makes, e.g. a stitched student, "start" for `student.checkpoint`). `reinit` keeps
    the architecture and draws fresh weights (the baseline)."""
    method = method_class(unit.method_name) if unit.method_name else None
    made = method.start_model(unit, splits, device, calibrate) if method else None
    label = method.start_label if made is not None else ""
    if made is None and unit.init_from:
        made, label = load_export(unit.init_from), "start"
    if made is None:
        model = build_model(unit.model, splits.num_classes, splits.in_channels,
                            splits.image_size, unit.model_args, unit.model_stages)
        if unit.weights:      # starting weights of the job's own (teacher.weights, ...)
            load_weights(model, unit.weights, unit.weights_skip)
        return model, ""
    if unit.reinit:             # same architecture, fresh weights
        for m in made.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return made, ""
    return made, label
