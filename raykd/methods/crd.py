"""Contrastive representation distillation: the student's embedding of an image drawn to the
teacher's embedding of the same image and away from the teacher's of other images, held in a
memory bank.

Paper: Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", 2020,
arXiv:1910.10699; as RepDistiller and mdistiller run it: 128-d L2-normalised linear embeddings of
the student's and the teacher's penultimate (average-pooled last-stage) features, one memory of
each per training image, 16,384 negatives (or the training set size less one if smaller) drawn
uniformly, temperature 0.07, memory momentum 0.5, the NCE loss both ways, weight 0.8, plus CE.
The memory and the embeddings are the method's own modules: trained with the run, checkpointed
with it (so a resumed run goes on with the same memory), never exported. Negatives are drawn
from a generator seeded by the batch's epoch and first index, so a resume draws them again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from raykd.errors import RaykdError
from raykd.job.typed import AtLeast, Between, NonNegative, Positive
from raykd.losses import contrast_nce_loss
from raykd.methods.base import DistillMethod, Step, needs_teacher, register_method
from raykd.methods.rkd import embedding
from raykd.models.staged import tap_shapes


@dataclass
class CRDParams:
    weight: Annotated[float, NonNegative] = 0.8
    feat_dim: Annotated[int, AtLeast(1)] = 128
    negatives: Annotated[int, AtLeast(1)] = 16384
    temperature: Annotated[float, Positive] = 0.07
    momentum: Annotated[float, Between(0, 1)] = 0.5
    ce: Annotated[float, NonNegative] = 1.0


class ContrastMemory(nn.Module):
    """One unit-norm memory row per training image for each side, and the two normalising
    constants (set from the first batch, as the reference code does)."""

    def __init__(self, dim: int, n_data: int, negatives: int, temperature: float,
                 momentum: float):
        super().__init__()
        self.n_data, self.temperature, self.momentum = n_data, temperature, momentum
        self.negatives = max(1, min(negatives, n_data - 1))
        std = 1.0 / math.sqrt(dim / 3)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", torch.rand(n_data, dim, generator=g) * 2 * std - std)
        self.register_buffer("memory_t", torch.rand(n_data, dim, generator=g) * 2 * std - std)
        self.register_buffer("z", torch.full((2,), -1.0))   # Z_s, Z_t; < 0: not yet set

    def draw(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """(batch, 1 + K) memory rows: the image itself first, then K uniform draws."""
        g = torch.Generator().manual_seed(epoch * 1_000_003 + int(index[0]))
        others = torch.randint(0, self.n_data, (len(index), self.negatives), generator=g)
        return torch.cat([index.cpu()[:, None], others], dim=1).to(index.device)

    def forward(self, e_s, e_t, index, epoch: int):
        rows = self.draw(index, epoch)
        b, k1 = rows.shape
        w_t = self.memory_t[rows.flatten()].view(b, k1, -1).detach()
        w_s = self.memory_s[rows.flatten()].view(b, k1, -1).detach()
        out_s = torch.exp(torch.bmm(w_t, e_s[:, :, None]).squeeze(2) / self.temperature)
        out_t = torch.exp(torch.bmm(w_s, e_t[:, :, None]).squeeze(2) / self.temperature)
        if self.z[0] < 0:
            self.z[0] = out_s.mean().detach() * self.n_data
            self.z[1] = out_t.mean().detach() * self.n_data
        out_s, out_t = out_s / self.z[0], out_t / self.z[1]
        with torch.no_grad():     # each image's rows move towards its new embeddings
            for memory, new in ((self.memory_s, e_s), (self.memory_t, e_t)):
                moved = memory[index] * self.momentum + new.detach() * (1 - self.momentum)
                memory[index] = F.normalize(moved, dim=1)
        return out_s, out_t


class Embed(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(cin, dim)

    def forward(self, x):
        return F.normalize(self.linear(x), dim=1)


@register_method("crd")
class CRD(DistillMethod):
    Params = CRDParams

    def __init__(self, params: CRDParams, ctx):
        super().__init__(params, ctx)
        needs_teacher(ctx, "crd")
        self.s_tap, self.t_tap = ctx.student.stage_names[-1], ctx.teacher.stage_names[-1]
        s_c = tap_shapes(ctx.student, [self.s_tap], ctx.input_shape)[self.s_tap][0]
        t_c = tap_shapes(ctx.teacher, [self.t_tap], ctx.input_shape)[self.t_tap][0]
        n_data = max(ctx.train_size, 2)
        self.parts = nn.ModuleDict({
            "embed_s": Embed(s_c, params.feat_dim), "embed_t": Embed(t_c, params.feat_dim),
            "memory": ContrastMemory(params.feat_dim, n_data, params.negatives,
                                     params.temperature, params.momentum)})

    def student_taps(self):
        return [self.s_tap, "logits"]

    def teacher_taps(self):
        return [self.t_tap]

    def modules(self):
        return self.parts

    def losses(self, step: Step):
        p = self.params
        if step.index is None:
            raise RaykdError("crd needs each image's index in the training split")
        e_s = self.parts["embed_s"](embedding(step.student[self.s_tap]))
        e_t = self.parts["embed_t"](embedding(step.teacher[self.t_tap]))
        memory = self.parts["memory"]
        out_s, out_t = memory(e_s, e_t, step.index, step.epoch)
        crd = contrast_nce_loss(out_s, memory.n_data) + contrast_nce_loss(out_t, memory.n_data)
        return {"ce": p.ce * F.cross_entropy(step.student["logits"], step.y),
                "crd": p.weight * crd}
