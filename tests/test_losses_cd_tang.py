"""Golden values for Channel Distillation, Guided KD, EDT and Tang et al.'s teacher transforms."""
import math

import pytest
import torch

from raykd.losses import (
    channel_loss,
    guided_kd_loss,
    kd_loss,
    partial_teacher,
    reweighting_factor,
    smoothed_labels,
    soft_target_kd_loss,
    topk_teacher,
)
from raykd.methods.channel import ChannelParams
from raykd.schedules import channel_distillation_schedule
from raykd.teacher_transforms import similarity_targets, transform_teacher


def test_guided_kd_uses_only_samples_the_teacher_gets_right():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, 1.0, 0.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([0, 1, 0])           # the teacher is right on rows 0 and 1 only
    # T^2 / |M| * (KL_0 + KL_1), computed by hand with math.exp: 0.34773235913
    assert guided_kd_loss(s, t, y, 2.0).item() == pytest.approx(0.3477323591297246, rel=1e-6)
    assert guided_kd_loss(s, t, y, 2.0).item() == pytest.approx(kd_loss(s[:2], t[:2], 2.0).item())


def test_guided_kd_is_zero_not_nan_when_the_teacher_is_always_wrong():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([[5.0, 0, 0]] * 4)
    loss = guided_kd_loss(s, t, torch.tensor([1, 2, 1, 2]), 1.0)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_channel_loss_golden_value():
    # one stage, N=2, C=2, 1x2 maps: pooled w_s = [[2,1],[2,2]], w_t = [[0,1],[2,2]]
    # mean over (n, c) of squared differences = (4 + 0 + 0 + 0) / 4 = 1
    s = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]], [[[2.0, 2.0]], [[4.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]], [[[1.0, 3.0]], [[2.0, 2.0]]]])
    assert channel_loss([s], [t]).item() == pytest.approx(1.0)
    # summed over stages; spatial sizes may differ between stages
    assert channel_loss([s, s.repeat(1, 1, 2, 2)], [t, t.repeat(1, 1, 2, 2)]).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="batch and channels must match"):
        channel_loss([s], [t[:, :1]])


def test_topk_teacher_keeps_top_k_and_spreads_the_rest():
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    out = topk_teacher(p, 2)
    assert torch.allclose(out, torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]]))
    rows = topk_teacher(torch.softmax(torch.randn(64, 10), 1), 3)
    assert torch.allclose(rows.sum(1), torch.ones(64))
    assert torch.equal(topk_teacher(p, 5), p)


def test_partial_teacher_keeps_the_true_class_probability():
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.5, 0.2, 0.15, 0.1, 0.05]])
    out = partial_teacher(p, torch.tensor([1, 0]))
    assert torch.allclose(out[0], torch.full((5,), 0.2))
    assert torch.allclose(out[1], torch.tensor([0.5, 0.125, 0.125, 0.125, 0.125]))
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_label_smoothing_and_similarity_targets():
    ls = smoothed_labels(torch.tensor([2]), 5, 0.1)
    assert torch.allclose(ls, torch.tensor([[0.02, 0.02, 0.92, 0.02, 0.02]]))
    # orthogonal class weights: cosine = identity, so row y = softmax(I[y] / tau)
    sim = similarity_targets(torch.eye(4) * 3.0, temperature=0.5)
    diag = math.exp(2.0) / (math.exp(2.0) + 3)
    assert sim[1, 1].item() == pytest.approx(diag)
    assert sim[1, 0].item() == pytest.approx(1 / (math.exp(2.0) + 3))
    got = transform_teacher("sim", torch.zeros(2, 4), torch.tensor([1, 3]), similarity=sim)
    assert torch.equal(got, sim[[1, 3]])


def test_soft_target_kd_equals_kd_for_the_untransformed_teacher():
    s, t = torch.randn(6, 7), torch.randn(6, 7)
    q = torch.softmax(t / 3.0, 1)
    assert soft_target_kd_loss(s, q, 3.0).item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-5)


def test_reweighting_factor_by_hand():
    # l = 0.5, p_t,y = 0.8, q_y = 0.6: w = 1 - 0.5 * 0.2 / 0.4 = 0.75
    student = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    teacher = torch.tensor([[0.8, 0.1, 0.1]])
    w = reweighting_factor(student, teacher, torch.tensor([0]), 0.5)
    assert w.item() == pytest.approx(0.75)   # 1 - a (1 - q_y) / (1 - p_y) at T=1


def official_weights(e: int, dataset: str, edt: bool) -> tuple[float, float, float]:
    """(CE, GKD, CD) weights at 1-based epoch e, transcribed from the official Channel
    Distillation code's `adjust_loss_alpha` (lrdv1 = no EDT, lrdv2 = EDT)."""
    if dataset == "imagenet":
        ce, gkd, cd = 1.0, 1.0, 6.0 * 0.9 ** (e // 30)
        if edt and e <= 30:
            ce = gkd = 0.0
        return ce, gkd, cd
    if not edt:
        return 1.0, 0.1, 6.0
    exponent = 2 if e >= 160 else 1 if e >= 60 else 0
    off = e <= 60
    return (0.0 if off else 1.0), (0.0 if off else 0.1), 6.0 * 0.9 ** exponent


@pytest.mark.parametrize("dataset,edt,job", [
    ("imagenet", True, {"gkd": 1.0, "edt": True, "cd_decay_at": [0.3, 0.6, 0.9]}),
    ("imagenet", False, {"gkd": 1.0, "cd_decay_at": [0.3, 0.6, 0.9]}),
    ("cifar100", True, {"edt": True}),            # the defaults are CIFAR-100's recipe
    ("cifar100", False, {}),
])
def test_cd_weights_match_the_official_schedule_epoch_by_epoch(dataset, edt, job):
    p = ChannelParams(**job)
    epochs = 100 if dataset == "imagenet" else 200
    w = channel_distillation_schedule(p.ce, p.gkd, p.cd, p.edt, p.warmup, p.cd_decay,
                                      p.decay_points)
    for epoch in range(epochs):   # ours are 0-based
        ours = (w["ce"](epoch, epochs), w["gkd"](epoch, epochs), w["cd"](epoch, epochs))
        assert ours == pytest.approx(official_weights(epoch + 1, dataset, edt)), epoch
    if dataset == "cifar100" and edt:   # decayed twice, not three times: 6 x 0.9^2 at the end
        assert w["cd"](epochs - 1, epochs) == pytest.approx(4.86)


def test_edt_short_run_keeps_the_shape():
    w = channel_distillation_schedule(1.0, 0.1, 6.0, True, 0.3, 0.9, [0.3, 0.8])
    # 10 epochs: CD-only for epochs 0-2; the CD decays are in force from epochs 2 and 7
    assert [w["ce"](e, 10) for e in range(10)] == [0, 0, 0] + [1.0] * 7
    assert [round(w["cd"](e, 10), 3) for e in range(10)] == [6, 6] + [5.4] * 5 + [4.86] * 3
