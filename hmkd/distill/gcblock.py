"""GcBlock (global context block, Cao et al. 2019), the f' of HMKD's supplemental distillation.

HMKD Sec. 3.2.3::

    f'(F) = F + C_v2 ReLU(LN(C_v1 sum_j softmax(C_k F)_j F_j))

The loss that uses it is :func:`hmkd.distill.losses.background_loss`; FGD's global loss uses two
blocks (:class:`hmkd.distill.fgd.FGDLoss`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GcBlock"]


class GcBlock(nn.Module):
    """Global context block f'(F) = F + C_v2(ReLU(LN(C_v1(ctx)))).

    ``ctx = sum_j softmax_j(C_k F)_j F_j`` is one context vector per image: ``C_k`` is a 1x1
    conv C -> 1 and the softmax runs over all H*W pixels of each image. ``C_v1`` is a 1x1 conv
    C -> C*ratio, LN an ``nn.LayerNorm`` over ``[C*ratio, 1, 1]`` (with affine), ``C_v2`` a 1x1
    conv back to C; the resulting [B, C, 1, 1] vector is broadcast-added to every pixel.

    Initialisation: this class keeps PyTorch's default (Kaiming-uniform) init for every conv,
    and HMKD's supplemental term (:mod:`hmkd.distill.hmkd`) uses its blocks as built (our choice):
    f' is then not the identity from the first step, so the context part contributes to ``L_bg``
    immediately. GCNet and FGD instead start each block as the
    identity: :class:`~hmkd.distill.fgd.FGDLoss` (``gc_init="fgd"``, its default) re-initialises
    its two blocks as FGD's code does, ``C_k`` Kaiming-normal (fan_in) with zero bias and ``C_v2``
    all zero, so that its global loss starts as the plain squared difference and the context is
    learned from there.

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
