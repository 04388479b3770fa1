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
    f = FGDLoss(2, 2, temperature=0.5, alpha=0.3, beta=0.7, gamma=0.0, lambda_=0.0, box_rule="overlap")
    out = f(s, t, [_box([0, 0, 2, 2])], stride=1)  # cells x 0..1, y 0..1: K = 1/4 ; N_bg = 5
    # per-pixel sum over channels of (T-S)^2: 2 everywhere, 4+1 = 5 at (0,0) and (2,2)
    assert out["fg"].item() == pytest.approx(0.3 * (5 + 2 + 2 + 2) / 4)
    assert out["bg"].item() == pytest.approx(0.7 * (2 + 2 + 2 + 2 + 5) / 5)
    assert set(out) == {"fg", "bg", "attention", "global"}
    # FGD's rule (the default): x, y floor(0)..ceil(2) inclusive = the whole 3x3 map, K = 1/9, no background
    fgd = FGDLoss(2, 2, temperature=0.5, alpha=0.3, beta=0.7, gamma=0.0, lambda_=0.0)(s, t, [_box([0, 0, 2, 2])], stride=1)
    assert fgd["fg"].item() == pytest.approx(0.3 * (5 + 7 * 2 + 5) / 9)
    assert fgd["bg"].item() == 0.0


def _worked_example_maps():
    """The fact sheet's example: 32x32 map (stride 8), unpadded 256x256, box (10, 10, 20, 30).

    T = 1 everywhere, S = 1 except 0 at (row 4, col 3) -- foreground under FGD's rule only (its
    columns 1..3, rows 1..4) -- and at (row 0, col 0), background under both rules."""
    t = torch.ones(1, 1, 32, 32)
    s = torch.ones(1, 1, 32, 32)
    s[0, 0, 4, 3] = 0.0
    s[0, 0, 0, 0] = 0.0
    return s, t, [_box([10, 10, 20, 30])]


def test_fgd_box_rule_worked_example_hand_value():
    s, t, boxes = _worked_example_maps()
    # uniform T: A_S^T = A_C^T = 1; (T - S)^2 = 1 on the two cells, 0 elsewhere
    f = FGDLoss(1, 1, alpha=0.3, beta=0.7, gamma=0.0, lambda_=0.0)
    out = f(s, t, boxes, stride=8, image_sizes=[(256, 256)])
    assert out["fg"].item() == pytest.approx(0.3 * 1 / 12)  # 4 x 3 cells at 1/12
    assert out["bg"].item() == pytest.approx(0.7 * 1 / 1012)  # 1024 - 12 background cells
    same = f(s, t, boxes, stride=8)  # no sizes: the map covers the image exactly (32 * 8 = 256)
    assert same["fg"].item() == out["fg"].item() and same["bg"].item() == out["bg"].item()
    # our rule: columns 1..2, rows 1..3 (6 cells at 1/6); (4, 3) is background, 1/1018 each
    ours = FGDLoss(1, 1, alpha=0.3, beta=0.7, gamma=0.0, lambda_=0.0, box_rule="overlap")(s, t, boxes, stride=8)
    assert ours["fg"].item() == 0.0
    assert ours["bg"].item() == pytest.approx(0.7 * 2 / 1018)


def test_fgd_box_rule_padded_batch_stretches_boxes_hand_value():
    # two images padded to 256 x 256 (32x32 at stride 8): image 0 is 256 x 256, image 1 is 256 high
    # and 200 wide. Image 1's box (100, 10, 150, 30): x 100/200*32 = 16 .. 150/200*32 = 24, y 1.25 .. 3.75
    # -> columns 16..24, rows 1..4 (36 cells, 1/36); not divided by the stride (that would be 12..19)
    t = torch.ones(2, 1, 32, 32)
    s = torch.ones(2, 1, 32, 32)
    s[1, 0, 1, 24] = 0.0  # the stretched box's last column: foreground
    s[1, 0, 1, 11] = 0.0  # left of it: background
    boxes = [_box(), _box([100, 10, 150, 30])]
    f = FGDLoss(1, 1, alpha=0.3, beta=0.7, gamma=0.0, lambda_=0.0)
    out = f(s, t, boxes, stride=8, image_sizes=[(256, 256), (256, 200)])
    assert out["fg"].item() == pytest.approx(0.3 * (1 / 36) / 2)  # / B = 2
    assert out["bg"].item() == pytest.approx(0.7 * (1 / (1024 - 36)) / 2)  # image 0 has no difference


def test_attention_and_weighted_focal_hand_value():
    ln9 = math.log(9.0)
    t = torch.zeros(1, 2, 3, 3)
    t[0, 0, 1, 1] = ln9
    s = torch.zeros(1, 2, 3, 3)
    f = FGDLoss(2, 2, temperature=0.5, box_rule="overlap", **UNIT)
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
    # FGD's rule: the box covers cells 1..2 x 1..2, so the centre's weight K is 1/4
    fgd = FGDLoss(2, 2, temperature=0.5, **UNIT)(s, t, [_box([1, 1, 2, 2])], stride=1)
    assert fgd["fg"].item() == pytest.approx(ln9**2 * 81 / 17 * ac0 / 4, rel=1e-5)


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
    boxes = [_box([0, 0, 3, 2], [0, 0, 1, 1])]
    # FGD's box rule (default): the big box spans x 0..3, y 0..2 (area 12, counted past the map) and
    # covers all 6 cells at 1/12; the small one x 0..1, y 0..1 (area 4): 4 cells at 1/4
    fg_max = FGDLoss(1, 1, **UNIT)(s, t, boxes, stride=1)["fg"].item()
    fg_min = FGDLoss(1, 1, overlap="min", **UNIT)(s, t, boxes, stride=1)["fg"].item()
    assert fg_max == pytest.approx(4 / 4 + 2 / 12)  # the small box's 1/4 wins where both cover
    assert fg_min == pytest.approx(6 / 12)
    # our box rule: the whole map (area 6) and cell (0,0) (area 1)
    fg_max = FGDLoss(1, 1, box_rule="overlap", **UNIT)(s, t, boxes, stride=1)["fg"].item()
    fg_min = FGDLoss(1, 1, overlap="min", box_rule="overlap", **UNIT)(s, t, boxes, stride=1)["fg"].item()
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
    with pytest.raises(ValueError, match="box_rule"):
        FGDLoss(2, 2, box_rule="centre")
    with pytest.raises(ValueError, match="image sizes"):
        f(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), [_box([0, 0, 1, 1])], 1, image_sizes=[(3, 3), (3, 3)])


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


# -- the distiller: FGD's defaults as its authors run it --------------------------------------------
def test_default_levels_are_fgd_configs_within_the_common_levels(make_pair):
    from hmkd.distill import build_distiller

    for detector, levels, expected in (
        ("faster_rcnn", None, ["P2", "P3", "P4", "P5"]),  # ours has P2-P6: FGD never distils the max-pooled P6
        ("retinanet", None, ["P3", "P4", "P5", "P6", "P7"]),
        ("fcos", ["P2", "P3", "P4", "P5", "P6"], ["P3", "P4", "P5", "P6"]),  # the synthetic bench's FCOS
    ):
        student, teacher = make_pair(detector, levels)
        d = build_distiller("fgd", student=student, teacher=teacher)
        assert d.levels == expected, detector
        assert list(d.losses) == expected
    d = build_distiller("fgd", student=student, teacher=teacher, options={"levels": ["P2"]})
    assert d.levels == ["P2"]  # an explicit choice is kept


def test_clip_and_init_defaults_are_fgds(shared_pair):
    from hmkd.distill import METHODS, build_distiller
    from hmkd.distill.base import Distiller

    student, teacher = shared_pair
    d = build_distiller("fgd", student=student, teacher=teacher)
    assert d.main_clip_grad == 35.0 and d.main_clip(10.0) == 35.0 and d.main_clip(None) == 35.0
    assert d.losses["P2"].box_rule == "fgd" and d.losses["P2"].overlap == "max"
    d = build_distiller("fgd", student=student, teacher=teacher, options={"clip_grad": None, "box_rule": "overlap"})
    assert d.main_clip(10.0) == 10.0 and d.main_clip(None) is None and d.losses["P2"].box_rule == "overlap"
    assert build_distiller("fgd", student=student, teacher=teacher, options={"clip_grad": 20}).main_clip(10.0) == 20.0
    assert Distiller.main_clip_grad is None
    assert build_distiller("fitnet", student=student, teacher=teacher).main_clip(10.0) == 10.0
    defaults = {name: cls.default_init_student for name, cls in METHODS.items() if name in
                ("none", "fitnet", "fgd", "icd", "hmkd")}
    assert defaults == {"none": "none", "fitnet": "none", "fgd": "neck_head", "icd": "neck_head", "hmkd": "none"}


def test_distiller_scales_boxes_by_the_unpadded_image_sizes(make_pair):
    from types import SimpleNamespace

    from hmkd.distill import build_distiller
    from hmkd.distill.base import DistillInputs

    student, teacher = make_pair("faster_rcnn")
    d = build_distiller("fgd", student=student, teacher=teacher, options={"levels": ["P3"], "alpha": 1.0,
                                                                          "beta": 0.0, "gamma": 0.0, "lambda_": 0.0})
    g = torch.Generator().manual_seed(0)
    s = {"P3": torch.randn(2, 32, 20, 20, generator=g)}  # a 160 x 160 padded batch at stride 8
    t = {"P3": torch.randn(2, 64, 20, 20, generator=g)}
    boxes = [_box([8, 8, 40, 40]), _box([80, 16, 120, 60])]
    sizes = [(160, 160), (160, 100)]  # image 1 is 100 px wide: its box is stretched by 1.6 in x
    inputs = DistillInputs(student=SimpleNamespace(features=s), teacher_features=t, boxes=boxes,
                           labels=[torch.ones(1), torch.ones(1)], small=[], image_sizes=sizes)
    got = d.distill_losses(inputs, 0)["distill.fgd_fg_p3"]
    loss = d.losses["P3"]
    assert got.item() == loss(s["P3"], t["P3"], boxes, 8, sizes)["fg"].item()
    assert got.item() != loss(s["P3"], t["P3"], boxes, 8)["fg"].item()  # the sizes matter
