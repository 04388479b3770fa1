"""The matching decoder's task: displaced fakes, the cells of a box, the attention supervision and
in-box share (hand values), the absolute position code, and which parameters each new term trains."""

import math

import pytest
import torch

from hmkd.distill.matching.decoder import MatchingDecoder
from hmkd.distill.matching.options import DecoderOptions
from hmkd.distill.matching.task import (
    attention_in_box_loss,
    attention_in_box_share,
    cells_in_boxes,
    fake_count,
    sample_inquiries,
)
from hmkd.distill.matching.positional import absolute_pos_embed, absolute_sine_code
from hmkd.errors import ConfigError


def _flat(boxes, labels, sizes):
    counts = [int(b.shape[0]) for b in boxes]
    img = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor(counts))
    return (torch.cat(boxes), torch.cat(labels), img,
            torch.tensor([[float(h), float(w)] for h, w in sizes]), counts)


def _sample(boxes, labels, sizes, **kw):
    gt, lab, img, sz, counts = _flat(boxes, labels, sizes)
    args = dict(num_classes=5, fakes_per_real=3, cap=300, jitter=0.0, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return sample_inquiries(gt, lab, img, sz, counts, **args)


# -- displaced fakes ------------------------------------------------------------------------------
def test_displaced_fakes_copy_a_real_object_and_sit_outside_it() -> None:
    boxes = [torch.tensor([[40.0, 40.0, 56.0, 48.0], [100.0, 20.0, 108.0, 36.0]])]
    labels = [torch.tensor([2, 4])]
    s = _sample(boxes, labels, [(160, 200)], fakes="displaced")
    real, disp = s["real"], s["displaced"]
    assert int(real.sum()) == 2 and int(disp.sum()) == 6 and not (real & disp).any()
    gt = boxes[0]
    for i in torch.nonzero(disp).flatten().tolist():
        # the source: the real object whose size, class and feature point the fake carries
        src = int(torch.nonzero((s["feature_centres"][i] == (gt[:, :2] + gt[:, 2:]) / 2).all(-1)).flatten()[0])
        b = s["boxes"][i]
        assert torch.allclose(b[2:] - b[:2], gt[src, 2:] - gt[src, :2])
        assert int(s["labels"][i]) == int(labels[0][src])
        # jitter 0: the centre is the displaced box's centre, outside the source box, inside the image
        c = s["centres"][i]
        assert torch.allclose(c, (b[:2] + b[2:]) / 2)
        inside = (gt[src, 0] <= c[0] <= gt[src, 2]) and (gt[src, 1] <= c[1] <= gt[src, 3])
        assert not inside
        assert 0 <= c[0] <= 200 and 0 <= c[1] <= 160
    # real inquiries read their feature where they point
    assert torch.equal(s["feature_centres"][real], s["centres"][real])


def test_displacement_is_reversed_at_the_border_and_clamped() -> None:
    # an object in the top-left corner: half the directions leave the image and are reversed
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    s = _sample(boxes, [torch.tensor([1])], [(400, 400)], fakes="displaced", fakes_per_real=200, displacement=(2.0, 2.0))
    c = s["centres"][s["displaced"]]
    assert (c >= 0).all() and (c <= 400).all()
    moved = (c - 5.0).norm(dim=-1) / 10.0  # r = 2 in units of the side (w = h = 10): distance 20 px from (5, 5)
    assert torch.allclose(moved, torch.full_like(moved, 2.0), atol=1e-4)


def test_mixed_fakes_split_half_and_half_and_empty_images_get_random_fakes() -> None:
    boxes = [torch.tensor([[10.0, 10.0, 20.0, 20.0]] * 2), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 1]), torch.zeros(0, dtype=torch.long)]
    s = _sample(boxes, labels, [(100, 100), (100, 100)], fakes="mixed")
    img, real, disp = s["img"], s["real"], s["displaced"]
    assert fake_count(2, 3, 300) == 6
    assert int((disp & (img == 0)).sum()) == 3 and int((~real & ~disp & (img == 0)).sum()) == 3
    assert int((img == 1).sum()) == 1 and not disp[img == 1].any()  # one random fake, no object to copy


def test_random_fakes_keep_icds_sampler() -> None:
    boxes = [torch.tensor([[10.0, 10.0, 20.0, 20.0]])]
    s = _sample(boxes, [torch.tensor([1])], [(100, 100)], fakes="random", jitter=0.3)
    assert not s["displaced"].any()
    assert torch.equal(s["feature_centres"], s["centres"])


def test_displaced_fakes_read_the_source_feature() -> None:
    # the query feature of a displaced fake equals the one of an inquiry at its source
    dec = MatchingDecoder(4, 3, hidden=16, heads=2, encoding="hmkd", query_feature=True, jitter=0.0,
                          fakes="displaced", fakes_per_real=1)
    qmap = torch.randn(1, 4, 8, 8)
    centres = torch.tensor([[10.0, 10.0], [30.0, 30.0]])
    wh = torch.tensor([[4.0, 4.0], [4.0, 4.0]])
    lab = torch.tensor([1, 1])
    img = torch.zeros(2, dtype=torch.long)
    sizes = torch.tensor([[32.0, 32.0]])
    a = dec._encode(centres, wh, lab, img, sizes, qmap, 4, feature_centres=centres[:1].expand(2, 2))
    b = dec._encode(centres, wh, lab, img, sizes, qmap, 4)
    assert not torch.allclose(a[1], b[1])
    c = dec._encode(centres[1:], wh[1:], lab[1:], img[1:], sizes, None if False else qmap, 4, feature_centres=centres[:1])
    assert torch.allclose(a[1], c[0], atol=1e-6)


# -- cells of a box, supervision, share -------------------------------------------------------------
def test_cells_in_boxes_by_hand() -> None:
    grid = [(4, 4, 8.0)]  # cell centres at 4, 12, 20, 28 px
    boxes = torch.tensor([[[8.0, 8.0, 24.0, 16.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    m = cells_in_boxes(boxes, grid).reshape(1, 3, 4, 4)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 1] = want[1, 2] = True  # centres x in [8, 24): 12, 20; y in [8, 16): 12
    assert torch.equal(m[0, 0], want)
    sub = torch.zeros(4, 4, dtype=torch.bool)
    sub[0, 0] = True  # a box smaller than a cell: the cell of its centre
    assert torch.equal(m[0, 1], sub)
    near = cells_in_boxes(boxes[:, :1], grid, margin=1.0).reshape(4, 4)
    want_near = torch.zeros(4, 4, dtype=torch.bool)
    want_near[0:3, 0:4] = True  # x in [0, 32), y in [0, 24)
    assert torch.equal(near, want_near)
    # two maps concatenate in order
    two = cells_in_boxes(boxes[:, :1], [(4, 4, 8.0), (2, 2, 16.0)])
    assert two.shape == (1, 1, 20) and torch.equal(two[0, 0, :16], want.flatten())
    # 16-px cells: (0, 0) has its centre (8, 8) in the box, (0, 1) holds the box's centre (16, 12)
    assert two[0, 0, 16:].tolist() == [True, True, False, False]


def test_attention_in_box_loss_by_hand() -> None:
    m = torch.tensor([[[[0.5, 0.25, 0.25, 0.0], [0.1, 0.1, 0.1, 0.7]]],
                      [[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]]])  # [B=2, heads=1, N=2, U=4]
    inside = torch.tensor([[[True, True, False, False], [False, False, False, True]],
                           [[False, False, True, False], [False, True, False, False]]])
    real = torch.tensor([[True, True], [True, False]])
    got = attention_in_box_loss(m, inside, real, eps=0.0)
    want = -(math.log(0.75) + math.log(0.7) + math.log(0.25)) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert attention_in_box_loss(m, inside, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_attention_in_box_share_by_hand() -> None:
    grid = [(1, 4, 8.0)]  # one row of 4 cells, centres x = 4, 12, 20, 28
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 8.0]]), torch.tensor([[16.0, 0.0, 32.0, 8.0], [24.0, 0.0, 32.0, 8.0]])]
    m = torch.tensor([[[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]]],
                      [[[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]]]])
    valid = torch.tensor([[True, False], [True, True]])
    got = attention_in_box_share(m, boxes, grid, valid)
    assert got.item() == pytest.approx((0.75 + 0.5 + 0.5) / 3)


# -- the absolute position code -------------------------------------------------------------------
def test_absolute_sine_code_values_and_peak() -> None:
    code = absolute_sine_code(torch.tensor([[0.0], [2.0]]), 8, min_period=8.0, max_period=64.0)
    assert code.shape == (2, 8)
    assert torch.allclose(code[0], torch.tensor([0.0, 1.0] * 4))
    # periods 8, 16, 32, 64: at 2 px the first argument is pi/2
    assert torch.allclose(code[1, :2], torch.tensor([1.0, 0.0]), atol=1e-6)
    assert code[1, 2].item() == pytest.approx(math.sin(math.pi / 4), abs=1e-6)
    xs = torch.arange(0, 200, dtype=torch.float32)[:, None]
    c = absolute_sine_code(xs, 64, min_period=8.0)
    sim = c @ c[100]
    assert int(sim.argmax()) == 100
    assert sim[104] < 0.8 * sim[100]  # a cell (4 px) away is told apart


def test_absolute_pos_embed_is_the_code_of_cell_centres() -> None:
    pe = absolute_pos_embed(2, (3, 5), 8.0, 16, min_period=16.0)
    assert pe.shape == (2, 15, 16)
    # raster index 8 = row 1, column 3: centre (x, y) = (28, 12) px
    want = absolute_sine_code(torch.tensor([12.0, 28.0]), 8, 16.0)
    assert torch.allclose(pe[0, 8], want) and torch.equal(pe[0], pe[1])


# -- the decoder with the new options --------------------------------------------------------------
def _decoder(**kw):
    torch.manual_seed(0)
    return MatchingDecoder(8, 3, hidden=16, heads=2, encoding="hmkd", query_feature=True, **kw)


def _batch():
    boxes = [torch.tensor([[8.0, 8.0, 20.0, 20.0], [30.0, 4.0, 40.0, 14.0]]), torch.tensor([[2.0, 30.0, 10.0, 40.0]])]
    labels = [torch.tensor([1, 2]), torch.tensor([3])]
    return boxes, labels, [(48, 48), (48, 40)]


def test_attention_supervision_trains_exactly_the_attention_path() -> None:
    dec = _decoder(position_code="absolute", position_min_period=8.0, attention_supervision=1.0, fakes="mixed")
    boxes, labels, sizes = _batch()
    keys, qmap = torch.randn(2, 8, 12, 12), torch.randn(2, 8, 6, 6)
    kv = dec.keys_values([keys], sizes, (48, 48))
    out = dec.aux_task(boxes, labels, sizes, kv, qmap, 8, generator=torch.Generator().manual_seed(0))
    assert set(out.losses) == {"identification", "localisation", "attention"}
    assert out.attention is not None and out.attention.shape[:2] == (2, 2)
    dec.zero_grad()
    out.losses["attention"].backward()
    got = {n for n, p in dec.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    attention_path = {"query_proj", "key_proj", "pos_proj", "inquiry_mlp", "class_embed", "query_feat_proj",
                      "query_pos_proj"}
    assert got and {n.split(".")[0] for n in got} <= attention_path
    assert {n.split(".")[0] for n in got} >= {"query_proj", "key_proj", "query_pos_proj"}


def test_attention_supervision_is_the_in_box_loss_of_the_real_inquiries() -> None:
    dec = _decoder(attention_supervision=2.0)
    boxes, labels, sizes = _batch()
    kv = dec.keys_values([torch.randn(2, 8, 12, 12)], sizes, (48, 48))
    out = dec.aux_task(boxes, labels, sizes, kv, torch.randn(2, 8, 6, 6), 8,
                       generator=torch.Generator().manual_seed(1), keep_attention=True)
    inside = cells_in_boxes(out.boxes, kv.grid)
    want = 2.0 * attention_in_box_loss(out.attention, inside, out.real)
    assert out.losses["attention"].item() == pytest.approx(want.item(), rel=1e-6)


def test_explicit_attention_gives_the_same_layer_output() -> None:
    dec = _decoder()
    boxes, labels, sizes = _batch()
    kv = dec.keys_values([torch.randn(2, 8, 12, 12)], sizes, (48, 48))
    q = torch.randn(2, 3, 16)
    assert torch.allclose(dec.layer(q, kv), dec.layer(q, kv, dec.attend(q, kv)), atol=1e-5)


def test_absolute_position_code_needs_a_period_and_changes_the_keys() -> None:
    with pytest.raises(ValueError, match="position_min_period"):
        MatchingDecoder(8, 3, hidden=16, heads=2, position_code="absolute")
    dec = _decoder(position_code="absolute", position_min_period=8.0)
    assert dec.query_pos_proj is not None
    _, _, sizes = _batch()
    kv = dec.keys_values([torch.zeros(2, 8, 12, 12)], sizes, (48, 48))
    # constant content: keys differ only by position, and the two images' valid cells share codes
    assert not torch.allclose(kv.keys[0, :, 0], kv.keys[0, :, 1])
    assert torch.allclose(kv.keys[0, :, 5], kv.keys[1, :, 5])
    assert kv.grid == ((12, 12, 4.0),)


@pytest.mark.parametrize(
    "opts, match",
    [({"fakes": "shifted"}, "fakes"), ({"displacement": [2.0, 1.0]}, "displacement"),
     ({"position_code": "learned"}, "position_code"), ({"attention_supervision": -1.0}, "attention_supervision"),
     ({"decoder_training": "frozen"}, "decoder_training"), ({"fit_iters": 0}, "fit_iters")],
)
def test_decoder_options_refuse_bad_values(opts, match) -> None:
    with pytest.raises(ConfigError, match=f"distill.options.{match}"):
        DecoderOptions(**opts).check()
