"""The head-training loop (DIH step 3): linear heads on a frozen teacher's stages, trained with
cross-entropy. Runs in a Ray Train worker; the teacher's stage maps come through the `Teacher`
interface (in-process, shard actors or the output cache), and its weights are never updated: the
loop checksums them before and after.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from raykd.data import load_dataset
from raykd.models.heads import build_heads, save_heads
from raykd.teacher import open_teacher
from raykd.train.loop import WithIndex, open_teachers, quiet_ray_logs, with_teacher
from raykd.train.optim import make_optimizer, make_scheduler
from raykd.train.progress import Progress
from raykd.train.unit import Unit


def weights_checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def evaluate_heads(teacher, heads: nn.ModuleDict, dataset, batch_size: int, device) -> dict:
    """Top-1 of every head, from one teacher pass over the data."""
    heads.eval()
    correct = {s: 0 for s in heads}
    total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        y = y.to(device)
        feats = teacher.features(x.to(device), list(heads))
        for s, head in heads.items():
            correct[s] += int((head(feats[s]).argmax(1) == y).sum())
        total += len(y)
    heads.train()
    return {s: c / max(total, 1) for s, c in correct.items()}


def train_heads(config: dict) -> None:
    unit: Unit = config["unit"]
    quiet_ray_logs()
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(unit.cpus_per_worker)))
    device = ray.train.torch.get_device()

    splits = load_dataset(unit.data)
    teacher = open_teacher(unit.teachers[0], device)   # evaluation runs the real teacher
    checksum_before = weights_checksum(teacher.model)
    heads = build_heads(teacher.model, unit.head_stages, splits.input_shape, splits.num_classes,
                        unit.head_pooled, unit.seed).to(device)
    [source] = open_teachers(unit, unit.head_stages, splits, device, rank)
    optimizer = make_optimizer(heads.parameters(), unit.optim)
    scheduler = make_scheduler(optimizer, unit.optim)
    epochs = unit.optim.epochs
    progress = Progress(unit, heads, optimizer, scheduler, device, rank)
    start_epoch = progress.restore()

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        loader = DataLoader(WithIndex(splits.train), batch_size=unit.data.batch_size,
                            shuffle=True,
                            generator=torch.Generator().manual_seed(unit.seed * 10_007 + epoch))
        heads.train()
        sums, seen = defaultdict(float), 0
        for x, y, pending in with_teacher(loader, [source], unit.head_stages, device):
            feats = pending[0].result()
            # heads share nothing: the summed loss gives each head exactly its own gradient
            terms = {s: F.cross_entropy(heads[s](feats[s]), y) for s in unit.head_stages}
            optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            optimizer.step()
            seen += len(y)
            for s, v in terms.items():
                sums[f"loss_{s}"] += v.item() * len(y)
        scheduler.step()
        metrics = {k: v / max(seen, 1) for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, epochs=epochs, resumed_from=start_epoch,
                       epoch_s=time.perf_counter() - started, lr=optimizer.param_groups[0]["lr"])
        final = epoch == epochs - 1
        for split in ("val", "test") if final else ("val",):
            accs = evaluate_heads(teacher, heads, getattr(splits, split), unit.data.eval_batch_size,
                                  device)
            metrics.update({f"{split}_top1/{s}": a for s, a in accs.items()})
        if final:
            metrics["teacher_checksum_before"] = checksum_before
            metrics["teacher_checksum_after"] = weights_checksum(teacher.model)
        if rank == 0:
            accs = "  ".join(f"{s} {metrics[f'val_top1/{s}']:.4f}" for s in unit.head_stages)
            print(f"[{unit.key}] epoch {epoch + 1}/{epochs}  val_top1 {accs}", flush=True)
        progress.end_epoch(epoch, metrics)
    progress.finish(start_epoch, epochs)
    if rank == 0:
        save_heads(heads, unit.export_path, splits.num_classes)
