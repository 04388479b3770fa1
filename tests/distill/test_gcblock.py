"""GcBlock and background_loss against hand-computed values."""

import math

import pytest
import torch

from hmkd.distill.gcblock import GcBlock
from hmkd.distill.losses import background_loss


def _feature() -> torch.Tensor:
    # 2 channels on a 2x2 map; pixels in raster order: (1,0), (0,0), (0,0), (0,2)
    return torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])


def _known_block() -> GcBlock:
    gc = GcBlock(2, ratio=1.0)
    with torch.no_grad():
        gc.conv_mask.weight.copy_(torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1))
        gc.conv_mask.bias.zero_()
        gc.conv_v1.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        gc.conv_v1.bias.zero_()
        gc.norm.weight.fill_(1.0)
        gc.norm.bias.zero_()
        gc.conv_v2.weight.copy_(torch.tensor([[2.0, 0.0], [3.0, 0.0]]).reshape(2, 2, 1, 1))
        gc.conv_v2.bias.copy_(torch.tensor([0.5, -0.5]))
    gc.norm.eps = 0.0
    return gc


def _identity_block() -> GcBlock:
    gc = GcBlock(2, ratio=1.0)
    with torch.no_grad():
        gc.conv_v2.weight.zero_()
        gc.conv_v2.bias.zero_()
    return gc


# By hand: softmax weights over pixels = exp([ln3,0,0,0]) / 6 = [1/2, 1/6, 1/6, 1/6]
# ctx = 1/2*(1,0) + 1/6*(0,2) = (1/2, 1/3); C_v1 = I; LN (eps 0) -> (1, -1); ReLU -> (1, 0)
# C_v2 -> (2*1 + 0.5, 3*1 - 0.5) = (2.5, 2.5), added to every pixel.
EXPECTED = torch.tensor([[[[3.5, 2.5], [2.5, 2.5]], [[2.5, 2.5], [2.5, 4.5]]]])
# sum of squares = 12.25 + 3*6.25 + 3*6.25 + 20.25 = 70
EXPECTED_SUMSQ = 70.0


def test_gcblock_known_weights() -> None:
    out = _known_block()(_feature())
    assert torch.allclose(out, EXPECTED, atol=1e-6)


def test_gcblock_shapes_and_default_init_not_identity() -> None:
    torch.manual_seed(0)
    gc = GcBlock(8)
    assert gc.hidden == 4
    x = torch.randn(3, 8, 5, 7)
    y = gc(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)  # C_v2 is not zero-initialised


def test_gcblock_context_per_image() -> None:
    gc = _known_block()
    x = torch.cat([_feature(), 2 * _feature()])
    ctx = gc.context(x)
    assert torch.allclose(ctx[0].flatten(), torch.tensor([0.5, 1 / 3]))
    # second image: logits [2 ln3, 0,0,0] -> weights [9,1,1,1]/12; ctx = 9/12*(2,0)+1/12*(0,4)
    assert torch.allclose(ctx[1].flatten(), torch.tensor([1.5, 1 / 3]))


def _with_grad(*tensors: torch.Tensor, module: torch.nn.Module | None = None) -> set[str]:
    """Names of the given tensors (t0, t1, ...) and of ``module``'s parameters that got a gradient."""
    names = {f"t{i}" for i, t in enumerate(tensors) if t.grad is not None}
    if module is not None:
        names |= {n for n, p in module.named_parameters() if p.grad is not None}
    return names


GC_PARAMS = {"conv_mask.weight", "conv_mask.bias", "conv_v1.weight", "conv_v1.bias", "norm.weight", "norm.bias",
             "conv_v2.weight", "conv_v2.bias"}


def test_background_loss_paper_form() -> None:
    gc = _known_block()
    t = (_feature() + 1.0).requires_grad_(True)  # even if a caller forgot to detach the teacher
    s = (t - _feature()).detach()  # T - S = F >= 0, so |T - S| = F
    s.requires_grad_(True)
    assert torch.allclose(background_loss(t, s, gc), torch.tensor(EXPECTED_SUMSQ))
    assert torch.allclose(background_loss(t, s, gc, reduction="mean"), torch.tensor(EXPECTED_SUMSQ / 8))
    # batch of two identical images: "sum" divides by B -> same value
    t2, s2 = torch.cat([t, t]), torch.cat([s, s])
    assert torch.allclose(background_loss(t2, s2, gc), torch.tensor(EXPECTED_SUMSQ))
    background_loss(t, s, gc).backward()
    # exactly the student map and every parameter of the block; never the teacher
    assert _with_grad(t, s, module=gc) == {"t1"} | GC_PARAMS


def test_background_loss_paper_identity_block_is_plain_sse() -> None:
    gc = _identity_block()
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    s = torch.tensor([[[[0.0, 4.0]], [[3.0, 1.0]]]])
    # |T-S| = (1, 2, 0, 3) -> squares 1 + 4 + 0 + 9 = 14
    assert torch.allclose(background_loss(t, s, gc), torch.tensor(14.0))


def test_background_loss_fgd_form() -> None:
    gc_s = _identity_block()
    gc_t = _known_block()
    s = torch.zeros(1, 2, 2, 2, requires_grad=True)
    t = _feature().requires_grad_(True)
    # f'_s(0) = 0, f'_t(T) = EXPECTED -> sum of squares 70
    loss = background_loss(t, s, gc_s, form="fgd", gc_t=gc_t)
    assert torch.allclose(loss, torch.tensor(EXPECTED_SUMSQ))
    loss.backward()
    # the student map and both blocks (FGD trains both); never the teacher map. The student-side
    # block is the identity at S = 0, so only its last conv (and the map) can get a gradient.
    assert _with_grad(t, s) == {"t1"}
    assert {n for n, p in gc_t.named_parameters() if p.grad is not None} == GC_PARAMS
    assert {n for n, p in gc_s.named_parameters() if p.grad is not None} >= {"conv_v2.weight", "conv_v2.bias"}
    t.grad = None
    # shared block (gc_t None): identity block -> plain SSE of S - T = 1+4 = 5
    s2 = torch.zeros(1, 2, 2, 2)
    assert torch.allclose(background_loss(t, s2, gc_s, form="fgd"), torch.tensor(5.0))
    # identical inputs through a shared block -> exactly 0
    assert background_loss(t, t.clone(), _known_block(), form="fgd").item() == 0.0


def test_background_loss_bad_arguments() -> None:
    gc = _identity_block()
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError):
        background_loss(x, x, gc, form="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        background_loss(x, x, gc, reduction="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        background_loss(x, torch.zeros(1, 2, 2, 3), gc)
