"""Neighbourhood Distillation's unit: one candidate learns to reproduce one neighbourhood of the
frozen teacher, L = mean (S_i(a_{i-1}) - T_i(a_{i-1}))^2.

Inputs a_{i-1} are the teacher's activations entering the neighbourhood, either on training
images (`inputs: data`, through the teacher service or its cache) or synthetic (`inputs:
gaussian`: per-channel Gaussians from the teacher's BatchNorm statistics, raykd.train.synthetic,
so no dataset is read at all). Reported per epoch: the reconstruction error on held-out inputs,
relative to the target's variance; at the end, in data mode, the teacher's accuracy with just
this neighbourhood swapped for the candidate, on val and test. The teacher's activations at every
boundary of its partition are cached once per split (train, val, test) and serve all of its parts
and candidates, so a part runs only itself and the teacher blocks after it.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from torch.utils.data import DataLoader

from raykd.data import load_dataset
from raykd.files import atomic_copy, file_hash
from raykd.log import log
from raykd.losses import neighbourhood_loss
from raykd.models import LOGITS, count_macs, count_params
from raykd.models.export import save_candidate
from raykd.models.staged import BlockRange, latency_ms, mode, nonnegative_taps
from raykd.models.stitch import block_shapes, boundary_taps, make_candidate, parse_candidate
from raykd.nas.library import NeighbourhoodLibrary, recipe_digest
from raykd.teacher import LocalTeacher
from raykd.teacher.access import open_teachers
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
from raykd.train.synthetic import SyntheticBoundary

LIBRARY_COSTS = ["macs", "latency_ms", "replaced_macs", "replaced_latency_ms", "teacher_params",
                 "teacher_macs", "teacher_latency_ms", "teacher_hash"]
LIBRARY_ONLY = ["checkpoint", "checkpoint_hash", "added"]   # catalog columns, not result rows


@register_kind
class NeighbourhoodTrainer(UnitTrainer):
    kind = "neighbourhood"

    def build(self):
        unit, nb = self.unit, self.unit.payload
        self.start_block, self.stop_block = nb.start, nb.stop
        self.teacher = LocalTeacher(unit.teachers[0].export_path, "cpu")   # synthetic targets
        names = self.teacher.model.block_names
        self.in_tap, self.out_tap = names[nb.start - 1], names[nb.stop - 1]
        shapes = block_shapes(self.teacher.model, nb.input_shape)
        torch.manual_seed(unit.random_seed)
        relu_out = nonnegative_taps(self.teacher.model, [self.out_tap], nb.input_shape)
        self.candidate = make_candidate(nb.candidate, shapes[nb.start][0],
                                        shapes[nb.stop - 1][1], relu_out[self.out_tap],
                                        nb.pool).to(self.device)
        return self.candidate

    def start(self, start_epoch):
        unit, nb, teacher = self.unit, self.unit.payload, self.teacher
        self.synthetic = nb.inputs == "gaussian"
        if self.synthetic:
            self.boundary = SyntheticBoundary(teacher.model, nb.start, nb.input_shape,
                                              unit.random_seed)
            log.info("[%s] synthetic inputs: %s", unit.key, self.boundary.describe())
            held_out = self.boundary.sample(512, torch.Generator().manual_seed(unit.random_seed + 99))
            with torch.no_grad():
                self.val_pairs = [(held_out, teacher.model.run_blocks(held_out, nb.start, nb.stop))]
            return
        self.splits = load_dataset(unit.data)
        self.train_samples = training_samples(self.splits, unit.augmentation_seed)
        [self.source] = open_teachers(unit.teachers, self.boundary_taps(), unit.data,
                                      self.splits, self.device, unit.key,
                                      read=[self.in_tap, self.out_tap])
        self.val_pairs, self.val_labels = self.split_pairs("val", self.splits.val)

    def boundary_taps(self) -> list[str]:
        """The teacher's activations at every boundary of its partition, and its logits (the
        teacher's own accuracy is read, not computed again); its teacher unit stores them when
        the job planned it (raykd.methods.neighbourhood)."""
        nb = self.unit.payload
        return boundary_taps(self.teacher.model, nb.boundaries or (nb.start, nb.stop))

    def split_pairs(self, split: str, dataset) -> tuple[list[tuple], list[torch.Tensor]]:
        """Batches of (activation entering the neighbourhood, its output, the teacher's logits)
        on an evaluation split, and the labels: from the teacher cache when the job has one
        (computed there by the first part that needs it), otherwise computed here."""
        unit, taps = self.unit, [self.in_tap, self.out_tap, LOGITS]
        batch, handle = unit.data.eval_batch_size, unit.teachers[0]
        labels = [y for _, y in DataLoader(dataset, batch_size=batch)]
        if handle.cache_dir:
            stored = cached_teacher(self.teacher, handle.cache_dir, handle.export_path, unit.data,
                                    split, dataset, self.boundary_taps(), batch,
                                    log=lambda m: log.info("[%s] %s", unit.key, m),
                                    read=taps).stored
            rows = [slice(lo, lo + batch) for lo in range(0, len(dataset), batch)]
            return [tuple(stored[t][r] for t in taps) for r in rows], labels
        with torch.no_grad():
            pairs = [tuple(self.teacher.features(x, taps)[t] for t in taps)
                     for x, _ in DataLoader(dataset, batch_size=batch)]
        return pairs, labels

    def train_mode(self):
        self.candidate.train()

    def batches(self, epoch):
        unit, nb, device = self.unit, self.unit.payload, self.device
        gen = epoch_order(unit.random_seed, epoch)
        if self.synthetic:
            for _ in range(max(1, nb.gaussian_samples // unit.data.batch_size)):
                a = self.boundary.sample(unit.data.batch_size, gen)
                with torch.no_grad():   # (never yield inside it: the caller would inherit it)
                    target = self.teacher.model.run_blocks(a, nb.start, nb.stop)
                yield a.to(device), target.to(device)
            return
        loader = DataLoader(WithIndex(at_epoch(self.train_samples, epoch)),
                            batch_size=unit.data.batch_size,
                            shuffle=True, generator=gen, **loader_options(unit.data, device))
        for _x, _y, pending, _index in with_teacher(loader, [self.source], [self.in_tap, self.out_tap],
                                            device):
            f = pending[0].result()
            yield f[self.in_tap].to(device), f[self.out_tap].to(device)

    def losses(self, batch, epoch):
        a, target = batch
        return {"mse": neighbourhood_loss(self.candidate(a), target)}

    @torch.no_grad()
    def relative_error(self) -> float:
        candidate, device = self.candidate, self.device
        with mode(candidate, False):
            err = sum(float(neighbourhood_loss(candidate(a.to(device)), t.to(device))) * len(a)
                      for a, t, *_ in self.val_pairs)
        var = sum(float(t.var()) * len(t) for _, t, *_ in self.val_pairs)
        return err / max(var, 1e-12)

    @torch.no_grad()
    def accuracies(self, pairs, labels) -> tuple[float, float]:
        """Top-1 of the teacher with just this neighbourhood swapped, and of the teacher itself,
        from the activations stored at the neighbourhood's input and the teacher's logits: only
        the candidate and the blocks after it run (the blocks before it ran once, for the
        cache). The same numbers as evaluating the swapped teacher whole, in less time."""
        model, stop, n = self.teacher.model, self.unit.payload.stop, len(
            self.teacher.model.block_names)
        swapped = teacher = total = 0
        with mode(self.candidate, False), mode(model, False):
            for (a_in, _a_out, logits), y in zip(pairs, labels):
                outputs = model.run_blocks(self.candidate(a_in.to(self.device)).cpu(), stop, n)
                swapped += int((outputs.argmax(1) == y).sum())
                teacher += int((logits.argmax(1) == y).sum())
                total += len(y)
        return swapped / max(total, 1), teacher / max(total, 1)

    def evaluate(self, epoch, final, seen):
        nb, teacher = self.unit.payload, self.teacher
        metrics = {"recon_val": self.relative_error()}
        if final:
            metrics.update(candidate_params=count_params(self.candidate), replaced_params=sum(
                count_params(teacher.model.blocks[n])
                for n in teacher.model.block_names[nb.start:nb.stop]))
            metrics.update(self.costs())
            if not self.synthetic:
                # the teacher with just this neighbourhood swapped: a local quality signal
                metrics["val_top1"], metrics["teacher_val_top1"] = self.accuracies(
                    self.val_pairs, self.val_labels)
                metrics["test_top1"], _ = self.accuracies(*self.split_pairs(
                    "test", self.splits.test))
        return metrics

    def costs(self) -> dict:
        """What a search budget adds up: MACs and batch-1 CPU latency of the candidate, of the
        teacher blocks it replaces, and of the whole teacher; the teacher's identity."""
        nb, teacher = self.unit.payload, self.teacher.model
        in_shape = self.candidate.in_shape
        replaced = BlockRange(teacher, nb.start, nb.stop)
        return {"macs": count_macs(self.candidate, in_shape),
                "latency_ms": latency_ms(self.candidate, in_shape),
                "replaced_macs": count_macs(replaced, in_shape),
                "replaced_latency_ms": latency_ms(replaced, in_shape),
                "teacher_params": count_params(teacher),
                "teacher_macs": count_macs(teacher, nb.input_shape),
                "teacher_latency_ms": latency_ms(teacher, nb.input_shape),
                "teacher_hash": file_hash(self.unit.teachers[0].export_path)}

    def summary(self, metrics):
        return f"relative val error {metrics['recon_val']:.4f}"

    def export(self):
        save_candidate(self.candidate.cpu(), self.unit.export_path)

    @classmethod
    def rows(cls, unit, metrics, common, num_classes, input_shape):
        nb = unit.payload
        return [{**common, "method": unit.label, "model": nb.candidate,
                 "neighbourhood": nb.name, "nb_start": nb.start, "nb_stop": nb.stop,
                 "candidate": nb.candidate,
                 # the teacher's accuracy with just this neighbourhood swapped (data inputs only)
                 "val_top1": metrics.get("val_top1", float("nan")),
                 "test_top1": metrics.get("test_top1", float("nan")),
                 "recon_val": metrics["recon_val"], "params": metrics["candidate_params"],
                 "replaced_params": metrics["replaced_params"],
                 **{k: metrics[k] for k in LIBRARY_COSTS},
                 "teacher_val_top1": metrics.get("teacher_val_top1", float("nan")),
                 "family": parse_candidate(nb.candidate)[0], "inputs": nb.inputs,
                 "recipe": recipe_digest(unit), "teacher_export": unit.teachers[0].export_path,
                 "data": json.dumps(dataclasses.asdict(unit.data), default=str)}]

    @classmethod
    def stored(cls, unit):
        """This part's rows from the neighbourhood library, its checkpoint placed at the unit's
        export path; None when the library does not have it."""
        nb = unit.payload
        if not nb.library:
            return None
        found = NeighbourhoodLibrary(nb.library).find(
            file_hash(unit.teacher_exports[0]), nb.start, nb.stop, nb.candidate,
            recipe_digest(unit))
        if found is None:
            return None
        atomic_copy(found["checkpoint"], unit.export_path)
        row = {k: v for k, v in found.items() if k not in LIBRARY_ONLY}
        return [{**row, "unit": unit.key, "method": unit.label, "export": unit.export_path,
                 "teacher_export": unit.teacher_exports[0], "reused_from": found["checkpoint"]}]

    @classmethod
    def store(cls, unit, rows) -> None:
        if unit.payload.library and not rows[0].get("reused_from"):
            NeighbourhoodLibrary(unit.payload.library).add(rows[0], unit.export_path)
