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
from raykd.schedules import early_decay_teacher
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
    assert reweighting_factor(student, teacher, torch.tensor([0]), 0.5).item() == pytest.approx(0.75)


@pytest.mark.parametrize("epoch,ce,gkd,cd", [
    (0, 0, 0, 6), (29, 0, 0, 6), (30, 1, 1, 5.4), (59, 1, 1, 5.4), (60, 1, 1, 4.86),
    (90, 1, 1, 4.374), (99, 1, 1, 4.374)])
def test_edt_imagenet_recipe_100_epochs(epoch, ce, gkd, cd):
    # CD-only for the first 30 of 100 epochs; CD x0.9 every 30 epochs
    w = early_decay_teacher(1.0, 1.0, 6.0, warmup=0.3, decay=0.9, decay_at=[0.3, 0.6, 0.9])
    assert (w["ce"](epoch, 100), w["gkd"](epoch, 100)) == (ce, gkd)
    assert w["cd"](epoch, 100) == pytest.approx(cd)


@pytest.mark.parametrize("epoch,ce,gkd,cd", [
    (0, 0, 0, 6), (59, 0, 0, 6), (60, 1, 0.1, 5.4), (119, 1, 0.1, 5.4), (120, 1, 0.1, 4.86),
    (159, 1, 0.1, 4.86), (160, 1, 0.1, 4.374), (199, 1, 0.1, 4.374)])
def test_edt_cifar100_recipe_200_epochs(epoch, ce, gkd, cd):
    # CD-only for the first 60 of 200 epochs; CD x0.9 at the lr milestones 60/120/160
    w = early_decay_teacher(1.0, 0.1, 6.0, warmup=0.3, decay=0.9, decay_at=[0.3, 0.6, 0.8])
    assert (w["ce"](epoch, 200), w["gkd"](epoch, 200)) == (ce, gkd)
    assert w["cd"](epoch, 200) == pytest.approx(cd)


def test_edt_short_run_keeps_the_shape():
    w = early_decay_teacher(1.0, 0.1, 6.0, warmup=0.3, decay=0.9, decay_at=[0.3, 0.6, 0.8])
    ce = [w["ce"](e, 10) for e in range(10)]
    assert ce == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert w["cd"](9, 10) == pytest.approx(6 * 0.9 ** 3)
