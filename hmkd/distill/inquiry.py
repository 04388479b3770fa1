"""Inquiry Head of HMKD (Sec. 3.2.2).

A light conv head on the student's level-l FPN map predicts a small-object probability map
MAP_l. Its target is 1 at cells whose centre lies within ``radius`` cells of the centre of a
small ground-truth object; it is trained with sigmoid focal loss. Cells with MAP_l > t are
candidate small-object locations, widened to the finer level l-1 by nearest upsampling.

All centres are in pixels of the resized input frame; cell (x, y) at stride s covers pixels
[x*s, (x+1)*s) and has its centre at ((x+0.5)*s, (y+0.5)*s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from hmkd.models.backbones import group_norm

__all__ = [
    "InquiryHead",
    "inquiry_targets",
    "inquiry_loss",
    "candidate_cells",
    "widen_to_finer_level",
]


class InquiryHead(nn.Module):
    """Light conv head predicting one small-object logit per cell.

    ``num_convs`` x (3x3 conv, GroupNorm, ReLU) then a 3x3 conv to one channel. GroupNorm uses
    the largest group count <= 32 that divides ``hidden`` (:func:`hmkd.models.backbones.group_norm`).
    Conv weights are initialised N(0, 0.01) (RetinaNet/FCOS head convention) with zero biases,
    except the final bias which is ``-log((1 - p) / p)`` so that the initial probability is
    ``prior_prob`` everywhere.

    Args:
        in_channels: channels of the input map.
        hidden: width of the tower (default: ``in_channels``).
        num_convs: number of conv-norm-ReLU blocks (0 allowed).
        prior_prob: initial foreground probability p.
        norm: ``"gn"`` for GroupNorm or ``"none"``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int | None = None,
        num_convs: int = 2,
        prior_prob: float = 0.01,
        norm: str = "gn",
    ) -> None:
        super().__init__()
        if norm not in ("gn", "none"):
            raise ValueError(f"InquiryHead: norm must be 'gn' or 'none', got {norm!r}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"InquiryHead: prior_prob must be in (0, 1), got {prior_prob}")
        hidden = in_channels if hidden is None else hidden
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(num_convs):
            layers.append(nn.Conv2d(ch, hidden, kernel_size=3, padding=1))
            if norm == "gn":
                layers.append(group_norm(hidden))
            layers.append(nn.ReLU(inplace=True))
            ch = hidden
        self.tower = nn.Sequential(*layers)
        self.logits = nn.Conv2d(ch, 1, kernel_size=3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, x: Tensor) -> Tensor:
        """Map [B, C, H, W] -> logits [B, 1, H, W]."""
        return self.logits(self.tower(x))


def inquiry_targets(
    centers: list[Tensor],
    feat_hw: tuple[int, int],
    stride: int,
    radius: float = 2.0,
) -> Tensor:
    """Binary Inquiry-Head target on a level grid.

    A cell is 1 when its centre ((x+0.5)*stride, (y+0.5)*stride) lies at Euclidean distance
    strictly less than ``radius`` cells (pixel distance / stride) from any given object centre;
    the cell containing a centre (clamped into the grid) is always 1.

    Computed by scattering, for every centre at once, a (2R+1)^2 window of candidate cells
    around it (R = ceil(radius) + 1 covers every cell that can qualify), so the cost is
    O(objects * radius^2) rather than O(objects * H * W).

    Args:
        centers: per image a [N_b, 2] tensor of (x, y) centres in input pixels (N_b may be 0).
            Select the small objects before calling.
        feat_hw: (H, W) of the level grid.
        stride: level stride in input pixels.
        radius: radius in cells (the paper's s_l, default 2).

    Returns:
        Float tensor [B, H, W] of 0/1.
    """
    h, w = int(feat_hw[0]), int(feat_hw[1])
    b = len(centers)
    if b == 0:
        raise ValueError("inquiry_targets: empty batch (centers is an empty list)")
    ref = centers[0]
    device = ref.device
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    out = torch.zeros(b * h * w, device=device, dtype=dtype)
    counts_list = [int(c.shape[0]) for c in centers]
    if sum(counts_list) == 0 or h == 0 or w == 0:
        return out.reshape(b, h, w)
    pts = torch.cat([c.reshape(-1, 2) for c in centers]).to(dtype) / stride  # [N,2] in cells
    counts = torch.tensor(counts_list, device=device)
    img = torch.repeat_interleave(torch.arange(b, device=device), counts)  # [N]

    r_int = int(math.ceil(radius)) + 1
    offs = torch.arange(-r_int, r_int + 1, device=device)
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    ox, oy = ox.reshape(-1), oy.reshape(-1)  # [K]

    base = torch.floor(pts).long()  # cell holding the centre
    base_x = base[:, 0].clamp(0, w - 1)
    base_y = base[:, 1].clamp(0, h - 1)
    cx = base[:, :1] + ox  # [N,K]
    cy = base[:, 1:] + oy
    dx = cx.to(dtype) + 0.5 - pts[:, :1]
    dy = cy.to(dtype) + 0.5 - pts[:, 1:]
    near = (dx * dx + dy * dy) < radius * radius
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    keep = near & inside
    flat = (img[:, None] * h + cy) * w + cx
    out[flat[keep]] = 1.0
    out[(img * h + base_y) * w + base_x] = 1.0  # the centre's own cell is always positive
    return out.reshape(b, h, w)


def inquiry_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sigmoid focal loss (alpha 0.25, gamma 2) summed, divided by max(1, #positive cells).

    Args:
        logits: [B, 1, H, W] (or [B, H, W]) Inquiry-Head logits.
        targets: [B, H, W] 0/1 targets from :func:`inquiry_targets`.
    """
    if logits.dim() == 4:
        logits = logits.squeeze(1)
    if logits.shape != targets.shape:
        raise ValueError(
            f"inquiry_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ"
        )
    targets = targets.to(logits.dtype)
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
    return loss / targets.sum().clamp(min=1.0)


@torch.no_grad()
def candidate_cells(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Candidate small-object cells: ``sigmoid(logits) > threshold``, no gradient.

    Args:
        logits: [B, 1, H, W] (or [B, H, W]).
        threshold: probability threshold t.

    Returns:
        Bool tensor [B, H, W].
    """
    if logits.dim() == 4:
        logits = logits.squeeze(1)
    return torch.sigmoid(logits) > threshold


def widen_to_finer_level(candidates_l: Tensor, finer_hw: tuple[int, int]) -> Tensor:
    """Carry level-l candidate cells to level l-1 (stride halved) by nearest upsampling x2.

    Finer cell (x', y') lies inside coarse cell (x'//2, y'//2). The x2 map is cropped to
    ``finer_hw`` (e.g. 2H-1 rows when the finer map is odd-sized) or padded with False where the
    finer map is larger than 2H x 2W (those cells have no coarse parent).

    Args:
        candidates_l: bool [B, H, W].
        finer_hw: (H', W') of the level l-1 grid.

    Returns:
        Bool tensor [B, H', W'].
    """
    hf, wf = int(finer_hw[0]), int(finer_hw[1])
    up = candidates_l.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    up = up[..., :hf, :wf]
    pad_h, pad_w = hf - up.shape[-2], wf - up.shape[-1]
    if pad_h > 0 or pad_w > 0:
        up = F.pad(up.to(torch.uint8), (0, pad_w, 0, pad_h)).bool()
    return up
