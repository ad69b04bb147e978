"""The plain script a user would write instead of raykd: for each seed, train the teacher with
CE, then a student with CE and a student with KD from that teacher, one after another in this one
process. Same models, data split, batch size, optimizer, learning-rate schedule, epochs and
per-epoch validation as `jobs/whole_job.yaml`. Prints one JSON line of test accuracies.

    .venv/bin/python bench/plain_kd.py [--seeds 0 1 2] [--epochs 8]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from raykd.data import load_dataset
from raykd.job.specs import DataSpec, OptimSpec
from raykd.losses import kd_loss
from raykd.models import build_model
from raykd.train.batches import evaluate
from raykd.train.optim import make_optimizer, make_scheduler

EVAL_BATCH = DataSpec.eval_batch_size   # as raykd evaluates
FIRST_EPOCH_AT: list[float] = []    # wall-clock time the first epoch started


def train(model, splits, optim: OptimSpec, batch_size: int, teacher=None, temperature=4.0,
          alpha=0.9) -> float:
    opt, sched = make_optimizer(model.parameters(), optim), None
    sched = make_scheduler(opt, optim)
    FIRST_EPOCH_AT.append(time.time())
    for _ in range(optim.epochs):
        model.train()
        for x, y in DataLoader(splits.train, batch_size=batch_size, shuffle=True):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                loss = (1 - alpha) * loss + alpha * kd_loss(logits, t, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        evaluate(model, splits.val, EVAL_BATCH, "cpu")
    return evaluate(model, splits.test, EVAL_BATCH, "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    started = time.perf_counter()
    data = DataSpec(dataset="mnist5k", train_size=1000, batch_size=64)
    splits = load_dataset(data)
    optim = OptimSpec(epochs=args.epochs, lr=0.05)
    shape = (splits.num_classes, splits.in_channels, splits.image_size)
    acc: dict[str, list[float]] = {"teacher": [], "ce": [], "kd": []}
    for seed in args.seeds:
        torch.manual_seed(seed)
        teacher = build_model("cnn_wide", *shape)
        acc["teacher"].append(train(teacher, splits, optim, data.batch_size))
        teacher.eval()
        acc["ce"].append(train(build_model("cnn_small", *shape), splits, optim, data.batch_size))
        acc["kd"].append(train(build_model("cnn_small", *shape), splits, optim, data.batch_size,
                               teacher=teacher))
    print(json.dumps({"test_top1": acc, "wall_s": time.perf_counter() - started,
                      "first_epoch_at": FIRST_EPOCH_AT[0]}))


if __name__ == "__main__":
    main()
