"""The matching decoder: encodings, the decoder layer, padding mask and position embedding, the
inquiry sampler, the auxiliary task's losses (hand values), its optimiser and schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from hmkd.distill.matching.decoder import KeyValues, MatchingDecoder, scale_indicator, split_heads
from hmkd.distill.matching.optim import decoder_optimizers, decoder_schedulers
from hmkd.distill.matching.options import DecoderOptions
from hmkd.distill.matching.positional import sine_box_encoding, sine_split_encoding, valid_cells, valid_extent_pos_embed
from hmkd.distill.matching.task import fake_count


# -- encodings ------------------------------------------------------------------------------------
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
    with pytest.raises(ValueError):
        sine_box_encoding(torch.zeros(1, 4), 12)


def test_sine_split_encoding_is_sines_then_cosines_per_coordinate() -> None:
    # ICD's get_pos_embeddings: per coordinate dim/2 sines then dim/2 cosines of 2 pi v / T^(2k/dim)
    enc = sine_split_encoding(torch.tensor([[0.25, 0.5]]), 8)
    assert enc.shape == (1, 16)
    v, freqs = (0.25, 0.5), [10000 ** (2 * k / 8) for k in range(4)]
    want = []
    for x in v:
        want += [math.sin(2 * math.pi * x / f) for f in freqs] + [math.cos(2 * math.pi * x / f) for f in freqs]
    assert torch.allclose(enc[0], torch.tensor(want), atol=1e-6)


def test_scale_indicator_bins() -> None:
    # bin = clamp(floor(ln(side) * 1.44 - 5), 0, 4): 10 px -> 0, 100 -> 1, 200 -> 2, 300 -> 3, 1000 -> 4
    ind = scale_indicator(torch.tensor([[10.0, 100.0], [200.0, 300.0], [1000.0, 0.0]]))
    assert ind.shape == (3, 10)
    assert ind.argmax(-1).tolist() == [0, 2, 4]  # the width's bin, one-hot in the first five
    assert ind[:, 5:].argmax(-1).tolist() == [1, 3, 0]  # the height's in the last five (0 px: bin 0)
    assert torch.equal(ind.sum(-1), torch.full((3,), 2.0))


# -- padding mask and position embedding ------------------------------------------------------------
def test_valid_cells_use_the_estimated_stride() -> None:
    # 32x48 batch, a 4x6 map (stride 8): image 1 (16x20) keeps rows < 2, columns < ceil(20/8) = 3
    v = valid_cells([(32, 48), (16, 20)], (4, 6), (32, 48))
    assert v[0].all() and v.shape == (2, 4, 6)
    assert v[1].nonzero().amax(0).tolist() == [1, 2] and int(v[1].sum()) == 6
    # a coarse map (like P6): padded 40x40, map 3x3, stride (40/3 + 40/3)/2 = 13.33; image 20x40:
    # rows < ceil(20/13.33) = 2, columns < ceil(40/13.33) = 3
    v = valid_cells([(20, 40)], (3, 3), (40, 40))
    assert v[0].sum(1).tolist() == [3, 3, 0]


def test_valid_extent_pos_embed_on_a_padded_batch() -> None:
    valid = valid_cells([(32, 48), (16, 24)], (4, 6), (32, 48))
    pe = valid_extent_pos_embed(valid, 8)  # 4 features for y (first), then 4 for x
    assert pe.shape == (2, 24, 8)

    def at(b: int, r: int, c: int) -> torch.Tensor:
        return pe[b, r * 6 + c]

    # cell i of n valid ones is at (i + 1) / n; first pair = (sin, cos)(2 pi v)
    for b, r, c, y, x in ((0, 1, 2, 2 / 4, 3 / 6), (1, 1, 2, 2 / 2, 3 / 3), (1, 0, 0, 1 / 2, 1 / 3)):
        got = at(b, r, c)
        assert torch.allclose(got[:2], torch.tensor([math.sin(2 * math.pi * y), math.cos(2 * math.pi * y)]), atol=1e-4)
        assert torch.allclose(got[4:6], torch.tensor([math.sin(2 * math.pi * x), math.cos(2 * math.pi * x)]), atol=1e-4)
        # second frequency 10000^(2/4) = 100
        assert math.isclose(got[2].item(), math.sin(2 * math.pi * y / 100), abs_tol=1e-5)
    # the same relative position gets the same embedding in both images (not the same cell)
    assert torch.allclose(at(0, 3, 5), at(1, 1, 2), atol=1e-5)


def test_key_padding_mask_excludes_padding_from_the_attention() -> None:
    torch.manual_seed(0)
    dec = MatchingDecoder(4, 2, hidden=16, heads=2)
    maps = [torch.randn(2, 4, 4, 6), torch.randn(2, 4, 2, 3)]
    kv = dec.keys_values(maps, [(32, 48), (16, 24)], (32, 48))
    want = torch.cat([~valid_cells([(32, 48), (16, 24)], m.shape[-2:], (32, 48)).flatten(1) for m in maps], 1)
    assert torch.equal(kv.pad, want) and int(kv.pad[1].sum()) == 18 + 4 and not kv.pad[0].any()
    assert kv.keys.shape == kv.values.shape == (2, 2, 30, 8)
    m = dec.attend(torch.randn(2, 3, 16), kv)
    assert m.shape == (2, 2, 3, 30)
    assert torch.equal(m[1][:, :, kv.pad[1]], torch.zeros(2, 3, 22))
    assert torch.allclose(m.sum(-1), torch.ones(2, 2, 3), atol=1e-6)
    # the padded content does not matter to image 1's keys/values at its valid cells, nor to its attention
    maps2 = [mp.clone() for mp in maps]
    maps2[0][1, :, 2:, :] = 100.0
    kv2 = dec.keys_values(maps2, [(32, 48), (16, 24)], (32, 48))
    q = torch.randn(2, 3, 16)
    assert torch.allclose(dec.attend(q, kv2)[1], dec.attend(q, kv)[1], atol=1e-6)
    # without the mask every cell is a position, normalised over the whole padded map
    off = MatchingDecoder(4, 2, hidden=16, heads=2, padding_mask=False)
    kv_off = off.keys_values(maps)
    assert kv_off.pad is None and (off.attend(q, kv_off)[1] > 0).all()
    with pytest.raises(ValueError, match="padding_mask needs image_sizes"):
        dec.keys_values(maps)


# -- the decoder layer --------------------------------------------------------------------------------
def _kv(dec: MatchingDecoder, b: int = 2, seed: int = 0) -> KeyValues:
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, dec.in_channels, 3, 4, generator=g)]
    return dec.keys_values(maps, [(24, 32)] * b, (24, 32))


def test_decoder_layer_shapes_and_residual_path() -> None:
    torch.manual_seed(0)
    dec = MatchingDecoder(8, 3, hidden=32, heads=4)
    kv = _kv(dec)
    q = torch.randn(2, 5, 32)
    z = dec.layer(q, kv)
    assert z.shape == (2, 5, 32)
    with torch.no_grad():  # attention and FFN zeroed: the output is LN(LN(b)) = LN(b)
        for p in (*dec.out_proj.parameters(), *dec.ffn_out.parameters()):
            p.zero_()
    assert torch.allclose(dec.layer(q, kv), F.layer_norm(q, (32,)), atol=1e-4)
    with torch.no_grad():  # out projection = identity, FFN still 0: LN(b + sum_j m_ij O_j)
        dec.out_proj.weight.copy_(torch.eye(32))
    m = dec.attend(q, kv)
    att = torch.matmul(m, kv.values).transpose(1, 2).flatten(2)
    assert torch.allclose(dec.layer(q, kv), F.layer_norm(F.layer_norm(q + att, (32,)), (32,)), atol=1e-5)
    # inquiries do not attend to each other: an inquiry's output is the same alone
    assert torch.allclose(dec.layer(q[:, 2:3], kv), dec.layer(q, kv)[:, 2:3], atol=1e-6)


def test_decoder_init_and_parameters() -> None:
    dec = MatchingDecoder(64, 3, hidden=32, heads=4)
    for lin in (dec.query_proj, dec.key_proj, dec.value_proj):  # slices of one xavier in_proj [96, in]
        bound = math.sqrt(6 / (lin.in_features + 96))
        assert lin.weight.abs().max() <= bound and torch.equal(lin.bias, torch.zeros(32))
    assert torch.equal(dec.out_proj.bias, torch.zeros(32))
    assert dec.ffn_in.out_features == 128 and len([m for m in dec.predictor if isinstance(m, torch.nn.Linear)]) == 3
    assert len([m for m in dec.inquiry_mlp if isinstance(m, torch.nn.Linear)]) == 3
    assert dec.inquiry_mlp[0].in_features == 3 + 32 + 10  # one-hot K + sine (hidden/2 per coordinate) + scale
    assert not any("level" in n for n, _ in dec.named_parameters())  # no level embedding
    hm = MatchingDecoder(64, 3, hidden=32, heads=4, encoding="hmkd", query_feature=True)
    assert hm.class_embed.weight.shape == (4, 16) and hm.query_feat_proj is not None


@pytest.mark.parametrize("encoding", ["icd", "hmkd"])
def test_inquiries_shapes_padding_and_independence(encoding: str) -> None:
    torch.manual_seed(0)
    dec = MatchingDecoder(8, 3, hidden=32, heads=4, encoding=encoding, query_feature=encoding == "hmkd")
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 16.0, 30.0, 40.0]]), torch.zeros(0, 4),
             torch.tensor([[5.0, 5.0, 8.0, 9.0]])]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([3])]
    sizes = [(48, 48), (40, 48), (48, 32)]
    qmap = torch.randn(3, 8, 6, 6)
    queries, valid = dec.build_inquiries(boxes, labels, sizes, qmap, 8)
    assert queries.shape == (3, 2, 32)
    assert torch.equal(valid, torch.tensor([[True, True], [False, False], [True, False]]))
    q_alone, _ = dec.build_inquiries(boxes[2:], labels[2:], sizes[2:], qmap[2:], 8)
    assert torch.allclose(q_alone[0, 0], queries[2, 0], atol=1e-5)
    kv = dec.keys_values([torch.randn(3, 8, 6, 6)], sizes, (48, 48))
    m, values, v = dec(boxes, labels, sizes, kv, qmap, 8)
    assert m.shape == (3, 4, 2, 36) and values.shape == (3, 4, 36, 8) and torch.equal(v, valid)
    perm = torch.tensor([1, 0])
    mp, _, _ = dec([boxes[0][perm]], [labels[0][perm]], sizes[:1], KeyValues(kv.keys[:1], kv.values[:1], kv.pad[:1]),
                   qmap[:1], 8)
    assert torch.allclose(mp[0], m[0][:, perm], atol=1e-6)


def test_query_feature_sampled_at_box_centre() -> None:
    dec = MatchingDecoder(16, 2, hidden=16, heads=2, encoding="hmkd", query_feature=True)
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


# -- the inquiry sampler ------------------------------------------------------------------------------
def test_fake_count_rule_and_cap() -> None:
    assert fake_count(0, 5, 300) == 1  # an image without objects gets one fake
    assert fake_count(3, 5, 300) == 15
    assert fake_count(60, 5, 300) == 240  # real + fake capped at 300
    assert fake_count(20, 5, 100) == 80
    assert fake_count(100, 5, 100) == 0 and fake_count(150, 5, 100) == 0  # never below the objects
    assert fake_count(4, 0, 300) == 0 and fake_count(0, 0, 300) == 1


def test_sample_inquiries_counts_order_and_fake_boxes() -> None:
    dec = MatchingDecoder(8, 4, hidden=16, heads=2, max_inquiries=12, jitter=0.0)
    gt = [torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4),
          torch.rand(3, 2).mul(50).repeat(1, 2) + torch.tensor([0.0, 0.0, 5.0, 5.0])]
    labels = [torch.tensor([1, 4]), torch.zeros(0, dtype=torch.long), torch.tensor([2, 2, 3])]
    sizes = [(100, 200), (60, 80), (100, 100)]
    s = dec.sample_inquiries(gt, labels, sizes, torch.Generator().manual_seed(0))
    img, real = s["img"], s["real"]
    # counts: 2 real + 10 fakes (cap 12), 0 + 1, 3 + 9 (cap 12)
    assert [int((img == b).sum()) for b in range(3)] == [12, 1, 12]
    assert [int((real & (img == b)).sum()) for b in range(3)] == [2, 0, 3]
    # each image's objects come first, in order, with their own boxes, labels and (jitter 0) centres
    assert torch.equal(s["boxes"][:2], gt[0]) and torch.equal(s["labels"][:2], labels[0])
    assert torch.allclose(s["centres"][:2], torch.tensor([[30.0, 50.0], [2.0, 2.0]]))
    fake = ~real
    fb, fl = s["boxes"][fake], s["labels"][fake]
    wh = s["sizes"][s["img"][fake]].flip(-1)
    assert fl.min() >= 1 and fl.max() <= 4
    assert (fb[:, :2] >= 0).all() and (fb[:, 2:] <= wh.repeat(1, 2)[:, 2:] + 1e-4).all()  # clamped to the image
    side = (fb[:, 2:] - fb[:, :2]) / wh
    assert (side <= 0.6 + 1e-5).all() and (side > 0).all()  # N(0.2, 0.2) clipped to [0.002, 0.6]


def test_fake_sizes_and_centres_follow_icds_non_coco_prior() -> None:
    dec = MatchingDecoder(8, 4, hidden=16, heads=2, jitter=0.0)
    boxes = [torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 50)] * 4  # 4 x 250 fakes (cap 300)
    s = dec.sample_inquiries(boxes, [torch.ones(50, dtype=torch.long)] * 4, [(1000, 1000)] * 4,
                             torch.Generator().manual_seed(1))
    fb = s["boxes"][~s["real"]] / 1000
    ctr = s["centres"][~s["real"]] / 1000
    assert fb.shape[0] == 1000
    inside = ((fb[:, 2:] + fb[:, :2]) / 2 - ctr).abs().max(-1).values < 1e-6  # jitter 0: centre of the box
    assert ((ctr >= 0.03 - 1e-6) & (ctr <= 0.97 + 1e-6))[inside].all()
    # boxes centred in [.3, .7] are never clamped (sides <= .6): their sides are the prior's draws,
    # clip(N(.2, .2), .002, .6): mean ~.215, 16% at .002, 2.3% at .6
    central = ((ctr > 0.3) & (ctr < 0.7)).all(-1)
    side = (fb[:, 2:] - fb[:, :2])[central].flatten()
    assert side.numel() > 200
    assert 0.19 < side.mean().item() < 0.24
    assert 0.10 < (side < 0.0021).float().mean().item() < 0.22
    assert side.max() <= 0.6 + 1e-6 and side.min() >= 0.002 - 1e-6


# -- the auxiliary task -------------------------------------------------------------------------------
def _constant_predictor(dec: MatchingDecoder, logit: float, loc: float) -> None:
    with torch.no_grad():
        last = dec.predictor[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([logit] + [loc] * 4))


def test_localisation_target_on_a_hand_made_box() -> None:
    dec = MatchingDecoder(8, 2, hidden=16, heads=2, fakes_per_real=0, jitter=0.0)
    _constant_predictor(dec, 0.0, 0.0)  # logit 0, every side predicted sigmoid(0) = .5
    boxes, labels, sizes = [torch.tensor([[10.0, 20.0, 50.0, 80.0]])], [torch.tensor([1])], [(100, 100)]
    kv = dec.keys_values([torch.randn(1, 8, 4, 4)], sizes, (100, 100))
    out = dec.aux_task(boxes, labels, sizes, kv)
    # centre (30, 50): l = t... = (.2, .3, .2, .3) of the image; box w .4, h .6
    want = abs(0.5 - 0.2) / 0.4 + abs(0.5 - 0.3) / 0.6 + abs(0.5 - 0.2) / 0.4 + abs(0.5 - 0.3) / 0.6
    assert math.isclose(out.losses["localisation"].item(), want, rel_tol=1e-5)
    assert math.isclose(out.losses["identification"].item(), math.log(2), rel_tol=1e-5)  # BCE(0, real)
    assert out.real.tolist() == [[True]] and out.valid.tolist() == [[True]]
    # a second image without objects: one fake (target 0) joins the BCE mean; localisation unchanged
    _constant_predictor(dec, 2.0, 0.0)
    out = dec.aux_task(boxes + [torch.zeros(0, 4)], labels + [torch.zeros(0, dtype=torch.long)], sizes * 2,
                       dec.keys_values([torch.randn(2, 8, 4, 4)], sizes * 2, (100, 100)))
    bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2
    assert math.isclose(out.losses["identification"].item(), bce, rel_tol=1e-5)
    assert math.isclose(out.losses["localisation"].item(), want, rel_tol=1e-5)
    assert out.real.tolist() == [[True], [False]] and out.valid.tolist() == [[True], [True]]


def test_localisation_target_is_measured_from_the_jittered_centre() -> None:
    dec = MatchingDecoder(8, 2, hidden=16, heads=2, fakes_per_real=0, jitter=0.3)
    _constant_predictor(dec, 0.0, 0.0)
    boxes, labels, sizes = [torch.tensor([[10.0, 20.0, 50.0, 80.0]])], [torch.tensor([1])], [(100, 200)]
    kv = dec.keys_values([torch.randn(1, 8, 4, 4)], sizes, (100, 200))
    s = dec.sample_inquiries(boxes, labels, sizes, torch.Generator().manual_seed(3))
    cx, cy = s["centres"][0].tolist()
    assert 30 - 12 <= cx <= 30 + 12 and 50 - 18 <= cy <= 50 + 18 and (cx, cy) != (30.0, 50.0)  # +- .3 (w, h)
    l, t, r, b = (cx - 10) / 200, (cy - 20) / 100, (50 - cx) / 200, (80 - cy) / 100
    want = abs(0.5 - l) / 0.2 + abs(0.5 - t) / 0.6 + abs(0.5 - r) / 0.2 + abs(0.5 - b) / 0.6
    out = dec.aux_task(boxes, labels, sizes, kv, generator=torch.Generator().manual_seed(3))
    assert math.isclose(out.losses["localisation"].item(), want, rel_tol=1e-5)


def test_aux_task_gradients_reach_exactly_the_decoder() -> None:
    torch.manual_seed(0)
    dec = MatchingDecoder(8, 3, hidden=32, heads=4, fakes_per_real=2)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 16.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)]
    sizes = [(48, 48), (40, 48)]
    maps = [torch.randn(2, 8, 12, 12, requires_grad=True), torch.randn(2, 8, 6, 6, requires_grad=True)]
    kv = dec.keys_values(maps, sizes, (48, 48))
    out = dec.aux_task(boxes, labels, sizes, kv, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values())
    assert out.real.sum() == 2 and out.valid.sum() == 2 + 4 + 1
    (out.losses["identification"] + out.losses["localisation"]).backward()
    assert all(m.grad is None for m in maps)  # inputs are detached inside
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    # the real inquiries come first: real_queries() are exactly their rows
    q, real = out.real_queries()
    assert q.shape == (2, 2, 32) and real.tolist() == [[True, True], [False, False]]
    # same generator seed -> same losses
    again = dec.aux_task(boxes, labels, sizes, kv, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.losses["identification"], out.losses["identification"])


def test_split_heads() -> None:
    x = torch.arange(24.0).reshape(1, 3, 8)
    h = split_heads(x, 2)
    assert h.shape == (1, 2, 3, 4)
    assert torch.equal(h[0, 1, 2], torch.tensor([20.0, 21.0, 22.0, 23.0]))


def test_decoder_bad_config() -> None:
    with pytest.raises(ValueError):
        MatchingDecoder(8, 3, hidden=24)
    with pytest.raises(ValueError):
        MatchingDecoder(8, 3, hidden=32, heads=3)
    with pytest.raises(ValueError):
        MatchingDecoder(8, 3, hidden=32, encoding="detr")


# -- the decoder's optimiser and schedule -------------------------------------------------------------
def test_decoder_optimiser_cosine_schedule_and_joint_clip() -> None:
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    o = DecoderOptions(decoder_clip=0.01, decoder_schedule="cosine")
    opts = decoder_optimizers({"decoder": [a, b]}, o)
    assert len(opts) == 1
    name, opt, clip = opts[0]
    assert name == "decoder" and clip == 0.01 and isinstance(opt, torch.optim.AdamW)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in [*a.parameters(), *b.parameters()]}
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 1e-4
    (sched_name, sched), = decoder_schedulers(opts, o, 8)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [1e-4 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(9)]
    assert sched_name == "decoder" and lrs == pytest.approx(want, abs=1e-12) and lrs[-1] == pytest.approx(0.0, abs=1e-20)
    (_, const), = decoder_schedulers(decoder_optimizers({"d": a}, DecoderOptions()), DecoderOptions(), 8)
    for _ in range(5):
        const.optimizer.step()
        const.step()
    assert const.get_last_lr() == [1e-4]
