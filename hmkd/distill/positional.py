"""Sine/cosine encodings of the matching decoder: of boxes and centres (its inquiries) and of the
cells of its key maps (DETR's normalised 2-D embedding over each image's valid extent)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sine_box_encoding", "sine_split_encoding", "valid_extent_pos_embed"]


def _sine_1d(values: Tensor, dim: int, temperature: float) -> Tensor:
    """DETR sine/cosine features of scalars (1 = one period of the lowest frequency): ``[..] -> [.., dim]``.

    Feature 2k is ``sin(2*pi*v / T^(2k/dim))`` and feature 2k+1 ``cos`` of the same argument.
    """
    if dim % 2 != 0:
        raise ValueError(f"sine encoding: per-coordinate dim must be even, got {dim}")
    k = torch.arange(dim // 2, device=values.device, dtype=torch.float32)
    freq = temperature ** (2.0 * k / dim)  # [dim/2]
    arg = values.float()[..., None] * (2.0 * math.pi) / freq
    return torch.stack((arg.sin(), arg.cos()), dim=-1).flatten(-2)


def sine_box_encoding(boxes_norm: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR-style sine encoding of normalised boxes (HMKD's inquiry encoding).

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


def sine_split_encoding(values: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """ICD's sine encoding of normalised coordinates (its inquiries' jittered centres).

    ``[.., n] -> [.., n * dim]``: per coordinate v, ``dim/2`` sines followed by ``dim/2`` cosines
    (not interleaved) of ``2*pi*v / T^(2k/dim)``, k = 0..dim/2-1; the coordinates' blocks in order.
    (ICD's ``InstanceEncoder.get_pos_embeddings`` with 128 features per coordinate.)
    """
    if dim % 2 != 0:
        raise ValueError(f"sine_split_encoding: dim must be even, got {dim}")
    k = torch.arange(dim // 2, device=values.device, dtype=torch.float32)
    freq = temperature ** (2.0 * k / dim)
    arg = values.float()[..., None] * (2.0 * math.pi) / freq  # [.., n, dim/2]
    return torch.cat((arg.sin(), arg.cos()), dim=-1).flatten(-2)


def valid_extent_pos_embed(valid: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised 2-D sine embedding (``PositionEmbeddingSine(dim/2, normalize=True)``).

    Along each axis a valid cell's coordinate is the running count of valid cells up to it divided
    by the axis' valid count (``cumsum / (last + 1e-6)``): cell i of n valid ones is at (i + 1) / n,
    so each image's valid (unpadded) extent spans (0, 1] whatever the batch padding. Cells outside
    the valid extent get the values DETR gives them (they are masked from attention anyway).

    Args:
        valid: bool [B, h, w], True on cells that hold image content (see
            :func:`hmkd.distill.decoder.valid_cells`).
        dim: output width: ``dim/2`` features for y, then ``dim/2`` for x, each interleaved (sin, cos)
            of ``2*pi*v / T^(2k/(dim/2))`` (as :func:`sine_box_encoding`).

    Returns:
        [B, h * w, dim] in raster (row-major) order, matching ``map.flatten(2)``.
    """
    if dim % 4 != 0:
        raise ValueError(f"valid_extent_pos_embed: dim must be a multiple of 4, got {dim}")
    v = valid.to(torch.float32)
    y = v.cumsum(1)
    x = v.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6)
    x = x / (x[:, :, -1:] + 1e-6)
    emb = torch.cat((_sine_1d(y, dim // 2, temperature), _sine_1d(x, dim // 2, temperature)), dim=-1)
    return emb.flatten(1, 2)
