"""Hand-value and gradient checks of hmkd.distill.fgd.FGDLoss (values by explicit arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hmkd.distill.fgd import FGD_PRESETS, FGDLoss, fgd_attention

UNIT = dict(alpha=1.0, beta=1.0, gamma=1.0, lambda_=1.0)


def _box(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _case_uniform_teacher():
    """T = 1 everywhere (so A_S^T = A_C^T = 1), S = 0 except two entries."""
    t = torch.ones(1, 2, 3, 3)
    s = torch.zeros(1, 2, 3, 3)
    s[0, 0, 0, 0] = 3.0  # fg cell (0,0): ch0 diff^2 = 4
    s[0, 1, 2, 2] = -1.0  # bg cell (2,2): ch1 diff^2 = 4
    return s, t


def test_defaults_are_fgd_two_stage_config():
    f = FGDLoss(4, 4)
    assert (f.temperature, f.alpha, f.beta, f.gamma, f.lambda_) == (0.5, 5e-5, 2.5e-5, 5e-5, 5e-7)
    assert isinstance(f.adapter, nn.Identity)
    r = FGDLoss.for_detector("retinanet", 2, 4)
    assert isinstance(r.adapter, nn.Conv2d)
    assert (r.temperature, r.alpha, r.beta, r.gamma, r.lambda_) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    fc = FGDLoss.for_detector("fcos", 4, 4, alpha=1.0)
    assert fc.temperature == 0.8 and fc.alpha == 1.0 and fc.beta == 8e-4
    assert FGD_PRESETS["two_stage"]["lambda_"] == 5e-7
    with pytest.raises(ValueError, match="unknown detector"):
        FGDLoss.for_detector("yolo", 4, 4)


def test_focal_losses_hand_value():
    s, t = _case_uniform_teacher()
    f = FGDLoss(2, 2, temperature=0.5, alpha=0.3, beta=0.7, gamma=0.0, lambda_=0.0)
    out = f(s, t, [_box([0, 0, 2, 2])], stride=1)  # cells x 0..1, y 0..1: K = 1/4 ; N_bg = 5
    # per-pixel sum over channels of (T-S)^2: 2 everywhere, 4+1 = 5 at (0,0) and (2,2)
    assert out["fg"].item() == pytest.approx(0.3 * (5 + 2 + 2 + 2) / 4)
    assert out["bg"].item() == pytest.approx(0.7 * (2 + 2 + 2 + 2 + 5) / 5)
    assert set(out) == {"fg", "bg", "attention", "global"}


def test_attention_and_weighted_focal_hand_value():
    ln9 = math.log(9.0)
    t = torch.zeros(1, 2, 3, 3)
    t[0, 0, 1, 1] = ln9
    s = torch.zeros(1, 2, 3, 3)
    f = FGDLoss(2, 2, temperature=0.5, **UNIT)
    # A_S^T: logits mean_c|T|/0.5 = ln9 at the centre, 0 elsewhere -> 9*[1 or 9]/(8+9)
    # A_C^T: logits (ln9/9)/0.5 and 0 -> 2*q/(q+1), 2/(q+1) with q = 9^(2/9)
    q = 9.0 ** (2.0 / 9.0)
    ac0, ac1 = 2 * q / (q + 1), 2 / (q + 1)
    sa_t, ca_t = fgd_attention(t, 0.5)
    assert sa_t[0, 1, 1].item() == pytest.approx(81 / 17)
    assert sa_t[0, 0, 0].item() == pytest.approx(9 / 17)
    assert ca_t[0].tolist() == pytest.approx([ac0, ac1])
    out = f(s, t, [_box([1, 1, 2, 2])], stride=1)  # centre cell only: K = 1
    # S = 0: A_S^S = 1 and A_C^S = 1 everywhere
    expected_att = 8 * (1 - 9 / 17) + (81 / 17 - 1) + abs(ac0 - 1) + abs(ac1 - 1)
    assert out["attention"].item() == pytest.approx(expected_att, rel=1e-5)
    # only the centre has a difference, on channel 0: ln9^2 * A_S(81/17) * A_C0 * K(1)
    assert out["fg"].item() == pytest.approx(ln9**2 * 81 / 17 * ac0, rel=1e-5)
    assert out["bg"].item() == pytest.approx(0.0, abs=1e-7)


def test_global_loss_fgd_init_is_plain_sum_of_squares():
    s, t = _case_uniform_teacher()
    f = FGDLoss(2, 2, temperature=0.5, alpha=0.0, beta=0.0, gamma=0.0, lambda_=0.1)
    out = f(s, t, [_box([0, 0, 2, 2])], stride=1)
    # FGD init zeroes each GcBlock's last conv, so f'_s(S) = S and f'_t(T) = T at the start:
    # 16 entries with diff^2 = 1 and 2 entries with diff^2 = 4
    assert out["global"].item() == pytest.approx(0.1 * (16 * 1 + 2 * 4))


def test_global_loss_with_hand_set_student_gcblock():
    f = FGDLoss(2, 2, gc_ratio=1.0, **UNIT)
    gs = f.gc_student
    with torch.no_grad():
        gs.conv_mask.weight.zero_()  # uniform softmax: context = spatial mean per channel
        gs.conv_mask.bias.zero_()
        gs.conv_v1.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        gs.conv_v1.bias.zero_()
        gs.norm.weight.fill_(1.0)
        gs.norm.bias.zero_()
        gs.conv_v2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        gs.conv_v2.bias.zero_()
    s = torch.zeros(1, 2, 3, 3)
    s[0, 0] = 1.0  # context (1, 0) -> LayerNorm (+r, -r), r = 0.5/sqrt(0.25+eps) -> ReLU (r, 0)
    t = torch.zeros(1, 2, 3, 3)  # teacher block still FGD-initialised: identity
    r = 0.5 / math.sqrt(0.25 + 1e-5)
    out = f(s, t, [_box()], stride=1)
    assert out["global"].item() == pytest.approx(9 * (1 + r) ** 2, rel=1e-5)


def test_batch_is_mean_of_images_and_empty_image():
    torch.manual_seed(0)
    f = FGDLoss(3, 4, gc_init="default")
    s = torch.randn(2, 3, 5, 6)
    t = torch.randn(2, 4, 5, 6)
    boxes = [_box(), _box([4, 0, 20, 12], [0, 8, 9, 20])]
    out = f(s, t, boxes, stride=4)
    singles = [f(s[i : i + 1], t[i : i + 1], [boxes[i]], stride=4) for i in range(2)]
    for key in ("fg", "bg", "attention", "global"):
        assert out[key].item() == pytest.approx((singles[0][key] + singles[1][key]).item() / 2, rel=1e-5)
    assert singles[0]["fg"].item() == 0.0  # no box, no foreground
    assert all(torch.isfinite(v) for v in out.values())


def test_overlap_rule_default_is_fgd_smallest_box():
    t = torch.ones(1, 1, 2, 3)
    s = torch.zeros(1, 1, 2, 3)
    boxes = [_box([0, 0, 3, 2], [0, 0, 1, 1])]  # whole map (area 6) and cell (0,0) (area 1)
    fg_max = FGDLoss(1, 1, **UNIT)(s, t, boxes, stride=1)["fg"].item()
    fg_min = FGDLoss(1, 1, overlap="min", **UNIT)(s, t, boxes, stride=1)["fg"].item()
    assert fg_max == pytest.approx(1 / 1 + 5 / 6)  # cell (0,0) weighted by the small box
    assert fg_min == pytest.approx(6 / 6)


def _grad_nonzero(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("gc_init", ["fgd", "default"])
def test_gradients_reach_student_adapter_and_both_gcblocks_not_teacher(gc_init):
    torch.manual_seed(1)
    f = FGDLoss(3, 4, gc_init=gc_init, **UNIT)
    s = torch.randn(2, 3, 4, 5, requires_grad=True)
    t = torch.randn(2, 4, 4, 5)
    t_before = t.clone()
    out = f(s, t, [_box([0, 0, 8, 8]), _box()], stride=4)
    sum(out.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert _grad_nonzero(f.adapter)
    assert _grad_nonzero(f.gc_student) and _grad_nonzero(f.gc_teacher)
    assert f.gc_teacher.conv_v2.weight.grad.abs().sum() > 0
    assert not t.requires_grad and t.grad is None and torch.equal(t, t_before)
    # a teacher map that wrongly requires grad still receives none
    t2 = torch.randn(2, 4, 4, 5, requires_grad=True)
    sum(f(s.detach(), t2, [_box([0, 0, 8, 8]), _box()], stride=4).values()).backward()
    assert t2.grad is None


def test_shape_checks():
    f = FGDLoss(2, 2)
    with pytest.raises(ValueError, match="teacher shape"):
        f(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4), [_box()], 1)
    with pytest.raises(ValueError, match="box tensors"):
        f(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3), [_box()], 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(2)
    f = FGDLoss(3, 4, gc_init="default", **UNIT)
    s, t = torch.randn(2, 3, 6, 5), torch.randn(2, 4, 6, 5)
    boxes = [_box([0, 0, 8, 12]), _box()]
    cpu = f(s, t, boxes, 4)
    fc = f.cuda()
    gpu = fc(s.cuda(), t.cuda(), [b.cuda() for b in boxes], 4)
    for key in cpu:
        assert gpu[key].is_cuda
        assert gpu[key].item() == pytest.approx(cpu[key].item(), rel=1e-4)
