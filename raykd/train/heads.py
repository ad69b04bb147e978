"""DIH step 3: linear heads on a frozen teacher's stages, trained with cross-entropy.

The teacher's stage maps come through the `Teacher` interface (in-process, shard actors or the
output cache), and its weights are never updated: they are checksummed before and after.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from raykd.data import load_dataset
from raykd.log import log
from raykd.models import count_macs, count_params
from raykd.models.export import load_heads, save_heads
from raykd.models.heads import build_heads
from raykd.teacher.access import open_teacher, open_teachers
from raykd.teacher.cache import cached_teacher
from raykd.train.batches import (
    WithIndex,
    at_epoch,
    epoch_order,
    loader_options,
    training_samples,
    with_teacher,
)
from raykd.train.skeleton import UnitTrainer, register_kind


@torch.no_grad()
def evaluate_heads(teacher, heads: nn.ModuleDict, dataset, batch_size: int, device) -> dict:
    """Top-1 of every head, from one teacher pass over the data (or its stored outputs)."""
    heads.eval()
    correct = {s: 0 for s in heads}
    total = 0
    for x, y, index in DataLoader(WithIndex(dataset), batch_size=batch_size):
        y = y.to(device)
        feats = teacher.features(x.to(device), list(heads), index=index)
        for s, head in heads.items():
            correct[s] += int((head(feats[s]).argmax(1) == y).sum())
        total += len(y)
    heads.train()
    return {s: c / max(total, 1) for s, c in correct.items()}


@register_kind
class HeadsTrainer(UnitTrainer):
    kind = "heads"

    def build(self):
        unit, device = self.unit, self.device
        self.stages = unit.payload.stages
        self.splits = load_dataset(unit.data)
        self.train_samples = training_samples(self.splits, unit.augmentation_seed)
        self.teacher = open_teacher(unit.teachers[0], device)   # the real teacher, or its shards
        self.stored_splits: dict = {}
        self.heads = build_heads(self.teacher.model, self.stages, self.splits.input_shape,
                                 self.splits.num_classes, unit.payload.pooled,
                                 unit.random_seed).to(device)
        [self.source] = open_teachers(unit.teachers, self.stages, unit.data, self.splits, device,
                                      unit.key)
        # of the weights that produce the features the heads train and are evaluated on (shard
        # actors when the teacher is served; a local copy would prove nothing)
        self.checksum_before = self.teacher_checksum()
        return self.heads

    def teacher_checksum(self) -> str:
        return f"{self.source.checksum()}/{self.teacher.checksum()}"

    def train_mode(self):
        self.heads.train()

    def batches(self, epoch):
        loader = DataLoader(WithIndex(at_epoch(self.train_samples, epoch)),
                            batch_size=self.unit.data.batch_size,
                            shuffle=True, generator=epoch_order(self.unit.random_seed, epoch),
                            **loader_options(self.unit.data, self.device))
        return with_teacher(loader, [self.source], self.stages, self.device)

    def losses(self, batch, epoch):
        _x, y, pending, _index = batch
        feats = pending[0].result()
        # heads share nothing: the summed loss gives each head exactly its own gradient
        return {s: F.cross_entropy(self.heads[s](feats[s]), y) for s in self.stages}

    def evaluation_teacher(self, split: str):
        """The teacher's stage maps on an evaluation split: stored once in the cache when there
        is one (evaluation inputs never change, so every epoch's pass would be the same), else
        the teacher itself."""
        handle = self.unit.teachers[0]
        if not handle.cache_dir:
            return self.teacher
        if split not in self.stored_splits:
            self.stored_splits[split] = cached_teacher(
                self.teacher, handle.cache_dir, handle.export_path, self.unit.data, split,
                getattr(self.splits, split), self.stages, self.unit.data.eval_batch_size,
                log=lambda m: log.info("[%s] %s", self.unit.key, m))
        return self.stored_splits[split]

    def evaluate(self, epoch, final, seen):
        metrics = {}
        for split in ("val", "test") if final else ("val",):
            accs = evaluate_heads(self.evaluation_teacher(split), self.heads,
                                  getattr(self.splits, split), self.unit.data.eval_batch_size,
                                  self.device)
            metrics.update({f"{split}_top1/{s}": a for s, a in accs.items()})
        if final:
            metrics["teacher_checksum_before"] = self.checksum_before
            metrics["teacher_checksum_after"] = self.teacher_checksum()
        return metrics

    def summary(self, metrics):
        return "val_top1 " + "  ".join(f"{s} {metrics[f'val_top1/{s}']:.4f}" for s in self.stages)

    def export(self):
        save_heads(self.heads, self.unit.export_path, self.splits.num_classes)

    @classmethod
    def rows(cls, unit, metrics, common, num_classes, input_shape):
        if metrics["teacher_checksum_before"] != metrics["teacher_checksum_after"]:
            raise RuntimeError(f"{unit.key}: the teacher's weights changed during head training")
        heads = load_heads([unit.export_path])
        return [{**common, "method": stage, "model": f"{unit.model}:{stage}",
                 "val_top1": metrics[f"val_top1/{stage}"],
                 "test_top1": metrics[f"test_top1/{stage}"],
                 "params": count_params(heads[stage]),
                 "macs": count_macs(heads[stage], heads[stage].in_shape),
                 "teacher_checksum": metrics["teacher_checksum_after"]}
                for stage in unit.payload.stages]
