"""Sine encodings and the matching decoder (shapes, softmax rows, permutation, padding, aux task)."""

import math

import pytest
import torch

from hmkd.distill.decoder import MatchingDecoder, split_heads
from hmkd.distill.positional import sine_box_encoding, sine_pos_embed_2d


def test_sine_box_encoding_known_values() -> None:
    enc = sine_box_encoding(torch.zeros(3, 4), 32)
    assert enc.shape == (3, 32)
    assert torch.equal(enc, torch.tensor([0.0, 1.0] * 16).expand(3, 32))  # sin 0, cos 0
    # 8 features per coordinate; first frequency is 1: feature 0 = sin(2*pi*v), 1 = cos(2*pi*v)
    enc = sine_box_encoding(torch.tensor([[0.25, 0.5, 0.0, 1.0]]), 32)
    assert torch.allclose(enc[0, [0, 1]], torch.tensor([1.0, 0.0]), atol=1e-6)  # cx = .25
    assert torch.allclose(enc[0, [8, 9]], torch.tensor([0.0, -1.0]), atol=1e-6)  # cy = .5
    assert torch.allclose(enc[0, [16, 17]], torch.tensor([0.0, 1.0]), atol=1e-6)  # w = 0
    assert torch.allclose(enc[0, [24, 25]], torch.tensor([0.0, 1.0]), atol=1e-5)  # h = 1
    # second frequency 10000^(2/8) = 10: sin(2*pi*.25/10)
    assert math.isclose(enc[0, 2].item(), math.sin(2 * math.pi * 0.25 / 10.0), rel_tol=1e-5)
    rnd = sine_box_encoding(torch.rand(50, 4), 64)
    assert rnd.abs().max() <= 1.0
    with pytest.raises(ValueError):
        sine_box_encoding(torch.zeros(1, 4), 12)


def test_sine_pos_embed_2d_known_values() -> None:
    pe = sine_pos_embed_2d(1, 2, 8)
    assert pe.shape == (2, 8)
    # x centres .25, .75 -> first pair (sin, cos)(2*pi*x); y centre .5 -> (0, -1)
    assert torch.allclose(pe[0, :2], torch.tensor([1.0, 0.0]), atol=1e-6)
    assert torch.allclose(pe[1, :2], torch.tensor([-1.0, 0.0]), atol=1e-6)
    assert torch.allclose(pe[:, 4:6], torch.tensor([[0.0, -1.0], [0.0, -1.0]]), atol=1e-6)
    pe = sine_pos_embed_2d(3, 5, 16, dtype=torch.float64)
    assert pe.shape == (15, 16) and pe.dtype == torch.float64 and pe.abs().max() <= 1.0
    # raster order: position 7 is row 1, col 2 -> same x part as position 2, same y part as 5
    assert torch.equal(pe[7, :8], pe[2, :8]) and torch.equal(pe[7, 8:], pe[5, 8:])


def _toy() -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    boxes = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 16.0, 30.0, 40.0]]),
        torch.zeros(0, 4),
        torch.tensor([[5.0, 5.0, 8.0, 9.0]]),
    ]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([3])]
    return boxes, labels, [(48, 48), (40, 48), (48, 32)]


def test_decoder_shapes_rows_and_padding() -> None:
    torch.manual_seed(0)
    dec = MatchingDecoder(8, 3, hidden=32, heads=4)
    boxes, labels, sizes = _toy()
    keys = [torch.randn(3, 8, 12, 12)]
    qmap = torch.randn(3, 8, 6, 6)
    queries, valid = dec.build_inquiries(boxes, labels, sizes, qmap, 8)
    assert queries.shape == (3, 2, 32)
    assert torch.equal(valid, torch.tensor([[True, True], [False, False], [True, False]]))
    m, values = dec.attend(queries, keys)
    assert m.shape == (3, 4, 2, 144) and values.shape == (3, 4, 144, 8)
    assert torch.allclose(m.sum(-1), torch.ones(3, 4, 2), atol=1e-5)
    # an image's inquiries do not depend on the other images of the batch
    q_alone, v_alone = dec.build_inquiries(boxes[2:], labels[2:], sizes[2:], qmap[2:], 8)
    assert torch.allclose(q_alone[0, 0], queries[2, 0], atol=1e-5) and v_alone.all()
    # ICD: several key maps concatenated along positions
    m2, values2 = dec.attend(queries, [keys[0], torch.randn(3, 8, 6, 6)])
    assert m2.shape == (3, 4, 2, 144 + 36) and values2.shape == (3, 4, 180, 8)
    # no objects at all
    q0, v0 = dec.build_inquiries([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2,
                                 [(48, 48)] * 2, qmap[:2], 8)
    assert q0.shape == (2, 0, 32) and v0.shape == (2, 0)
    assert dec.attend(q0, [keys[0][:2]])[0].shape == (2, 4, 0, 144)


def test_decoder_permutation_of_inquiries_permutes_rows() -> None:
    torch.manual_seed(1)
    dec = MatchingDecoder(8, 4, hidden=32, heads=2)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 16.0, 30.0, 40.0], [3.0, 30.0, 9.0, 44.0]])]
    labels = [torch.tensor([1, 2, 4])]
    keys, qmap = [torch.randn(1, 8, 12, 12)], torch.randn(1, 8, 6, 6)
    m, _, _ = dec(boxes, labels, [(48, 48)], keys, qmap, 8)
    perm = torch.tensor([2, 0, 1])
    mp, _, _ = dec([boxes[0][perm]], [labels[0][perm]], [(48, 48)], keys, qmap, 8)
    assert torch.allclose(mp, m[:, :, perm], atol=1e-6)


def test_query_feature_sampled_at_box_centre() -> None:
    dec = MatchingDecoder(16, 2, hidden=16, heads=2)
    with torch.no_grad():  # inquiry = sampled feature only
        for p in dec.inquiry_mlp.parameters():
            p.zero_()
        dec.query_feat_proj.weight.copy_(torch.eye(16))
        dec.query_feat_proj.bias.zero_()
    qmap = torch.arange(6.0).reshape(1, 1, 2, 3).expand(1, 16, 2, 3).contiguous()  # cell value y*3+x
    # stride 8: centre (12, 4) px = map coords (1.5, .5) = centre of cell (x=1, y=0) -> 1;
    # centre (8, 12) = (1.0, 1.5): halfway between cells (0,1)=3 and (1,1)=4 -> 3.5
    boxes = [torch.tensor([[10.0, 2.0, 14.0, 6.0], [6.0, 10.0, 10.0, 14.0]])]
    q, _ = dec.build_inquiries(boxes, [torch.tensor([1, 2])], [(16, 24)], qmap, 8)
    assert torch.allclose(q[0, :, 0], torch.tensor([1.0, 3.5]), atol=1e-5)
    with pytest.raises(ValueError):
        dec.build_inquiries(boxes, [torch.tensor([1, 2])], [(16, 24)], None, None)


def test_key_padding_mask() -> None:
    # image 0 is 16x24 (full), image 1 is 9x8: stride-8 cells valid where x*8 < 8, y*8 < 9
    mask = MatchingDecoder.key_padding_mask([(16, 24), (9, 8)], [(2, 3)], [8])
    assert torch.equal(mask[0], torch.zeros(6, dtype=torch.bool))
    assert torch.equal(mask[1], torch.tensor([False, True, True, False, True, True]))
    dec = MatchingDecoder(4, 1, hidden=16, heads=2, query_feature=False)
    m, _ = dec.attend(torch.randn(2, 1, 16), [torch.randn(2, 4, 2, 3)], mask)
    assert torch.equal(m[1, :, 0][:, mask[1]], torch.zeros(2, 4))
    assert torch.allclose(m.sum(-1), torch.ones(2, 2, 1), atol=1e-6)


def test_aux_loss_finite_and_gradients_only_to_decoder() -> None:
    torch.manual_seed(0)
    dec = MatchingDecoder(8, 3, hidden=32, heads=4, fakes_per_real=2)
    boxes, labels, sizes = _toy()
    keys = [torch.randn(3, 8, 12, 12), torch.randn(3, 8, 6, 6, requires_grad=True)]
    qmap = torch.randn(3, 8, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = dec.aux_loss(boxes, labels, sizes, keys, qmap, 8, generator=g)
    assert set(out) == {"identification", "localisation"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert out["localisation"] > 0  # real inquiries are jittered
    (out["identification"] + out["localisation"]).backward()
    assert not keys[0].requires_grad and keys[0].grad is None and not qmap.requires_grad
    assert keys[1].grad is None  # inputs are detached inside even when they require grad
    for name in ("class_embed.weight", "key_proj.weight", "value_proj.weight", "query_proj.weight",
                 "query_feat_proj.weight", "ident_head.0.weight", "loc_head.2.weight", "level_embed"):
        assert dec.get_parameter(name).grad is not None, name
    # same generator seed -> same losses
    out2 = dec.aux_loss(boxes, labels, sizes, keys, qmap, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["identification"], out2["identification"])


def test_aux_loss_no_objects_is_zero_with_graph() -> None:
    dec = MatchingDecoder(8, 3, hidden=16, heads=2)
    empty = [torch.zeros(0, 4)] * 2
    out = dec.aux_loss(empty, [torch.zeros(0, dtype=torch.long)] * 2, [(32, 32)] * 2,
                       [torch.randn(2, 8, 4, 4)], torch.randn(2, 8, 4, 4), 8)
    assert out["identification"].item() == 0.0 and out["localisation"].requires_grad
    out["identification"].backward()


def test_split_heads_and_value_heads() -> None:
    x = torch.arange(24.0).reshape(1, 3, 8)
    h = split_heads(x, 2)
    assert h.shape == (1, 2, 3, 4)
    assert torch.equal(h[0, 1, 2], torch.tensor([20.0, 21.0, 22.0, 23.0]))
    dec = MatchingDecoder(4, 1, hidden=16, heads=4, query_feature=False)
    assert dec.value_heads(torch.randn(2, 5, 16)).shape == (2, 4, 5, 4)


def test_decoder_bad_config() -> None:
    with pytest.raises(ValueError):
        MatchingDecoder(8, 3, hidden=24)
    with pytest.raises(ValueError):
        MatchingDecoder(8, 3, hidden=32, heads=3)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attend_values_with_wider_values_equals_explicit_softmax(with_mask: bool) -> None:
    # the aux task attends [values ; positions] (2c wide) with c-wide queries/keys: zero-padding
    # q and k (so a fused kernel applies) must give softmax(q k^T / sqrt(c)) v, gradients included
    from hmkd.distill.decoder import _attend_values

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 30, 16, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 30, dtype=torch.bool)
    keep[1, 20:] = False  # image 1's last 10 positions are padding
    mask = keep[:, None, None, :] if with_mask else None
    out = _attend_values(q, k, v, mask)
    logits = q @ k.transpose(-1, -2) / 8**0.5
    if with_mask:
        logits = logits.masked_fill(~mask, float("-inf"))
    ref = logits.softmax(-1) @ v
    assert out.shape == (2, 4, 5, 16)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
