"""Golden tests of the baseline methods' losses against independent implementations of their
official code's formulas (mdistiller's DKD and AT, the DIST authors' code, the original attention
transfer code), written here without raykd's helpers, with their edge cases."""
import pytest
import torch
import torch.nn.functional as F

from raykd.losses import attention_loss, dist_loss, dkd_loss
from raykd.methods import MethodContext, Step, build_method
from raykd.models import build_model


def official_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller/distillers/DKD.py's dkd_loss, restated."""
    gt = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other = ~gt
    p_s = F.softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdims=True),        # noqa: E731
                               (p * other).sum(1, keepdims=True)], dim=1)
    p_s, p_t = cat(p_s), cat(p_t)
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * temperature ** 2 / target.shape[0]
    p_t2 = F.softmax(logits_teacher / temperature - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(logits_student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def official_dist(z_s, z_t, beta, gamma, tau):
    """hunto/DIST_KD's DIST loss, restated."""
    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
    return beta * tau ** 2 * inter + gamma * tau ** 2 * intra


def official_at(g_s, g_t, beta=1000.0):
    """szagoruyko/attention-transfer's at_loss, beta / 2 * sum (after mdistiller's pooling of the
    larger map, which the original never needs on its equal-size pairs)."""
    def at(x):
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    total = 0.0
    for s, t in zip(g_s, g_t):
        if s.shape[2] > t.shape[2]:
            s = F.adaptive_avg_pool2d(s, (t.shape[2], t.shape[2]))
        elif s.shape[2] < t.shape[2]:
            t = F.adaptive_avg_pool2d(t, (s.shape[2], s.shape[2]))
        total = total + (at(s) - at(t)).pow(2).mean()
    return beta / 2 * total


@pytest.mark.parametrize("batch", [1, 7])
def test_dkd_equals_mdistillers_formula(batch):
    torch.manual_seed(batch)
    z_s, z_t = torch.randn(batch, 10) * 3, torch.randn(batch, 10) * 3
    y = torch.randint(0, 10, (batch,))
    want = official_dkd(z_s, z_t, y, 1.0, 8.0, 4.0)
    assert dkd_loss(z_s, z_t, y, 1.0, 8.0, 4.0).item() == pytest.approx(want.item(), rel=1e-5)
    # identical logits: both terms vanish
    assert dkd_loss(z_t, z_t, y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-4)


def test_dkd_warms_up_linearly_from_its_first_epoch():
    """mdistiller: min(epoch / warmup, 1) with 1-based epochs; here a fraction of the run:
    20 of 240 epochs, so the first epoch (0-based 0) weighs 1/20 and epoch 20 onwards 1."""
    student, teacher = build_model("cnn_small", 10, 1, 8), build_model("cnn", 10, 1, 8)
    method = build_method("dkd", {}, MethodContext(student=student, num_classes=10,
                                                   input_shape=(1, 8, 8), teacher=teacher))
    assert method.loss_weights(0, 240)["dkd"] == pytest.approx(1 / 20)
    assert method.loss_weights(9, 240)["dkd"] == pytest.approx(10 / 20)
    assert method.loss_weights(19, 240)["dkd"] == 1.0 and method.loss_weights(100, 240)["dkd"] == 1.0
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with torch.no_grad():
        z_t = teacher(x)
    z_s = student.features(x, ["logits"])
    terms = method.losses(Step(x=x, y=y, student=z_s, teacher={"logits": z_t}, epoch=0,
                               epochs=240))
    want = official_dkd(z_s["logits"], z_t, y, 1.0, 8.0, 4.0) / 20
    assert terms["dkd"].item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("batch", [2, 16])
def test_dist_equals_its_authors_formula(batch):
    torch.manual_seed(batch)
    z_s, z_t = torch.randn(batch, 100), torch.randn(batch, 100) * 2
    for beta, gamma, tau in ((1.0, 1.0, 1.0), (2.0, 0.5, 4.0)):
        want = official_dist(z_s, z_t, beta, gamma, tau)
        assert dist_loss(z_s, z_t, beta, gamma, tau).item() == pytest.approx(want.item(), rel=1e-5)


def test_attention_transfer_equals_the_original_code():
    torch.manual_seed(0)
    g_s = [torch.randn(3, 8, 16, 16), torch.randn(3, 16, 8, 8), torch.randn(3, 32, 2, 2)]
    g_t = [torch.randn(3, 32, 16, 16), torch.randn(3, 64, 4, 4), torch.randn(3, 64, 4, 4)]
    want = official_at(g_s, g_t)
    got = 1000.0 / 2 * attention_loss(g_s, g_t, 2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # the method weighs it so, next to CE
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn_wide", 10, 1, 28)
    method = build_method("at", {}, MethodContext(student=student, num_classes=10,
                                                  input_shape=(1, 28, 28), teacher=teacher))
    x, y = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    s = student.features(x, method.student_taps())
    with torch.no_grad():
        t = teacher.features(x, method.teacher_taps())
    terms = method.losses(Step(x=x, y=y, student=s, teacher=t, epoch=0, epochs=1))
    pairs = method.pairs
    want = official_at([s[a] for a, _ in pairs], [t[b] for _, b in pairs])
    assert terms["at"].item() == pytest.approx(want.item(), rel=1e-5)


def official_rkd(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    """mdistiller/distillers/RKD.py's rkd_loss, restated."""
    def pdist(e):
        e_square = e.pow(2).sum(dim=1)
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
        res = res.sqrt() if not squared else res
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res
    stu, tea = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    t_d = pdist(tea)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(stu)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    td = F.normalize(tea.unsqueeze(0) - tea.unsqueeze(1), p=2, dim=2)
    t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(stu.unsqueeze(0) - stu.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return distance_weight * loss_d + angle_weight * F.smooth_l1_loss(s_angle, t_angle)


def test_rkd_equals_mdistillers_formula_and_a_batch_of_one_is_zero():
    from raykd.losses import rkd_loss

    torch.manual_seed(0)
    e_s, e_t = torch.randn(6, 16, requires_grad=True), torch.randn(6, 32)
    want = official_rkd(e_s, e_t)
    got = rkd_loss(e_s, e_t, 25.0, 50.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert e_s.grad.abs().sum() > 0
    one = torch.randn(1, 16, requires_grad=True)
    zero = rkd_loss(one, torch.randn(1, 32))
    assert zero.item() == 0.0 and torch.isfinite(zero)
    zero.backward()               # the graph is kept: a step on a last batch of one is fine
    assert official_rkd(one.detach(), torch.randn(1, 32)).isnan(), "mdistiller gives NaN there"


def test_fitnets_hints_first_then_distils_and_its_regressor_maps_the_shapes():
    from raykd.methods.fitnets import regressor

    for s_shape, t_shape in (((8, 16, 16), (32, 8, 8)), ((8, 4, 4), (32, 8, 8)),
                             ((8, 8, 8), (32, 6, 6)), ((8, 8, 8), (32, 8, 8))):
        out = regressor(s_shape, t_shape)(torch.randn(2, *s_shape))
        assert out.shape == (2, *t_shape)
    student, teacher = build_model("cnn_small", 10, 1, 28), build_model("cnn_wide", 10, 1, 28)
    method = build_method("fitnets", {}, MethodContext(student=student, num_classes=10,
                                                       input_shape=(1, 28, 28), teacher=teacher))
    assert method.s_tap == "stage2" and method.t_tap == "stage2", "the middle stages"
    # stage 1 (the first quarter of 8 epochs): the hint alone; then KD, hint off
    assert method.loss_weights(1, 8) == {"hint": 1.0, "ce": 0.0, "kd": 0.0}
    assert method.loss_weights(2, 8) == {"hint": 0.0, "ce": pytest.approx(0.1), "kd": 0.9}
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    s = student.features(x, method.student_taps())
    with torch.no_grad():
        t = teacher.features(x, method.teacher_taps())
    terms = method.losses(Step(x=x, y=y, student=s, teacher=t, epoch=0, epochs=8))
    want = F.mse_loss(method.regressor(s["stage2"]), t["stage2"])
    assert terms["hint"].item() == pytest.approx(want.item(), rel=1e-6)
    assert terms["ce"].item() == 0.0 and terms["kd"].item() == 0.0


def official_contrast_loss(x, n_data, eps=1e-7):
    """RepDistiller/crd/criterion.py's ContrastLoss, restated (x: batch x (K+1) x 1)."""
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def test_crd_loss_memory_and_negatives_follow_the_reference_code():
    from raykd.losses import contrast_nce_loss
    from raykd.methods.crd import ContrastMemory

    torch.manual_seed(0)
    scores = torch.rand(5, 17) * 2
    want = official_contrast_loss(scores[:, :, None], 1000)
    assert contrast_nce_loss(scores, 1000).item() == pytest.approx(want.item(), rel=1e-5)
    # fewer images than 16,384 + 1: as many negatives as other images; the positive first
    memory = ContrastMemory(8, 30, 16384, 0.07, 0.5)
    assert memory.negatives == 29
    index = torch.tensor([3, 7, 29])
    rows = memory.draw(index, epoch=2)
    assert rows.shape == (3, 30) and torch.equal(rows[:, 0], index)
    assert torch.equal(rows, memory.draw(index, epoch=2)), "a resumed epoch draws the same"
    assert int(rows.max()) <= 29, "drawn within the memory (the last row included)"
    # scores: exp(<memory, e> / T) / Z with Z set from the first batch (mean * n_data); memory
    # rows move by momentum, then are renormalised
    e_s, e_t = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    before_t, before_s = memory.memory_t.clone(), memory.memory_s.clone()
    out_s, out_t = memory(e_s, e_t, index, epoch=2)
    raw_s = torch.exp(torch.bmm(before_t[rows.flatten()].view(3, 30, 8), e_s[:, :, None])
                      .squeeze(2) / 0.07)
    z_s = raw_s.mean() * 30
    assert torch.allclose(out_s, raw_s / z_s, rtol=1e-5) and memory.z[0] == pytest.approx(z_s)
    moved = F.normalize(before_s[index] * 0.5 + e_s * 0.5, dim=1)
    assert torch.allclose(memory.memory_s[index], moved, atol=1e-6)
    untouched = [i for i in range(30) if i not in (3, 7, 29)]
    assert torch.equal(memory.memory_s[untouched], before_s[untouched])
    second, _ = memory(e_s, e_t, index, epoch=3)
    assert memory.z[0] == pytest.approx(z_s), "Z is set once, from the first batch"
