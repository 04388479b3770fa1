"""Hand-computed checks of hmkd.distill.masks (projection, M and K)."""

from __future__ import annotations

import math

import pytest
import torch

from hmkd.distill.masks import box_mask, fg_bg_masks, fgd_box_cells, pad_boxes, pad_by_image, project_boxes

H, W = 4, 6  # non-square on purpose: a H/W swap changes shapes and values


def _b(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _slow_reference(boxes, feat_hw, stride, pick=min):
    """Cell-by-cell loop over the documented rule, independent of the vectorised code."""
    h, w = feat_hw
    ms, ks = [], []
    for bx in boxes:
        m = torch.zeros(h, w)
        k = torch.full((h, w), math.nan)
        for x1, y1, x2, y2 in bx.tolist():
            def rng(a, b, size):
                if b - a < stride:
                    c = math.floor((a + b) / 2 / stride)
                    lo = hi = c
                else:
                    lo, hi = math.floor(a / stride), math.ceil(b / stride) - 1
                return min(max(lo, 0), size - 1), min(max(hi, 0), size - 1)

            cx0, cx1 = rng(x1, x2, w)
            cy0, cy1 = rng(y1, y2, h)
            area = (cx1 - cx0 + 1) * (cy1 - cy0 + 1)
            for yy in range(cy0, cy1 + 1):
                for xx in range(cx0, cx1 + 1):
                    m[yy, xx] = 1.0
                    old = k[yy, xx].item()
                    k[yy, xx] = 1.0 / area if math.isnan(old) else pick(old, 1.0 / area)
        n_bg = int((m == 0).sum())
        k[m == 0] = 1.0 / n_bg if n_bg else 0.0
        ms.append(m)
        ks.append(k)
    return torch.stack(ms), torch.stack(ks)


def _check_k_bg(m, k, expected):
    bg = m == 0
    if bg.any():
        assert torch.allclose(k[bg], torch.full_like(k[bg], expected))


def test_pad_boxes_counts_and_order():
    boxes = [_b([1, 2, 3, 4]), _b(), _b([5, 6, 7, 8], [9, 10, 11, 12])]
    padded, valid = pad_boxes(boxes)
    assert padded.shape == (3, 2, 4) and valid.shape == (3, 2)
    assert valid.tolist() == [[True, False], [False, False], [True, True]]
    assert padded[0, 0].tolist() == [1, 2, 3, 4]
    assert padded[2].tolist() == [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert padded[1].abs().sum() == 0
    p0, v0 = pad_boxes([_b(), _b()])
    assert p0.shape == (2, 0, 4) and v0.shape == (2, 0)
    pi, _ = pad_boxes([torch.tensor([[0, 0, 8, 8]])])  # integer boxes become float
    assert pi.is_floating_point()


def test_pad_by_image_keeps_order_within_each_image():
    # rows of images 2, 0, 2, 0, 2 (unsorted, as the decoder's real + fake inquiries come), 2 values each
    values = torch.tensor([[20, 21], [0, 1], [22, 23], [2, 3], [24, 25]])
    img = torch.tensor([2, 0, 2, 0, 2])
    out, valid = pad_by_image(values, img, 4)
    assert out.shape == (4, 3, 2) and out.dtype == values.dtype
    assert out[0].tolist() == [[0, 1], [2, 3], [0, 0]]
    assert out[2].tolist() == [[20, 21], [22, 23], [24, 25]]
    assert valid.tolist() == [[True, True, False], [False] * 3, [True] * 3, [False] * 3]
    e, ev = pad_by_image(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 2)
    assert e.shape == (2, 0, 5) and ev.shape == (2, 0)


def test_project_boxes_rules():
    boxes = torch.tensor([[[8.0, 0.0, 24.0, 16.0],  # overlapped cells: x 1..2, y 0..1
                           [10.0, 10.0, 14.0, 13.0],  # smaller than a cell: centre (12, 11.5) -> (1, 1)
                           [6.0, 6.0, 10.0, 10.0],  # straddles 4 cells but small: centre (8, 8) -> (1, 1)
                           [40.0, 24.0, 60.0, 40.0],  # past the bottom-right border -> clamped (5, 3)
                           [-10.0, -10.0, 8.0, 8.0],  # past the top-left border -> (0, 0)
                           [9.0, 1.0, 17.0, 40.0]]])  # x: 8 px exactly -> 1..2; y: 0..4 -> clamp 0..3
    cells = project_boxes(boxes, 8, (H, W))
    assert cells.dtype == torch.long
    assert cells[0].tolist() == [[1, 0, 2, 1], [1, 1, 1, 1], [1, 1, 1, 1], [5, 3, 5, 3], [0, 0, 0, 0],
                                 [1, 0, 2, 3]]


def test_single_box():
    m, k = fg_bg_masks([_b([8, 0, 24, 16])], (H, W), 8)
    assert m.shape == (1, H, W) and k.shape == (1, H, W)
    exp_m = torch.zeros(H, W)
    exp_m[0:2, 1:3] = 1
    assert torch.equal(m[0], exp_m)
    assert torch.allclose(k[0][exp_m == 1], torch.full((4,), 0.25))
    _check_k_bg(m[0], k[0], 1 / 20)  # 24 cells - 4 fg


def test_two_overlapping_boxes_take_minimum():
    # A: cells x 0..1, y 0..1 (area 4); B: x 1..4, y 1..2 (area 8); they share cell (x=1, y=1).
    m, k = fg_bg_masks([_b([0, 0, 16, 16], [8, 8, 40, 24])], (H, W), 8)
    assert m.sum() == 11
    assert k[0, 1, 1] == pytest.approx(1 / 8)  # min(1/4, 1/8)
    assert k[0, 0, 0] == pytest.approx(1 / 4)
    assert k[0, 1, 0] == pytest.approx(1 / 4)
    assert k[0, 2, 4] == pytest.approx(1 / 8)
    _check_k_bg(m[0], k[0], 1 / 13)


def test_overlap_max_rule_smallest_box_wins():
    m, k = fg_bg_masks([_b([0, 0, 16, 16], [8, 8, 40, 24])], (H, W), 8, overlap="max")
    assert m.sum() == 11
    assert k[0, 1, 1] == pytest.approx(1 / 4)  # max(1/4, 1/8)
    assert k[0, 2, 4] == pytest.approx(1 / 8)
    _check_k_bg(m[0], k[0], 1 / 13)
    with pytest.raises(ValueError, match="overlap"):
        fg_bg_masks([_b()], (H, W), 8, overlap="mean")


def test_box_smaller_than_cell_marks_centre_cell():
    m, k = fg_bg_masks([_b([6, 6, 10, 10])], (H, W), 8)
    assert m.sum() == 1 and m[0, 1, 1] == 1
    assert k[0, 1, 1] == pytest.approx(1.0)
    _check_k_bg(m[0], k[0], 1 / 23)


def test_box_past_border_is_clamped():
    m, k = fg_bg_masks([_b([40, 24, 60, 40])], (H, W), 8)
    assert m.sum() == 1 and m[0, 3, 5] == 1
    m2, _ = fg_bg_masks([_b([-20, 16, 16, 100])], (H, W), 8)  # x -> 0..1 (clamped), y 2..3
    exp = torch.zeros(H, W)
    exp[2:4, 0:2] = 1
    assert torch.equal(m2[0], exp)


def test_empty_images():
    m, k = fg_bg_masks([_b()], (H, W), 8)
    assert m.sum() == 0 and torch.allclose(k, torch.full((1, H, W), 1 / 24))
    m, k = fg_bg_masks([_b(), _b([0, 0, 8, 8])], (H, W), 8)
    assert m[0].sum() == 0 and torch.allclose(k[0], torch.full((H, W), 1 / 24))
    assert m[1].sum() == 1
    assert box_mask([_b(), _b()], (H, W), 8).shape == (2, H, W)


def test_no_background_no_division_by_zero():
    m, k = fg_bg_masks([_b([0, 0, 48, 32])], (H, W), 8)
    assert m.sum() == H * W
    assert torch.isfinite(k).all() and torch.allclose(k, torch.full_like(k, 1 / 24))


def test_batch_of_two_with_different_counts():
    boxes = [_b([8, 0, 24, 16]), _b([0, 0, 16, 16], [8, 8, 40, 24])]
    m, k = fg_bg_masks(boxes, (H, W), 8)
    for i in range(2):
        mi, ki = fg_bg_masks([boxes[i]], (H, W), 8)
        assert torch.equal(m[i], mi[0]) and torch.allclose(k[i], ki[0])
    assert m[0].sum() == 4 and m[1].sum() == 11
    assert k[0, 2, 0] == pytest.approx(1 / 20) and k[1, 3, 0] == pytest.approx(1 / 13)


def test_non_square_map_no_swap():
    # A wide box on row 0 of a 4x6 map, a tall one in column 0 of a 6x4 map.
    m, _ = fg_bg_masks([_b([0, 0, 48, 8])], (4, 6), 8)
    exp = torch.zeros(4, 6)
    exp[0, :] = 1
    assert torch.equal(m[0], exp)
    m, k = fg_bg_masks([_b([0, 0, 8, 48])], (6, 4), 8)
    exp = torch.zeros(6, 4)
    exp[:, 0] = 1
    assert torch.equal(m[0], exp)
    assert k[0, 5, 0] == pytest.approx(1 / 6) and k[0, 0, 3] == pytest.approx(1 / 18)


def test_strides_4_and_8_same_boxes():
    boxes = [_b([8, 8, 24, 16])]  # in a 32x48 frame
    m8, k8 = fg_bg_masks(boxes, (4, 6), 8)  # x 1..2, y 1..1 -> 2 cells
    m4, k4 = fg_bg_masks(boxes, (8, 12), 4)  # x 2..5, y 2..3 -> 8 cells
    assert m8.sum() == 2 and m8[0, 1, 1:3].sum() == 2
    assert m4.sum() == 8 and m4[0, 2:4, 2:6].sum() == 8
    assert k8[0, 1, 1] == pytest.approx(1 / 2) and k4[0, 2, 2] == pytest.approx(1 / 8)
    _check_k_bg(m8[0], k8[0], 1 / 22)
    _check_k_bg(m4[0], k4[0], 1 / 88)


def test_matches_slow_reference_loop():
    g = torch.Generator().manual_seed(0)
    feat_hw, stride = (5, 7), 8
    boxes = []
    for n in (0, 1, 3, 6):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([70.0, 50.0]) - 8
        wh = torch.rand(n, 2, generator=g) * 30
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    m, k = fg_bg_masks(boxes, feat_hw, stride)
    rm, rk = _slow_reference(boxes, feat_hw, stride)
    assert torch.equal(m, rm)
    assert torch.allclose(k, rk)
    assert torch.equal(box_mask(boxes, feat_hw, stride), rm.bool())
    assert torch.equal(box_mask(boxes[1:2], feat_hw, stride)[0], rm[1].bool())
    m, k = fg_bg_masks(boxes, feat_hw, stride, overlap="max")
    rm, rk = _slow_reference(boxes, feat_hw, stride, pick=max)
    assert torch.equal(m, rm) and torch.allclose(k, rk)


# -- FGD's box-to-cell rule (box_rule="fgd"); values by hand, as the fact sheet works them out -------
def _fgd(boxes, sizes, feat_hw=(32, 32), stride=8, overlap="max"):
    return fg_bg_masks(boxes, feat_hw, stride, overlap=overlap, box_rule="fgd", image_sizes=sizes)


def test_fgd_rule_worked_example():
    # 32x32 map, stride 8, unpadded 256x256, box (10, 10, 20, 30):
    # x 10/256*32 = 1.25 -> floor 1, 20/256*32 = 2.5 -> ceil 3: columns 1, 2, 3
    # y 1.25 -> 1, 30/256*32 = 3.75 -> ceil 4: rows 1..4; 12 cells at 1/12, background 1/1012
    m, k = _fgd([_b([10, 10, 20, 30])], [(256, 256)])
    exp = torch.zeros(32, 32)
    exp[1:5, 1:4] = 1
    assert torch.equal(m[0], exp)
    assert torch.allclose(k[0][exp == 1], torch.full((12,), 1 / 12))
    _check_k_bg(m[0], k[0], 1 / 1012)
    cells, area = fgd_box_cells(pad_boxes([_b([10, 10, 20, 30])])[0], torch.tensor([[256.0, 256.0]]), (32, 32))
    assert cells[0, 0].tolist() == [1, 1, 3, 4] and area[0, 0].item() == 12
    # no sizes: the map covers the image exactly (32 x 8 = 256), the same masks
    m2, k2 = fg_bg_masks([_b([10, 10, 20, 30])], (32, 32), 8, overlap="max", box_rule="fgd")
    assert torch.equal(m2, m) and torch.equal(k2, k)


def test_fgd_rule_padded_batch_stretches_the_smaller_image():
    # batch padded to 256 x 256; image 1 is 256 high and 200 wide. Its box (100, 10, 150, 30):
    # x 100/200*32 = 16 -> 16, 150/200*32 = 24 -> 24: columns 16..24 (the stride would give 12..18);
    # y 1.25 .. 3.75: rows 1..4. 36 cells at 1/36, background 1/988.
    boxes = [_b([100, 10, 150, 30]), _b([100, 10, 150, 30])]
    m, k = _fgd(boxes, [(256, 256), (256, 200)])
    exp0 = torch.zeros(32, 32)
    exp0[1:5, 12:20] = 1  # image 0 is not padded: 100/256*32 = 12.5 -> 12, 150/256*32 = 18.75 -> 19
    exp1 = torch.zeros(32, 32)
    exp1[1:5, 16:25] = 1
    assert torch.equal(m[0], exp0) and torch.equal(m[1], exp1)
    assert torch.allclose(k[0][exp0 == 1], torch.full((32,), 1 / 32))  # 8 columns x 4 rows
    assert torch.allclose(k[1][exp1 == 1], torch.full((36,), 1 / 36))
    _check_k_bg(m[0], k[0], 1 / 992)
    _check_k_bg(m[1], k[1], 1 / 988)


def test_fgd_rule_sub_cell_box_marks_2x2_cells():
    # (9, 9, 12, 12): 9/8 = 1.125 -> 1, 12/8 = 1.5 -> 2 on both axes: 2 x 2 cells at 1/4
    m, k = _fgd([_b([9, 9, 12, 12])], [(256, 256)])
    assert m.sum() == 4 and m[0, 1:3, 1:3].sum() == 4
    assert torch.allclose(k[0, 1:3, 1:3], torch.full((2, 2), 0.25))
    _check_k_bg(m[0], k[0], 1 / 1020)
    # a grid-aligned box (8, 8, 16, 16): 1..2 inclusive, one cell more than it overlaps
    m, k = _fgd([_b([8, 8, 16, 16])], [(256, 256)])
    assert m.sum() == 4 and m[0, 1:3, 1:3].sum() == 4 and k[0, 1, 1] == pytest.approx(0.25)


def test_fgd_rule_border_box_counts_the_phantom_row_and_column():
    # (240, 240, 256, 256): 30 .. 32 inclusive on both axes = 3 x 3 = 9 for the area, but only
    # cells 30..31 exist: 4 cells written, each 1/9
    m, k = _fgd([_b([240, 240, 256, 256])], [(256, 256)])
    exp = torch.zeros(32, 32)
    exp[30:32, 30:32] = 1
    assert torch.equal(m[0], exp)
    assert torch.allclose(k[0, 30:32, 30:32], torch.full((2, 2), 1 / 9))
    _check_k_bg(m[0], k[0], 1 / 1020)
    # a box over the whole image: 0..32 x 0..32, area 33 x 33 = 1089 > H*W: every cell 1/1089
    m, k = _fgd([_b([0, 0, 256, 256])], [(256, 256)])
    assert m.sum() == 1024 and torch.allclose(k, torch.full_like(k, 1 / 1089))
    m, k = _fgd([_b([0, 0, 256, 256])], [(256, 256)], overlap="min")
    assert m.sum() == 1024 and torch.allclose(k, torch.full_like(k, 1 / 1089))


def test_fgd_rule_image_without_boxes():
    m, k = _fgd([_b(), _b([10, 10, 20, 30])], [(256, 256), (256, 256)])
    assert m[0].sum() == 0 and torch.allclose(k[0], torch.full((32, 32), 1 / 1024))
    assert m[1].sum() == 12
    m, k = _fgd([_b(), _b()], [(256, 256), (200, 256)])
    assert m.sum() == 0 and torch.allclose(k, torch.full_like(k, 1 / 1024))


def test_fgd_rule_overlap_smallest_box_wins():
    # A (0, 0, 64, 64): 0..8 x 0..8, area 81; B (10, 10, 20, 30): 1..3 x 1..4, area 12, inside A
    boxes = [_b([0, 0, 64, 64], [10, 10, 20, 30])]
    m, k = _fgd(boxes, [(256, 256)])
    assert m.sum() == 81
    assert k[0, 2, 2] == pytest.approx(1 / 12) and k[0, 8, 8] == pytest.approx(1 / 81)
    _, k = _fgd(boxes, [(256, 256)], overlap="min")
    assert k[0, 2, 2] == pytest.approx(1 / 81)
    _check_k_bg(m[0], k[0], 1 / (1024 - 81))


def test_fgd_rule_bad_arguments():
    with pytest.raises(ValueError, match="box_rule"):
        fg_bg_masks([_b()], (H, W), 8, box_rule="fgd2")
    with pytest.raises(ValueError, match="2 image sizes for 1 images"):
        fg_bg_masks([_b([0, 0, 8, 8])], (H, W), 8, box_rule="fgd", image_sizes=[(32, 48), (32, 48)])
    with pytest.raises(ValueError, match="positive"):
        fg_bg_masks([_b([0, 0, 8, 8])], (H, W), 8, box_rule="fgd", image_sizes=[(0, 48)])


def _fgd_reference(boxes, sizes, feat_hw, pick=max):
    """FGD's own loop (yzd-v/FGD FeatureLoss.forward), written out cell by cell."""
    h, w = feat_hw
    ms, ks = [], []
    for bx, (ih, iw) in zip(boxes, sizes):
        fg = torch.zeros(h, w, dtype=torch.float64)
        for x1, y1, x2, y2 in bx.tolist():
            # float32 as in FGD (its boxes are float32 tensors)
            f = lambda v, n, size: float(torch.tensor(v) / size * n)  # noqa: E731
            wmin, wmax = math.floor(f(x1, w, iw)), math.ceil(f(x2, w, iw))
            hmin, hmax = math.floor(f(y1, h, ih)), math.ceil(f(y2, h, ih))
            value = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))
            for yy in range(hmin, min(hmax, h - 1) + 1):
                for xx in range(wmin, min(wmax, w - 1) + 1):
                    old = fg[yy, xx].item()
                    fg[yy, xx] = value if old == 0 else pick(old, value)
        m = (fg > 0).float()
        n_bg = int((m == 0).sum())
        k = torch.where(m > 0, fg, torch.full_like(fg, 1.0 / n_bg if n_bg else 0.0)).float()
        ms.append(m)
        ks.append(k)
    return torch.stack(ms), torch.stack(ks)


def test_fgd_rule_matches_fgds_loop_on_random_padded_boxes():
    g = torch.Generator().manual_seed(0)
    feat_hw, stride = (9, 11), 8  # a padded 72 x 88 batch
    sizes = [(72, 88), (60, 88), (72, 50), (41, 63)]
    boxes = []
    for n, (ih, iw) in zip((0, 1, 3, 6), sizes):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([iw * 0.9, ih * 0.9])
        wh = torch.rand(n, 2, generator=g) * 30
        br = torch.minimum(xy + wh, torch.tensor([float(iw), float(ih)]))  # inside the image, as mmdet's
        boxes.append(torch.cat([xy, br], dim=1))
    for overlap, pick in (("max", max), ("min", min)):
        m, k = fg_bg_masks(boxes, feat_hw, stride, overlap=overlap, box_rule="fgd", image_sizes=sizes)
        rm, rk = _fgd_reference(boxes, sizes, feat_hw, pick)
        assert torch.equal(m, rm), overlap
        assert torch.allclose(k, rk), overlap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    boxes = [_b([0, 0, 16, 16], [8, 8, 40, 24]), _b()]
    m, k = fg_bg_masks(boxes, (H, W), 8)
    mc, kc = fg_bg_masks([b.cuda() for b in boxes], (H, W), 8)
    assert mc.is_cuda and torch.equal(mc.cpu(), m) and torch.allclose(kc.cpu(), k)
    sizes = [(32, 40), (20, 48)]
    m, k = fg_bg_masks(boxes, (H, W), 8, overlap="max", box_rule="fgd", image_sizes=sizes)
    mc, kc = fg_bg_masks([b.cuda() for b in boxes], (H, W), 8, overlap="max", box_rule="fgd", image_sizes=sizes)
    assert mc.is_cuda and torch.equal(mc.cpu(), m) and torch.allclose(kc.cpu(), k)
