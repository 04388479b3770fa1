"""masked_feature_mse, attention_weighted_mse and StudentValueProjection against hand values."""

import pytest
import torch

from hmkd.distill.losses import attention_weighted_mse, masked_feature_mse
from hmkd.distill.matching.projection import StudentValueProjection


def _maps() -> tuple[torch.Tensor, ...]:
    # B=2, C=2, H=1, W=2; T = 0
    s = torch.tensor(
        [
            [[[1.0, 3.0]], [[0.0, 0.0]]],  # image 0: MSE_c per cell = (1+0)/2, (9+0)/2 = .5, 4.5
            [[[2.0, 0.0]], [[2.0, 0.0]]],  # image 1: (4+4)/2, 0 = 4, 0
        ],
        requires_grad=True,
    )
    t = torch.zeros(2, 2, 1, 2, requires_grad=True)
    m = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    k = torch.tensor([[[0.5, 1.0]], [[0.25, 0.25]]])
    return s, t, m, k


def test_masked_feature_mse_foreground_only() -> None:
    s, t, m, k = _maps()
    # image 0: 1*.5*.5 = .25; image 1: .25*4 + .25*0 = 1.0; batch mean .625
    loss = masked_feature_mse(s, t, m, k)
    assert torch.allclose(loss, torch.tensor(0.625))
    loss.backward()
    assert s.grad is not None and t.grad is None  # the teacher is a constant target


def test_masked_feature_mse_with_background() -> None:
    s, t, m, k = _maps()
    # image 0: .25 + .5 * (1 * 4.5) = 2.5; image 1: 1.0 + 0 = 1.0; mean 1.75
    assert torch.allclose(masked_feature_mse(s, t, m, k, bg_weight=0.5), torch.tensor(1.75))
    with pytest.raises(ValueError):
        masked_feature_mse(s, t, m[:, :, :1], k)


def _attention_case() -> tuple[torch.Tensor, ...]:
    # h=2 heads, U=2 positions, c=2. LayerNorm over 2 channels maps (a, b) to about
    # (sign(a-b), -sign(a-b)) and a constant pair to (0, 0).
    vs = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]]]])  # LN: (1,-1),(-1,1) | (-1,1),(0,0)
    vt = torch.tensor([[[[3.0, 1.0], [5.0, 2.0]], [[1.0, 0.0], [7.0, 7.0]]]])  # LN: (1,-1),(1,-1) | (1,-1),(0,0)
    # MSE_c per position: head 0 -> [0, 4]; head 1 -> [4, 0]
    m = torch.tensor(
        [[[[0.25, 0.75], [0.5, 0.5]], [[0.1, 0.9], [1.0, 0.0]]]]
    )  # [B=1, h=2, Nq=2, U=2]
    return vs, vt, m


def test_attention_weighted_mse_hand_values_and_detach() -> None:
    vs, vt, m = _attention_case()
    vs, vt, m = vs.clone().requires_grad_(True), vt.clone().requires_grad_(True), m.clone().requires_grad_(True)
    valid = torch.tensor([[True, False]])
    # inquiry 0: head 0 .75*4 = 3, head 1 .1*4 = .4 -> 3.4 / (h=2 * N_s=1) = 1.7
    loss = attention_weighted_mse(m, vs, vt, valid)
    assert torch.allclose(loss, torch.tensor(1.7), atol=1e-4)
    loss.backward()
    assert vs.grad is not None and vs.grad.abs().sum() > 0
    assert m.grad is None and vt.grad is None


def test_attention_weighted_mse_ns_normalisation_over_batch() -> None:
    vs, vt, m = _attention_case()
    vs2, vt2, m2 = torch.cat([vs, vs]), torch.cat([vt, vt]), torch.cat([m, m])
    valid = torch.tensor([[True, False], [True, True]])
    # image 0: 3.4 (inquiry 1 padded); image 1: 3.4 + (.5*4 + 1*4 = 6) -> 12.8 / (2 * 3)
    loss = attention_weighted_mse(m2, vs2, vt2, valid)
    assert torch.allclose(loss, torch.tensor(12.8 / 6), atol=1e-4)


def test_attention_weighted_mse_per_image_with_an_empty_image_vs_per_batch() -> None:
    vs, vt, m = _attention_case()
    # three images: image 0 as the case with both inquiries real (3.4 and 6 over the two heads),
    # image 1 with inquiry 0 only (3.4), image 2 without objects
    vs3, vt3, m3 = torch.cat([vs] * 3), torch.cat([vt] * 3), torch.cat([m] * 3)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    # per head (squared errors 4 up to LayerNorm's eps): image 0 head 0: .75*4 + .5*4 = 5,
    # head 1: .1*4 + 1*4 = 4.4; image 1: 3, .4
    # per image (PyTorch ICD): each head's sum / n_b, mean over B=3 images x 2 heads, the empty one 0
    want_image = ((5 / 2 + 4.4 / 2) + (3 / 1 + 0.4 / 1) + 0.0) / (3 * 2)
    loss = attention_weighted_mse(m3, vs3, vt3, valid, reduction="image")
    assert torch.allclose(loss, torch.tensor(want_image), atol=1e-4)
    # per batch (MegEngine ICD, HMKD's 1/(N_m N_s)): everything / (heads x 3 objects); the empty image is no matter
    want_batch = (5 + 4.4 + 3 + 0.4) / (2 * 3)
    assert torch.allclose(attention_weighted_mse(m3, vs3, vt3, valid, reduction="batch"), torch.tensor(want_batch), atol=1e-4)
    assert torch.allclose(attention_weighted_mse(m3[:2], vs3[:2], vt3[:2], valid[:2], reduction="batch"),
                          torch.tensor(want_batch), atol=1e-4)
    # per image without the empty image: mean over 2 images, so the empty one dilutes by 2/3
    two = attention_weighted_mse(m3[:2], vs3[:2], vt3[:2], valid[:2], reduction="image")
    assert torch.allclose(loss, two * 2 / 3, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        attention_weighted_mse(m3, vs3, vt3, valid, reduction="sum")


def test_attention_weighted_mse_no_inquiries_is_zero_with_graph() -> None:
    vs, vt, m = _attention_case()
    vs = vs.clone().requires_grad_(True)
    loss = attention_weighted_mse(m, vs, vt, torch.tensor([[False, False]]))
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(vs.grad, torch.zeros_like(vs))
    # zero inquiries at all (Nq = 0)
    loss = attention_weighted_mse(torch.zeros(1, 2, 0, 2), vs, vt, torch.zeros(1, 0, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_student_value_projection_shapes_and_values() -> None:
    proj = StudentValueProjection(3, hidden=8, heads=4)
    x = torch.randn(2, 3, 4, 5)
    out = proj(x)
    assert out.shape == (2, 4, 20, 2)
    # position 7 (row 1, col 2), head 3 = channels 6:8 of the linear map of that cell
    ref = proj.proj(x[:, :, 1, 2])[:, 6:8]
    assert torch.allclose(out[:, 3, 7], ref, atol=1e-6)
    both = proj([x, torch.randn(2, 3, 2, 3)])
    assert both.shape == (2, 4, 26, 2) and torch.allclose(both[:, :, :20], out)
    with pytest.raises(ValueError):
        StudentValueProjection(3, hidden=8, heads=3)
    # ICD's init: the value slice of a xavier-uniform in_proj [3 x hidden, C], bias 0
    icd = StudentValueProjection(64, hidden=32, heads=4, init="attention")
    assert icd.proj.weight.abs().max() <= (6 / (64 + 96)) ** 0.5 and torch.equal(icd.proj.bias, torch.zeros(32))
