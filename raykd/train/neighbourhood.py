"""The neighbourhood loop (Neighbourhood Distillation, METHODS.md 4): one candidate learns to
reproduce one neighbourhood of the frozen teacher, L = mean (S_i(a_{i-1}) - T_i(a_{i-1}))^2.

Inputs a_{i-1} are the teacher's activations entering the neighbourhood, either on training
images (`inputs: data`, through the teacher service or its cache) or synthetic (`inputs:
gaussian`: per-channel Gaussians matched to the statistics of a_{i-1} for Gaussian-noise images,
so no dataset is read at all). Reported per epoch: the reconstruction error on held-out inputs,
relative to the target's variance; at the end, in data mode, the teacher's accuracy with just
this neighbourhood swapped for the candidate.
"""
from __future__ import annotations

import time

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from raykd.data import load_dataset
from raykd.losses import neighbourhood_loss
from raykd.models import count_params
from raykd.models.stitch import Candidate, block_shapes, save_candidate, stitch
from raykd.teacher import LocalTeacher
from raykd.train.loop import WithIndex, evaluate, open_teachers, quiet_ray_logs, with_teacher
from raykd.train.optim import make_optimizer, make_scheduler
from raykd.train.progress import Progress
from raykd.train.unit import Unit


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


def train_neighbourhood(config: dict) -> None:
    unit: Unit = config["unit"]
    nb = unit.neighbourhood
    quiet_ray_logs()
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(unit.cpus_per_worker)))
    device = ray.train.torch.get_device()
    start, stop = nb["start"], nb["stop"]
    input_shape = tuple(nb["input_shape"])

    teacher = LocalTeacher(unit.teachers[0].export_path, "cpu")   # targets for synthetic inputs
    names = teacher.model.block_names
    in_tap, out_tap = names[start - 1], names[stop - 1]
    shapes = block_shapes(teacher.model, input_shape)
    torch.manual_seed(unit.seed * 1000 + start)
    candidate = Candidate(nb["candidate"], shapes[start][0], shapes[stop - 1][1]).to(device)
    optimizer = make_optimizer(candidate.parameters(), unit.optim)
    scheduler = make_scheduler(optimizer, unit.optim)
    epochs = unit.optim.epochs
    progress = Progress(unit, candidate, optimizer, scheduler, device, rank)
    start_epoch = progress.restore()

    synthetic = nb["inputs"] == "gaussian"
    if synthetic:
        boundary = GaussianBoundary(teacher, start, input_shape, unit.seed)
        held_out = boundary.sample(512, torch.Generator().manual_seed(unit.seed + 99))
        with torch.no_grad():
            val_pairs = [(held_out, teacher.model.run_blocks(held_out, start, stop))]
    else:
        splits = load_dataset(unit.data)
        [source] = open_teachers(unit, [in_tap, out_tap], splits, device, rank)
        val_pairs = []
        for x, _ in DataLoader(splits.val, batch_size=unit.data.eval_batch_size):
            f = teacher.features(x, [in_tap, out_tap])
            val_pairs.append((f[in_tap], f[out_tap]))

    def batches(epoch: int):
        gen = torch.Generator().manual_seed(unit.seed * 10_007 + epoch)
        if synthetic:
            for _ in range(max(1, nb["gaussian_samples"] // unit.data.batch_size)):
                a = boundary.sample(unit.data.batch_size, gen)
                with torch.no_grad():   # (never yield inside it: the caller would inherit it)
                    target = teacher.model.run_blocks(a, start, stop)
                yield a.to(device), target.to(device)
        else:
            loader = DataLoader(WithIndex(splits.train), batch_size=unit.data.batch_size,
                                shuffle=True, generator=gen)
            for _x, _y, pending in with_teacher(loader, [source], [in_tap, out_tap], device):
                f = pending[0].result()
                yield f[in_tap].to(device), f[out_tap].to(device)

    @torch.no_grad()
    def relative_error() -> float:
        candidate.eval()
        err = sum(float(neighbourhood_loss(candidate(a.to(device)), t.to(device))) * len(a)
                  for a, t in val_pairs)
        var = sum(float(t.var()) * len(t) for _, t in val_pairs)
        candidate.train()
        return err / max(var, 1e-12)

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        candidate.train()
        total, seen = 0.0, 0
        for a, target in batches(epoch):
            loss = neighbourhood_loss(candidate(a), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(a)
            seen += len(a)
        scheduler.step()
        metrics = {"loss_mse": total / max(seen, 1), "recon_val": relative_error(),
                   "epoch": epoch + 1, "epochs": epochs, "resumed_from": start_epoch,
                   "epoch_s": time.perf_counter() - started, "lr": optimizer.param_groups[0]["lr"]}
        if epoch == epochs - 1:
            metrics.update(candidate_params=count_params(candidate),
                           replaced_params=sum(count_params(teacher.model.blocks[n])
                                               for n in names[start:stop]))
            if not synthetic:
                # the teacher with just this neighbourhood swapped: a local quality signal
                swapped = stitch(teacher.model, [(start, stop, candidate.cpu())]).to(device)
                metrics["val_top1"] = evaluate(swapped, splits.val, unit.data.eval_batch_size, device)
                metrics["test_top1"] = evaluate(swapped, splits.test, unit.data.eval_batch_size, device)
                candidate.to(device)
        if rank == 0:
            print(f"[{unit.key}] epoch {epoch + 1}/{epochs}  mse {metrics['loss_mse']:.5f}  "
                  f"relative val error {metrics['recon_val']:.4f}", flush=True)
        progress.end_epoch(epoch, metrics)
    progress.finish(start_epoch, epochs)
    if rank == 0:
        save_candidate(candidate.cpu(), unit.export_path)
