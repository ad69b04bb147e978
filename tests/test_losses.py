"""Golden values for the public losses, hand-computed from the papers' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from raykd.losses import kd_loss


def _softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_golden_value_includes_t_squared():
    # row 0: p_t = softmax([1.5, 1, .5]), p_s = softmax([.5, 1, 1.5]); KL = 0.3201566678...
    # row 1: identical logits, KL = 0.  Batch mean times T^2 = 4 * 0.32015667 / 2.
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(0.6403133356596129, rel=1e-6)


def test_kd_loss_matches_formula_by_hand():
    s, t, T = [0.2, -1.0, 3.0, 0.5], [1.0, 0.0, 2.0, -2.0], 4.0
    pt, ps = _softmax([v / T for v in t]), _softmax([v / T for v in s])
    expected = T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert kd_loss(torch.tensor([s]), torch.tensor([t]), T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_zero_for_equal_logits_and_no_teacher_gradient():
    z = torch.randn(5, 10)
    assert kd_loss(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(5, 10, requires_grad=True)
    student = torch.randn(5, 10, requires_grad=True)
    kd_loss(student, teacher, 3.0).backward()
    assert teacher.grad is None and student.grad is not None


def test_kd_loss_t_squared_keeps_gradient_scale():
    # With the T^2 factor the soft gradient is (p_s - p_t) * T / batch; without it, it would be
    # T^2 times smaller. Check against that closed form at T=8.
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    T = 8.0
    kd_loss(s, t, T).backward()
    expected = T * (F.softmax(s.detach() / T, 1) - F.softmax(t / T, 1)) / 3
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_kd_loss_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0)
