"""Pure loss functions (the public API). Tensors in, scalar tensor out.

Formulas follow the papers cited in each method's module (raykd.methods); each function returns
only its own term, unweighted unless a weight is one of its arguments. Every one computes in
float32 whatever precision its inputs come in (`in_fp32`): softmax at a temperature, a KL
divergence or a normalised feature difference loses most of its value in bfloat16.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _fp32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_fp32(v) for v in value)
    return value


def in_fp32(loss):
    """Run `loss` on float32 copies of its tensor arguments, outside any autocast region."""
    @functools.wraps(loss)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return loss(*[_fp32(a) for a in args], **{k: _fp32(v) for k, v in kwargs.items()})
    return run


@in_fp32
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


@in_fp32
def soft_target_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """KD against a given teacher distribution (e.g. a transformed one):
    T^2 * KL(teacher_probs || p^T(z_s)), batch mean. Zero-probability classes add nothing."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    q = teacher_probs.detach()
    kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p_student)).sum(dim=1)
    return t * t * kl.mean()


@in_fp32
def guided_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Zhou et al.'s GKD: KD restricted to M = {n : argmax z_t,n = y_n},
    T^2 / |M| * sum_{n in M} KL(p^T(z_t,n) || p^T(z_s,n)); zero (not NaN) when M is empty."""
    right = teacher_logits.argmax(dim=1) == targets
    if not bool(right.any()):
        return student_logits.sum() * 0.0   # keeps the graph, contributes nothing
    return kd_loss(student_logits[right], teacher_logits[right], temperature)


@in_fp32
def channel_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]
                 ) -> torch.Tensor:
    """Zhou et al.'s CD: per stage, global-average-pool both maps to channel vectors w (N x C) and
    take the mean over (n, c) of (w_s - w_t)^2; sum over stages. Student maps must already be
    connected (mapped to the teacher's channel counts)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"channel_loss needs equally many maps, got {len(student_feats)} "
                         f"and {len(teacher_feats)}")
    total = student_feats[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"channel_loss stage {i}: student {tuple(s.shape)} vs teacher "
                             f"{tuple(t.shape)} (batch and channels must match)")
        w_s, w_t = s.mean(dim=(2, 3)), t.detach().mean(dim=(2, 3))
        total = total + ((w_s - w_t) ** 2).mean()
    return total


def topk_teacher(teacher_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Tang et al.'s KD-topk: keep the teacher's k largest probabilities and give each of the
    other C - k classes an equal share of the remaining mass. Rows sum to 1."""
    c = teacher_probs.shape[1]
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    if k == c:
        return teacher_probs.clone()
    top, idx = teacher_probs.topk(k, dim=1)
    rest = (1.0 - top.sum(dim=1, keepdim=True)).clamp_min(0.0) / (c - k)
    out = rest.expand(-1, c).clone()
    out.scatter_(1, idx, top)
    return out


def partial_teacher(teacher_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Tang et al.'s KD-pt: keep p_t,y; spread 1 - p_t,y evenly over the other classes."""
    c = teacher_probs.shape[1]
    p_true = teacher_probs.gather(1, targets[:, None])
    out = ((1.0 - p_true) / (c - 1)).expand(-1, c).clone()
    out.scatter_(1, targets[:, None], p_true)
    return out


def smoothed_labels(targets: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """Uniform label smoothing: (1 - eps) one-hot(y) + eps / C."""
    out = torch.full((len(targets), num_classes), epsilon / num_classes,
                     device=targets.device)
    out.scatter_add_(1, targets[:, None], torch.full((len(targets), 1), 1.0 - epsilon,
                                                     device=targets.device))
    return out


def reweighting_factor(student_logits: torch.Tensor, target_probs: torch.Tensor,
                       targets: torch.Tensor, alpha: float, temperature: float = 1.0
                       ) -> torch.Tensor:
    """Tang et al.'s per-example factor on the true-class logit's gradient, relative to plain CE,
    for L = (1 - a) CE(z, y) + a T^2 KL(q || p^T(z)) with q the distilled distribution at T:

        w = (1 - a) + a T (p^T_y - q_y) / (p_y - 1),   p = softmax(z), p^T = softmax(z / T).

    At T = 1 this is the paper's w = 1 - a (1 - q_y) / (1 - p_y)."""
    z = student_logits.detach()
    y = targets[:, None]
    p_y = F.softmax(z, dim=1).gather(1, y).squeeze(1)
    p_t_y = F.softmax(z / temperature, dim=1).gather(1, y).squeeze(1)
    q_y = target_probs.detach().gather(1, y).squeeze(1)
    return (1 - alpha) + alpha * temperature * (p_t_y - q_y) / (p_y - 1).clamp_max(-1e-6)


@in_fp32
def dih_loss(student_logits: torch.Tensor, cohort_logits: list[torch.Tensor],
             targets: torch.Tensor, alpha, temperature: float, ce_once: bool = False
             ) -> torch.Tensor:
    """Asadian & Salehi-Abari's cohort loss over k heads plus the teacher's classifier:
    sum_j [a_j T^2 KL(p^T(z_j) || p^T(z_s)) + (1 - a_j) CE(z_s, y)].

    CE sits inside the sum (counted k+1 times) as in the official code; `ce_once` counts it
    once with weight (1 - mean a_j). `alpha` is one weight or one per cohort member. A member
    whose weight is 0 is switched off: it adds nothing, not even its CE term (the official
    code's `if alpha_value != 0.0`); with every member off the loss is plain CE.
    """
    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [float(alpha)] * len(cohort_logits)
    if len(alphas) != len(cohort_logits):
        raise ValueError(f"dih_loss: {len(alphas)} weights for {len(cohort_logits)} cohort members")
    ce = F.cross_entropy(student_logits, targets)
    on = [(a, z) for a, z in zip(alphas, cohort_logits) if a != 0.0]
    if not on:
        return ce
    alphas = [a for a, _ in on]
    total = student_logits.new_zeros(())
    for a, z in on:
        total = total + a * kd_loss(student_logits, z, temperature)
        if not ce_once:
            total = total + (1 - a) * ce
    if ce_once:
        total = total + (1 - sum(alphas) / len(alphas)) * ce
    return total


def _unit_norm(x: torch.Tensor) -> torch.Tensor:
    """N(x) = x / ||x||_2, per sample over C*H*W."""
    flat = x.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


@in_fp32
def feed_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]
              ) -> torch.Tensor:
    """Park & Kwak's FEED term: sum_k mean | N(T_k(F_s)) - N(F_t^k) |, with the student's map
    already transformed by T_k for teacher k; the weight beta is applied by the method."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"feed_loss needs one transformed map per teacher, got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(f"feed_loss teacher {k}: transformed student map {tuple(s.shape)} "
                             f"vs teacher map {tuple(t.shape)}")
        total = total + (_unit_norm(s) - _unit_norm(t.detach())).abs().mean()
    return total


@in_fp32
def neighbourhood_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Shao et al.: mean squared error between a candidate's and the neighbourhood's outputs."""
    return F.mse_loss(student_out, teacher_out.detach())


@in_fp32
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """Zhao et al.'s decoupled KD: alpha TCKD + beta NCKD, each T^2 KL summed over classes and
    averaged over the batch. TCKD: the binary (target, rest) distributions; NCKD: the
    distributions over the non-target classes alone (the target's logit masked out)."""
    t = float(temperature)
    z_s, z_t = student_logits / t, teacher_logits.detach() / t
    target = F.one_hot(targets, z_s.shape[1]).bool()
    p_s, p_t = F.softmax(z_s, dim=1), F.softmax(z_t, dim=1)

    def binary(p):
        on = (p * target).sum(1, keepdim=True)
        return torch.cat([on, (p * ~target).sum(1, keepdim=True)], dim=1)

    b_s, b_t = binary(p_s), binary(p_t)
    tckd = (b_t * (b_t.clamp_min(1e-12).log() - b_s.clamp_min(1e-12).log())).sum(1).mean()
    masked_s = z_s.masked_fill(target, float("-inf"))
    masked_t = z_t.masked_fill(target, float("-inf"))
    log_q_s, q_t = F.log_softmax(masked_s, dim=1), F.softmax(masked_t, dim=1)
    nckd = (q_t * (q_t.clamp_min(1e-12).log() - log_q_s)).masked_fill(target, 0).sum(1).mean()
    return t * t * (alpha * tckd + beta * nckd)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@in_fp32
def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
              gamma: float, tau: float) -> torch.Tensor:
    """Huang et al.'s DIST: beta tau^2 (1 - mean Pearson correlation of each example's class
    probabilities) + gamma tau^2 (1 - mean Pearson correlation of each class's probabilities
    across the batch)."""
    y_s = F.softmax(student_logits / tau, dim=1)
    y_t = F.softmax(teacher_logits.detach() / tau, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return tau * tau * (beta * inter + gamma * intra)


def _attention(feature: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


@in_fp32
def attention_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                   p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis's attention transfer, summed over stage pairs: the mean squared
    difference of the L2-normalised attention maps (the channel mean of |F|^p, flattened); the
    larger map of a pair is average-pooled to the smaller's size first."""
    total = student_feats[0].new_zeros(())
    for s, t in zip(student_feats, teacher_feats):
        t = t.detach()
        if s.shape[-1] > t.shape[-1]:
            s = F.adaptive_avg_pool2d(s, t.shape[-2:])
        elif s.shape[-1] < t.shape[-1]:
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        total = total + (_attention(s, p) - _attention(t, p)).pow(2).mean()
    return total


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    square = e.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@in_fp32
def rkd_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """Park et al.'s relational KD on embeddings (flattened per example): smooth-L1 between the
    pairwise distances, each normalised by its mean over distinct pairs, weighted
    `distance_weight`, plus smooth-L1 between the angles of every triplet, `angle_weight`. A batch
    of one has no pairs: zero (with the graph kept)."""
    s, t = student_embed.flatten(1), teacher_embed.detach().flatten(1)
    if len(s) < 2:
        return s.sum() * 0
    d_t = _pairwise_distances(t)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = _pairwise_distances(s)
    d_s = d_s / d_s[d_s > 0].mean()
    return distance_weight * F.smooth_l1_loss(d_s, d_t) + \
        angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))


@in_fp32
def hint_loss(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """FitNets' hint: mean squared error between the regressor's output on the student's guided
    layer and the teacher's hint layer."""
    return F.mse_loss(regressed, hint.detach())


@in_fp32
def contrast_nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (its `ContrastLoss`) on the normalised similarity scores of each anchor to
    its positive (column 0) and its K negatives: -(log D(pos) + sum log(1 - D(neg))) / batch,
    with D(s) = s / (s + K / n_data)."""
    batch, m = scores.shape[0], scores.shape[1] - 1
    noise = m / float(n_data)
    positive = scores[:, 0]
    log_d1 = (positive / (positive + noise + eps)).log()
    negative = scores[:, 1:]
    log_d0 = (noise / (negative + noise + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / batch
