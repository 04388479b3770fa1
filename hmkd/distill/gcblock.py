"""GcBlock (global context block) and the supplemental / background distillation loss.

HMKD Sec. 3.2.3 (DESIGN.md item 5)::

    f'(F) = F + C_v2 ReLU(LN(C_v1 sum_j softmax(C_k F)_j F_j))

    paper form: L_bg = sum (f'(|T - S'|))^2
    fgd form:   L_bg = sum (f'_s(S') - f'_t(T))^2        (FGD's global loss)

The balance factor alpha is applied by the caller.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["GcBlock", "background_loss"]


class GcBlock(nn.Module):
    """Global context block f'(F) = F + C_v2(ReLU(LN(C_v1(ctx)))).

    ``ctx = sum_j softmax_j(C_k F)_j F_j`` is one context vector per image: ``C_k`` is a 1x1
    conv C -> 1 and the softmax runs over all H*W pixels of each image. ``C_v1`` is a 1x1 conv
    C -> C*ratio, LN an ``nn.LayerNorm`` over ``[C*ratio, 1, 1]`` (with affine), ``C_v2`` a 1x1
    conv back to C; the resulting [B, C, 1, 1] vector is broadcast-added to every pixel.

    Initialisation choice: GCNet initialises ``C_v2`` to zero so that the block starts as the
    identity. For distillation we deliberately keep PyTorch's default (Kaiming-uniform) init
    for every conv, so that f' is not the identity from the first step and the context term
    contributes to the loss immediately.

    Args:
        channels: number of input/output channels C.
        ratio: bottleneck ratio; the hidden width is ``max(1, int(round(C * ratio)))``.
    """

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"GcBlock: channels must be >= 1, got {channels}")
        if ratio <= 0:
            raise ValueError(f"GcBlock: ratio must be > 0, got {ratio}")
        hidden = max(1, int(round(channels * ratio)))
        self.channels = channels
        self.hidden = hidden
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)  # C_k
        self.conv_v1 = nn.Conv2d(channels, hidden, kernel_size=1)  # C_v1
        self.norm = nn.LayerNorm([hidden, 1, 1])  # LN
        self.conv_v2 = nn.Conv2d(hidden, channels, kernel_size=1)  # C_v2

    def context(self, x: Tensor) -> Tensor:
        """Attention-pooled context vector ``sum_j softmax_j(C_k x)_j x_j`` -> [B, C, 1, 1]."""
        b, c, h, w = x.shape
        weights = self.conv_mask(x).reshape(b, 1, h * w).softmax(dim=-1)  # [B,1,HW]
        ctx = torch.bmm(x.reshape(b, c, h * w), weights.transpose(1, 2))  # [B,C,1]
        return ctx.reshape(b, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply f' to ``x`` of shape [B, C, H, W]; returns the same shape."""
        ctx = self.context(x)
        add = self.conv_v2(torch.relu(self.norm(self.conv_v1(ctx))))
        return x + add


def _reduce(sq: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return sq.sum() / max(1, sq.shape[0])
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"background_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def background_loss(
    T: Tensor,
    S: Tensor,
    gc: GcBlock,
    *,
    form: Literal["paper", "fgd"] = "paper",
    gc_t: GcBlock | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Supplemental (background) distillation loss of HMKD Sec. 3.2.3, without alpha.

    Args:
        T: teacher map [B, C, H, W] (pass it detached; the teacher is frozen).
        S: (adapted) student map [B, C, H, W].
        gc: the GcBlock f' (the student-side block in the ``fgd`` form).
        form: ``"paper"``: ``sum (f'(|T - S|))^2``; ``"fgd"``: ``sum (f'_s(S) - f'_t(T))^2``.
        gc_t: teacher-side GcBlock for the ``fgd`` form (FGD keeps two blocks); when None the
            single block ``gc`` is shared by both sides. Ignored by the paper form.
        reduction: ``"sum"``: sum over C, H, W, divided by the batch size B (FGD convention, so
            the value grows with image area and channel count); ``"mean"``: mean over all elements.

    Returns:
        Scalar loss tensor.
    """
    if T.shape != S.shape:
        raise ValueError(f"background_loss: T {tuple(T.shape)} and S {tuple(S.shape)} differ")
    if form == "paper":
        sq = gc(torch.abs(T - S)).pow(2)
    elif form == "fgd":
        teacher_block = gc if gc_t is None else gc_t
        sq = (gc(S) - teacher_block(T)).pow(2)
    else:
        raise ValueError(f"background_loss: form must be 'paper' or 'fgd', got {form!r}")
    return _reduce(sq, reduction)
