"""HMKD's ``attention_window``: the matching over a window of cells around each inquiry, its keys, values
and student projection computed only for the windows' cells; and the Inquiry Head's width options."""

from __future__ import annotations

import pytest
import torch

from hmkd.distill import build_distiller
from hmkd.distill.losses import attention_weighted_mse
from hmkd.distill.matching.decoder import MatchingDecoder, Windowed, window_cells, window_cells_in_boxes
from hmkd.distill.matching.projection import StudentValueProjection
from hmkd.errors import ConfigError

# the decoder trained on jointly over the whole key map unless a test asks for a window
SMALL = {"hidden": 32, "heads": 4, "decoder_training": "joint", "attention_window": None}
SIZES = [(44, 64), (48, 60)]  # two images, padded to 48 x 64: a 12 x 16 map of stride 4
PADDED = (48, 64)
BOXES = [torch.tensor([[3.0, 4.0, 10.0, 12.0], [30.0, 20.0, 40.0, 33.0]]), torch.tensor([[50.0, 40.0, 58.0, 47.0]])]
LABELS = [torch.tensor([1, 2]), torch.tensor([3])]


def _decoder(position_code: str = "absolute") -> MatchingDecoder:
    torch.manual_seed(0)
    return MatchingDecoder(16, 3, hidden=32, heads=4, encoding="hmkd", position_code=position_code,
                           position_min_period=8.0 if position_code == "absolute" else None).eval()


def test_window_cells_by_hand() -> None:
    """A 3-cell window centred on the centre's cell; at the border and past the image's valid cells it is
    shifted inside; a window larger than the map is the map, its cells past the valid extent padded."""
    valid_hw = torch.tensor([[11, 16], [12, 15]])
    centres = torch.tensor([[[6.5, 8.0], [1.0, 1.0]], [[62.0, 46.0], [0.0, 0.0]]])  # (x, y) px, stride 4
    rows, cols, pad = window_cells(centres, (12, 16), 4.0, valid_hw, 3)
    assert rows[0, 0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3] and cols[0, 0].tolist() == [0, 1, 2] * 3
    assert rows[0, 1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and cols[0, 1].tolist() == [0, 1, 2] * 3  # top-left corner
    # image 1: centre cell (11, 15), but only 15 valid columns: the window ends at column 14
    assert rows[1, 0].tolist() == [9, 9, 9, 10, 10, 10, 11, 11, 11] and cols[1, 0].tolist() == [12, 13, 14] * 3
    assert not pad.any()
    rows, cols, pad = window_cells(centres, (12, 16), 4.0, valid_hw, 100)
    assert rows.shape[-1] == 12 * 16 and pad[0, 0].sum() == 16 and pad[1, 0].sum() == 12  # row 11 / column 15


def test_window_cells_in_boxes_by_hand() -> None:
    boxes = torch.tensor([[[4.0, 4.0, 12.0, 8.0]]])  # centres of cells x 1, 2 (6, 10 px), row 1 (6 px) inside
    rows = torch.tensor([[[0, 1, 1, 1, 2]]])
    cols = torch.tensor([[[1, 1, 2, 3, 2]]])
    assert window_cells_in_boxes(boxes, rows, cols, 4.0).tolist() == [[[False, True, True, False, False]]]
    tiny = torch.tensor([[[9.0, 9.0, 10.0, 10.0]]])  # smaller than a cell: the cell of its centre, (2, 2)
    assert window_cells_in_boxes(tiny, rows, cols, 4.0).tolist() == [[[False, False, False, False, True]]]


@pytest.mark.parametrize("position_code", ["absolute", "normalised"])
def test_a_window_as_large_as_the_map_is_the_full_attention(position_code) -> None:
    dec = _decoder(position_code)
    km = torch.randn(2, 16, 12, 16)
    m_full, values, _ = dec(BOXES, LABELS, SIZES, dec.keys_values([km], SIZES, PADDED))
    m_w, _, kv = dec.attention(BOXES, LABELS, SIZES, Windowed(km, PADDED, 100))
    u = kv.cells[kv.index] % (12 * 16)  # [B, N, K]: each window cell's position in the map
    back = torch.zeros_like(m_full).scatter_add_(3, u[:, None].expand_as(m_w), m_w)
    assert torch.allclose(back, m_full, atol=1e-6)
    assert torch.allclose(kv.values, values.permute(0, 2, 1, 3).reshape(-1, 4, 8)[kv.cells], atol=1e-6)


def test_a_small_window_attends_over_its_cells_only_and_sums_to_one() -> None:
    dec = _decoder()
    km = torch.randn(2, 16, 12, 16)
    m, valid, kv = dec.attention(BOXES, LABELS, SIZES, Windowed(km, PADDED, 3))
    assert m.shape == (2, 4, 2, 9) and valid.tolist() == [[True, True], [True, False]]
    assert torch.allclose(m.sum(-1), torch.ones(2, 4, 2), atol=1e-6)
    # only the distinct cells of the windows were projected: 3 windows of 9 cells, none shared here
    assert kv.cells.numel() == len(torch.unique(kv.cells[kv.index[valid]])) + 9  # + the padded row's window
    # the window's attention is the full attention's restricted to the window, renormalised
    m_full, _, _ = dec(BOXES, LABELS, SIZES, dec.keys_values([km], SIZES, PADDED))
    u = kv.cells[kv.index] % (12 * 16)
    part = m_full.gather(3, u[:, None].expand_as(m))
    assert torch.allclose(m[:, :, 0], (part / part.sum(-1, keepdim=True))[:, :, 0], atol=1e-5)


def test_windowed_attention_mse_by_hand() -> None:
    """Two distinct cells, one inquiry whose window reads cell 1 then cell 0 with attention (0.25, 0.75)."""
    vs = torch.tensor([[[1.0, -1.0]], [[2.0, 0.0]]])  # [M=2, h=1, c=2]; LN: (1, -1) and (1, -1)
    vt = torch.tensor([[[-1.0, 1.0]], [[0.0, 2.0]]])  # LN: (-1, 1) and (-1, 1): MSE_c = 4 at both
    vt[1] = torch.tensor([[3.0, 1.0]])  # cell 1 now agrees with the student: MSE_c = 0
    m = torch.tensor([[[[0.25, 0.75]]]])  # [B=1, h=1, N=1, K=2]
    index = torch.tensor([[[1, 0]]])
    valid = torch.tensor([[True]])
    got = attention_weighted_mse(m, vs, vt, valid, index=index)
    assert got.item() == pytest.approx(0.75 * 4.0 * (1 - 1e-5), rel=1e-4)  # LayerNorm's eps
    vs.requires_grad_(True)
    attention_weighted_mse(m, vs, vt, valid, index=index).backward()
    assert vs.grad[0].abs().sum() > 0 and vs.grad[1].abs().sum() == 0


def test_student_projection_of_flat_cells() -> None:
    torch.manual_seed(0)
    proj = StudentValueProjection(8, hidden=16, heads=4)
    x = torch.randn(2, 8, 3, 5)
    cells = torch.tensor([0, 7, 16, 29])  # image 0 cells 0, 7; image 1 cells 1, 14
    full = proj(x)  # [2, 4, 15, 4]
    got = proj(x, cells)
    want = torch.stack([full[0, :, 0], full[0, :, 7], full[1, :, 1], full[1, :, 14]])
    assert torch.allclose(got, want, atol=1e-6)


def _losses(make_pair, make_batch, **opts):
    student, teacher = make_pair()
    torch.manual_seed(0)
    d = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "inquiries": "all", **opts})
    d.train()
    torch.manual_seed(1)
    return d, d(*make_batch(), iteration=10**6)


def test_hmkd_with_a_map_sized_window_equals_the_full_map(make_pair, make_batch) -> None:
    _, full = _losses(make_pair, make_batch)
    _, win = _losses(make_pair, make_batch, attention_window=1000)
    assert set(full) == set(win)
    for k in full:
        assert torch.allclose(win[k], full[k], rtol=1e-4, atol=1e-6), k


def test_hmkd_window_terms_reach_exactly_their_parameters(make_pair, make_batch) -> None:
    """With a 3-cell window the attention term is another number, still trains the student-side
    projection, the keys' adapter and the student (never the decoder); the aux task trains the decoder."""
    d, win = _losses(make_pair, make_batch, attention_window=3)
    _, full = _losses(make_pair, make_batch)
    assert win["distill.small_attn_p2"].item() != pytest.approx(full["distill.small_attn_p2"].item(), rel=1e-4)
    assert 0.0 < win["metric.in_box_p2"].item() <= 1.0
    grads = lambda mod: [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in mod.parameters()]  # noqa: E731
    (win["aux.identification_p3"] + win["aux.localisation_p3"] + win["aux.attention_p3"]).backward(retain_graph=True)
    assert all(grads(d.decoders["P3"]))
    d.zero_grad(set_to_none=True)
    win["distill.small_attn_p2"].backward()
    assert all(grads(d.value_proj["P3"])) and all(grads(d.adapters["P2"]))
    assert not any(grads(d.decoders["P3"])) and not any(grads(d.adapters["P3"]))


def test_window_options_are_checked(make_pair) -> None:
    student, teacher = make_pair()
    with pytest.raises(ConfigError, match="attention_cells"):
        build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "attention_window": 5, "attention_cells": 8})
    with pytest.raises(ConfigError, match="attention_window"):
        build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "attention_window": 0})


def test_inquiry_head_width_and_depth(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("hmkd", student=student, teacher=teacher,
                        options={**SMALL, "inquiry_channels": 8, "inquiry_convs": 1})
    convs = [m for m in d.inquiry_heads["P3"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 8), (8, 1)]
    default = build_distiller("hmkd", student=student, teacher=teacher, options={"hidden": 32, "heads": 4})
    convs = [m for m in default.inquiry_heads["P3"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 64), (64, 1)]  # one 64-channel block
    full = build_distiller("hmkd", student=student, teacher=teacher,
                           options={**SMALL, "inquiry_convs": 2, "inquiry_channels": None})
    convs = [m for m in full.inquiry_heads["P3"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 32), (32, 32), (32, 1)]
    d.train()
    losses = d(*make_batch(), iteration=10**6)
    assert losses["distill.inquiry_p3"].item() > 0


def test_the_default_is_a_frozen_decoder_in_15_cell_windows(make_pair, make_batch) -> None:
    """HMKD's defaults: a fitted decoder kept frozen (no aux task, no decoder optimiser, no gradient into
    it), each inquiry attending over 15 x 15 cells of P2, the one-block 64-channel Inquiry Head."""
    student, teacher = make_pair()
    d = build_distiller("hmkd", student=student, teacher=teacher, options={"hidden": 32, "heads": 4})
    o = d.options
    assert (o.decoder_fit, o.decoder_training, o.attention_window, o.inquiry_convs, o.inquiry_channels) == (
        "auto", "frozen", 15, 1, 64)
    assert not any(p.requires_grad for p in d.decoders.parameters())
    assert all(name != "decoder" for name, _, _ in d.make_extra_optimizers())
    d.train()
    losses = d(*make_batch(), iteration=10**6)
    assert not any(k.startswith("aux.") for k in losses)
    assert {"distill.small_attn_p2", "distill.inquiry_p3", "distill.small_fg_p2", "metric.in_box_p2"} <= set(losses)
    losses["distill.small_attn_p2"].backward()
    assert all(p.grad is None for p in d.decoders.parameters())
    with pytest.raises(ConfigError, match="decoder_training"):
        build_distiller("hmkd", student=student, teacher=teacher, options={"decoder_fit": "none"})
