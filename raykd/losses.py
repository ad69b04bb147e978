"""Pure loss functions (the public API). Tensors in, scalar tensor out.

Formulas are those of shared METHODS.md; each function returns only its own term, unweighted
unless a weight is one of its arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Hinton et al.: T^2 * KL(p^T(z_t) || p^T(z_s)), summed over classes, mean over the batch.

    The T^2 factor keeps the soft term's gradient scale independent of T.
    """
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return t * t * kl.mean()
