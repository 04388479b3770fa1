"""Inquiry Head, targets, loss, candidate cells and widening, against hand values."""

import math

import torch

from hmkd.distill.inquiry import (
    InquiryHead,
    candidate_cells,
    inquiry_loss,
    inquiry_targets,
    widen_to_finer_level,
)


def test_inquiry_head_shapes_and_prior() -> None:
    head = InquiryHead(12, hidden=24, num_convs=2, prior_prob=0.01)
    gns = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(gns) == 2 and gns[0].num_groups == 24  # largest <= 32 dividing 24
    x = torch.randn(2, 12, 5, 7)
    out = head(x)
    assert out.shape == (2, 1, 5, 7)
    assert math.isclose(head.logits.bias.item(), -math.log(99.0), rel_tol=1e-6)
    # weights ~N(0, .01): probabilities start near the prior
    assert torch.allclose(torch.sigmoid(out), torch.full_like(out, 0.01), atol=5e-3)
    assert InquiryHead(8, num_convs=0, norm="none")(torch.randn(1, 8, 3, 3)).shape == (1, 1, 3, 3)
    assert [m.num_groups for m in InquiryHead(48).modules() if isinstance(m, torch.nn.GroupNorm)] == [24, 24]


def test_inquiry_targets_radius_strict_and_centre() -> None:
    # stride 4, grid 5 (rows) x 6 (cols). Centre at pixel (10, 10) -> (2.5, 2.5) cells,
    # i.e. exactly the centre of cell (x=2, y=2). Radius 1 cell, strict: cells at distance
    # exactly 1 (the 4 neighbours) are OUT, only the centre cell is in.
    c = [torch.tensor([[10.0, 10.0]])]
    t = inquiry_targets(c, (5, 6), 4, radius=1.0)
    expected = torch.zeros(1, 5, 6)
    expected[0, 2, 2] = 1
    assert torch.equal(t, expected)
    # radius 1.5: neighbours at distance 1 in, diagonals at sqrt(2)=1.414 in, distance 2 out
    t = inquiry_targets(c, (5, 6), 4, radius=1.5)
    expected[0, 1:4, 1:4] = 1
    assert torch.equal(t, expected)
    # radius 2 (default): distance-2 cells (0,2),(4,2),(2,0),(2,4) are OUT (strict); sqrt(5) out
    t = inquiry_targets(c, (5, 6), 4)
    assert torch.equal(t, expected)


def test_inquiry_targets_off_centre_small_radius_keeps_centre_cell() -> None:
    # centre (1, 1) px at stride 8 -> (0.125, 0.125) cells; distance to cell (0,0)'s centre is
    # sqrt(2)*0.375 = 0.53 > radius 0.5, but the holding cell is always 1.
    t = inquiry_targets([torch.tensor([[1.0, 1.0]])], (3, 3), 8, radius=0.5)
    expected = torch.zeros(1, 3, 3)
    expected[0, 0, 0] = 1
    assert torch.equal(t, expected)


def test_inquiry_targets_batch_empty_and_non_square() -> None:
    # image 0: no objects; image 1: centre (3, 1) cells * stride 2 = (6.0, 2.0) px on a 3x7 grid
    # radius 1 cell: cell centres (x+.5, y+.5); distance from (3, 1):
    #   cells (2,0),(3,0),(2,1),(3,1) at sqrt(.5)=.707 -> in; (1,*),(4,*) at >= 1.58 -> out;
    #   (2,2),(3,2) at sqrt(.25+2.25)=1.58 -> out.
    c = [torch.zeros(0, 2), torch.tensor([[6.0, 2.0]])]
    t = inquiry_targets(c, (3, 7), 2, radius=1.0)
    expected = torch.zeros(2, 3, 7)
    expected[1, 0:2, 2:4] = 1
    assert torch.equal(t, expected)
    assert torch.equal(inquiry_targets([torch.zeros(0, 2)] * 2, (2, 3), 4), torch.zeros(2, 2, 3))


def test_inquiry_targets_centre_outside_grid_is_clamped() -> None:
    # centre beyond the right/bottom edge (padding-free grid): its clamped cell is still marked
    t = inquiry_targets([torch.tensor([[100.0, 100.0]])], (2, 2), 4, radius=0.5)
    expected = torch.zeros(1, 2, 2)
    expected[0, 1, 1] = 1
    assert torch.equal(t, expected)


def test_inquiry_loss_matches_manual_focal() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]], requires_grad=True)
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])

    def focal(x: float, y: float) -> float:
        p = 1 / (1 + math.exp(-x))
        if y == 1:
            return -0.25 * (1 - p) ** 2 * math.log(p)
        return -0.75 * p**2 * math.log(1 - p)

    manual = (focal(0, 1) + focal(2, 0) + focal(-1, 0) + focal(3, 1)) / 2  # 2 positives
    loss = inquiry_loss(logits, targets)
    assert math.isclose(loss.item(), manual, rel_tol=1e-5)
    loss.backward()
    assert logits.grad is not None
    # no positives: divided by 1, not 0
    neg = inquiry_loss(torch.tensor([[[[2.0]]]]), torch.zeros(1, 1, 1))
    assert math.isclose(neg.item(), focal(2, 0), rel_tol=1e-5)


def test_candidate_cells_threshold_and_no_grad() -> None:
    logits = torch.tensor([[[[0.0, 0.1], [-0.1, 5.0]]]], requires_grad=True)
    cand = candidate_cells(logits)  # sigmoid(0) = .5 is NOT > .5
    assert cand.dtype == torch.bool and not cand.requires_grad
    assert torch.equal(cand, torch.tensor([[[False, True], [False, True]]]))
    cand = candidate_cells(logits, threshold=0.99)  # sigmoid(5) = .9933
    assert torch.equal(cand, torch.tensor([[[False, False], [False, True]]]))


def test_widen_to_finer_level_even_odd_and_larger() -> None:
    c = torch.tensor([[[True, False], [False, True]]])  # [1, 2, 2]
    up = widen_to_finer_level(c, (4, 4))
    expected = torch.tensor(
        [[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]], dtype=torch.bool
    )
    assert torch.equal(up, expected)
    assert torch.equal(widen_to_finer_level(c, (3, 4)), expected[:, :3])  # 2H-1 rows
    assert torch.equal(widen_to_finer_level(c, (4, 3)), expected[:, :, :3])  # 2W-1 cols
    big = widen_to_finer_level(c, (5, 4))  # a row without a coarse parent -> False
    assert big.shape == (1, 5, 4) and big.dtype == torch.bool
    assert torch.equal(big[:, :4], expected) and not big[:, 4].any()
