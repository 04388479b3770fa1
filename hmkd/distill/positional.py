"""DETR-style sine/cosine encodings of boxes and grid positions (the matching decoder's inquiries
and keys)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sine_box_encoding", "sine_pos_embed_2d"]


def _sine_1d(values: Tensor, dim: int, temperature: float) -> Tensor:
    """DETR sine/cosine features of scalars in [0, 1]: ``[..] -> [.., dim]``.

    Feature 2k is ``sin(2*pi*v / T^(2k/dim))`` and feature 2k+1 ``cos`` of the same argument.
    """
    if dim % 2 != 0:
        raise ValueError(f"sine encoding: per-coordinate dim must be even, got {dim}")
    k = torch.arange(dim // 2, device=values.device, dtype=torch.float32)
    freq = temperature ** (2.0 * k / dim)  # [dim/2]
    arg = values.float()[..., None] * (2.0 * math.pi) / freq
    return torch.stack((arg.sin(), arg.cos()), dim=-1).flatten(-2)


def sine_box_encoding(boxes_norm: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR-style sine encoding of normalised boxes.

    Args:
        boxes_norm: [N, 4] as (cx, cy, w, h) in [0, 1] (relative to the image size).
        dim: output width; ``dim / 4`` features per coordinate (so ``dim % 8 == 0``).
        temperature: frequency base.

    Returns:
        [N, dim] = concat over (cx, cy, w, h) of interleaved (sin, cos) of ``2*pi*v / T^(2k/d)``
        with d = dim/4, k = 0..d/2-1. At v = 0 each block is (0, 1, 0, 1, ...). Values in [-1, 1].
    """
    if dim % 8 != 0:
        raise ValueError(f"sine_box_encoding: dim must be a multiple of 8, got {dim}")
    enc = _sine_1d(boxes_norm, dim // 4, temperature)  # [N, 4, dim/4]
    return enc.flatten(-2).to(boxes_norm.dtype if boxes_norm.is_floating_point() else torch.float32)


def sine_pos_embed_2d(
    h: int,
    w: int,
    dim: int,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DETR-style 2-D sine positional embedding of an h x w grid.

    Cell (x, y) is at normalised coordinates ((x + 0.5) / w, (y + 0.5) / h) (cell centres,
    consistent with normalised box centres); the first ``dim/2`` features encode x, the last
    ``dim/2`` encode y, each as interleaved (sin, cos) as in :func:`sine_box_encoding`.

    Returns:
        [h * w, dim] in raster (row-major) order, matching ``map.flatten(2)``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sine_pos_embed_2d: dim must be a multiple of 4, got {dim}")
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    ex = _sine_1d(xs, dim // 2, temperature)  # [w, dim/2]
    ey = _sine_1d(ys, dim // 2, temperature)  # [h, dim/2]
    emb = torch.cat((ex[None, :, :].expand(h, w, -1), ey[:, None, :].expand(h, w, -1)), dim=-1)
    return emb.reshape(h * w, dim).to(dtype)
