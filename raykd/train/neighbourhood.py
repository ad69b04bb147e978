"""Neighbourhood Distillation's unit: one candidate learns to reproduce one neighbourhood of the
frozen teacher, L = mean (S_i(a_{i-1}) - T_i(a_{i-1}))^2.

Inputs a_{i-1} are the teacher's activations entering the neighbourhood, either on training
images (`inputs: data`, through the teacher service or its cache) or synthetic (`inputs:
gaussian`: per-channel Gaussians matched to the statistics of a_{i-1} for Gaussian-noise images,
so no dataset is read at all). Reported per epoch: the reconstruction error on held-out inputs,
relative to the target's variance; at the end, in data mode, the teacher's accuracy with just
this neighbourhood swapped for the candidate.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from torch.utils.data import DataLoader

from raykd.data import load_dataset
from raykd.files import atomic_copy, file_hash
from raykd.library import NeighbourhoodLibrary, recipe_digest
from raykd.losses import neighbourhood_loss
from raykd.models import count_macs, count_params
from raykd.models.export import save_candidate
from raykd.models.staged import BlockRange, latency_ms, nonnegative_taps
from raykd.models.stitch import Candidate, block_shapes, parse_candidate, stitch
from raykd.teacher import LocalTeacher
from raykd.teacher.access import open_teachers
from raykd.train.batches import WithIndex, epoch_order, evaluate, with_teacher
from raykd.train.skeleton import UnitTrainer, register_kind


class GaussianBoundary:
    """Synthetic activations for the boundary entering block `start`."""

    def __init__(self, teacher, start: int, input_shape, seed: int, probe: int = 256):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            a = teacher.model.run_blocks(torch.randn(probe, *input_shape, generator=gen), 0, start)
        self.mean = a.mean(dim=(0, 2, 3), keepdim=True)[0]
        self.std = a.std(dim=(0, 2, 3), keepdim=True)[0].clamp_min(1e-3)
        self.shape = tuple(a.shape[1:])

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.mean + self.std * torch.randn(n, *self.shape, generator=gen)


LIBRARY_COSTS = ["macs", "latency_ms", "replaced_macs", "replaced_latency_ms", "teacher_params",
                 "teacher_macs", "teacher_latency_ms", "teacher_hash"]
LIBRARY_ONLY = ["checkpoint", "checkpoint_hash", "added"]   # catalog columns, not result rows


@register_kind
class NeighbourhoodTrainer(UnitTrainer):
    kind = "neighbourhood"

    def build(self):
        unit, nb = self.unit, self.unit.neighbourhood
        self.start_block, self.stop_block = nb.start, nb.stop
        self.teacher = LocalTeacher(unit.teachers[0].export_path, "cpu")   # synthetic targets
        names = self.teacher.model.block_names
        self.in_tap, self.out_tap = names[nb.start - 1], names[nb.stop - 1]
        shapes = block_shapes(self.teacher.model, nb.input_shape)
        torch.manual_seed(unit.random_seed)
        relu_out = nonnegative_taps(self.teacher.model, [self.out_tap], nb.input_shape)
        self.candidate = Candidate(nb.candidate, shapes[nb.start][0], shapes[nb.stop - 1][1],
                                   relu_out[self.out_tap]).to(self.device)
        return self.candidate

    def start(self, start_epoch):
        unit, nb, teacher = self.unit, self.unit.neighbourhood, self.teacher
        self.synthetic = nb.inputs == "gaussian"
        if self.synthetic:
            self.boundary = GaussianBoundary(teacher, nb.start, nb.input_shape, unit.random_seed)
            held_out = self.boundary.sample(512, torch.Generator().manual_seed(unit.random_seed + 99))
            with torch.no_grad():
                self.val_pairs = [(held_out, teacher.model.run_blocks(held_out, nb.start, nb.stop))]
            return
        self.splits = load_dataset(unit.data)
        taps = [self.in_tap, self.out_tap]
        [self.source] = open_teachers(unit.teachers, taps, unit.data, self.splits, self.device,
                                      unit.key)
        self.val_pairs, self.val_labels = [], []
        for x, y in DataLoader(self.splits.val, batch_size=unit.data.eval_batch_size):
            f = teacher.features(x, taps)
            self.val_pairs.append((f[self.in_tap], f[self.out_tap]))
            self.val_labels.append(y)

    def train_mode(self):
        self.candidate.train()

    def batches(self, epoch):
        unit, nb, device = self.unit, self.unit.neighbourhood, self.device
        gen = epoch_order(unit.random_seed, epoch)
        if self.synthetic:
            for _ in range(max(1, nb.gaussian_samples // unit.data.batch_size)):
                a = self.boundary.sample(unit.data.batch_size, gen)
                with torch.no_grad():   # (never yield inside it: the caller would inherit it)
                    target = self.teacher.model.run_blocks(a, nb.start, nb.stop)
                yield a.to(device), target.to(device)
            return
        loader = DataLoader(WithIndex(self.splits.train), batch_size=unit.data.batch_size,
                            shuffle=True, generator=gen)
        for _x, _y, pending in with_teacher(loader, [self.source], [self.in_tap, self.out_tap],
                                            device):
            f = pending[0].result()
            yield f[self.in_tap].to(device), f[self.out_tap].to(device)

    def losses(self, batch, epoch):
        a, target = batch
        return {"mse": neighbourhood_loss(self.candidate(a), target)}

    @torch.no_grad()
    def relative_error(self) -> float:
        candidate, device = self.candidate, self.device
        candidate.eval()
        err = sum(float(neighbourhood_loss(candidate(a.to(device)), t.to(device))) * len(a)
                  for a, t in self.val_pairs)
        var = sum(float(t.var()) * len(t) for _, t in self.val_pairs)
        candidate.train()
        return err / max(var, 1e-12)

    @torch.no_grad()
    def val_accuracies(self) -> tuple[float, float]:
        """Validation top-1 of the teacher with just this neighbourhood swapped, and of the
        teacher itself, from the activations stored at the neighbourhood's two ends: only the
        candidate and the blocks after it run (the blocks before it ran once, in `start`)."""
        model, stop, n = self.teacher.model, self.unit.neighbourhood.stop, len(
            self.teacher.model.block_names)
        self.candidate.eval()
        swapped = teacher = total = 0
        for (a_in, a_out), y in zip(self.val_pairs, self.val_labels):
            swapped += int((model.run_blocks(self.candidate(a_in.to(self.device)).cpu(), stop, n)
                            .argmax(1) == y).sum())
            teacher += int((model.run_blocks(a_out, stop, n).argmax(1) == y).sum())
            total += len(y)
        self.candidate.train()
        return swapped / max(total, 1), teacher / max(total, 1)

    def evaluate(self, epoch, final, seen):
        nb, teacher = self.unit.neighbourhood, self.teacher
        metrics = {"recon_val": self.relative_error()}
        if final:
            metrics.update(candidate_params=count_params(self.candidate), replaced_params=sum(
                count_params(teacher.model.blocks[n])
                for n in teacher.model.block_names[nb.start:nb.stop]))
            metrics.update(self.costs())
            if not self.synthetic:
                # the teacher with just this neighbourhood swapped: a local quality signal
                metrics["val_top1"], metrics["teacher_val_top1"] = self.val_accuracies()
                eval_batch = self.unit.data.eval_batch_size
                swapped = stitch(teacher.model, [(nb.start, nb.stop, self.candidate.cpu())])
                swapped = swapped.to(self.device)
                metrics["test_top1"] = evaluate(swapped, self.splits.test, eval_batch, self.device)
                self.candidate.to(self.device)
        return metrics

    def costs(self) -> dict:
        """What a search budget adds up: MACs and batch-1 CPU latency of the candidate, of the
        teacher blocks it replaces, and of the whole teacher; the teacher's identity."""
        nb, teacher = self.unit.neighbourhood, self.teacher.model
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
        nb = unit.neighbourhood
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
        nb = unit.neighbourhood
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
        if unit.neighbourhood.library and not rows[0].get("reused_from"):
            NeighbourhoodLibrary(unit.neighbourhood.library).add(rows[0], unit.export_path)
