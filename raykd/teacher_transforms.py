"""Tang et al.'s teacher transforms: what a logit-distillation method distils from.

Each maps the teacher's tempered probabilities (and the labels) to a target distribution:
  none    the teacher itself (plain KD)
  ls      uniform label smoothing, no teacher at all (effect 1 alone)
  pt      partial teacher: keep p_t,y, spread the rest evenly (effects 1 and 3)
  sim     class-similarity soft labels from the teacher's classifier weights (effects 1 and 2)
  topk    keep the k largest probabilities, spread the rest evenly (the improvement)
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from raykd.losses import partial_teacher, smoothed_labels, topk_teacher

Transform = Literal["none", "ls", "pt", "sim", "topk"]
TRANSFORMS = get_args(Transform)


def classifier_weights(model: nn.Module) -> torch.Tensor:
    """The teacher's final-layer class weights (C x D): its last Linear layer."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the teacher has no linear classifier for class similarities")
    return linears[-1].weight.detach()


def similarity_targets(weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row y: softmax over classes of cos(w_y, w_c) / temperature (C x C, rows sum to 1)."""
    w = F.normalize(weights.float(), dim=1)
    return F.softmax(w @ w.t() / temperature, dim=1)


def transform_teacher(name: str, teacher_probs: torch.Tensor, targets: torch.Tensor, *,
                      k: int = 1, epsilon: float = 0.1,
                      similarity: torch.Tensor | None = None) -> torch.Tensor:
    if name == "none":
        return teacher_probs
    if name == "ls":
        return smoothed_labels(targets, teacher_probs.shape[1], epsilon)
    if name == "pt":
        return partial_teacher(teacher_probs, targets)
    if name == "topk":
        return topk_teacher(teacher_probs, k)
    if name == "sim":
        if similarity is None:
            raise ValueError("transform 'sim' needs the class-similarity matrix")
        return similarity.to(targets.device)[targets]
    raise ValueError(f"unknown teacher transform {name!r}; allowed: {', '.join(TRANSFORMS)}")
