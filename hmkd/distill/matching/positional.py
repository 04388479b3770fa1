"""Sine/cosine encodings of the matching decoder: of boxes and centres (its inquiries) and of the
cells of its key maps (DETR's normalised 2-D embedding over each image's valid extent), and which
cells of a padded map are that valid extent (:func:`valid_cells`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ABSOLUTE_MAX_PERIOD",
    "absolute_pos_embed",
    "absolute_sine_code",
    "sine_box_encoding",
    "sine_split_encoding",
    "valid_cells",
    "valid_extent_pos_embed",
]


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


def valid_cells(
    image_sizes: Sequence[tuple[int, int]],
    hw: tuple[int, int],
    padded_hw: tuple[int, int],
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool [B, h, w]: the cells of an h x w map of the padded (H, W) batch that hold image
    content (ICD's ``mask_out_padding``): with the stride estimated as ``(H/h + W/w) / 2``, the
    rows below ``ceil(img_h / stride)`` and the columns below ``ceil(img_w / stride)``."""
    h, w = int(hw[0]), int(hw[1])
    stride = (float(padded_hw[0]) / h + float(padded_hw[1]) / w) / 2.0
    rows = torch.tensor([math.ceil(float(ih) / stride) for ih, _ in image_sizes], device=device)
    cols = torch.tensor([math.ceil(float(iw) / stride) for _, iw in image_sizes], device=device)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    return (ys[None, :, None] < rows[:, None, None]) & (xs[None, None, :] < cols[:, None, None])


def valid_extent_pos_embed(valid: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised 2-D sine embedding (``PositionEmbeddingSine(dim/2, normalize=True)``).

    Along each axis a valid cell's coordinate is the running count of valid cells up to it divided
    by the axis' valid count (``cumsum / (last + 1e-6)``): cell i of n valid ones is at (i + 1) / n,
    so each image's valid (unpadded) extent spans (0, 1] whatever the batch padding. Cells outside
    the valid extent get the values DETR gives them (they are masked from attention anyway).

    Args:
        valid: bool [B, h, w], True on cells that hold image content (see
            :func:`valid_cells`).
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


#: Longest period (pixels) of :func:`absolute_sine_code`: wider than any input hmkd resizes to.
ABSOLUTE_MAX_PERIOD = 4096.0


def absolute_sine_code(coords_px: Tensor, dim: int, min_period: float, max_period: float = ABSOLUTE_MAX_PERIOD) -> Tensor:
    """Sine code of pixel coordinates with cell-level resolution (``position_code: absolute``).

    ``[.., n] -> [.., n * dim]``: per coordinate v (pixels of the resized input, not normalised),
    interleaved (sin, cos) of ``2*pi*v / p_k`` with ``dim/2`` periods ``p_k`` geometric from
    ``min_period`` to ``max_period``; the coordinates' blocks in order. The dot product of two codes
    is ``sum_k cos(2*pi*(v - v') / p_k)``, which peaks at v = v' and falls within about
    ``min_period`` (DETR's normalised code, whose shortest period is the whole image, cannot tell
    cells a few strides apart). Used for both the key cells and the inquiries' centres, so a
    linear map of each can make their dot product peak where the inquiry points.
    """
    if dim % 2 != 0:
        raise ValueError(f"absolute_sine_code: per-coordinate dim must be even, got {dim}")
    if not 0 < min_period < max_period:
        raise ValueError(f"absolute_sine_code: need 0 < min_period < max_period, got {min_period}, {max_period}")
    k = torch.arange(dim // 2, device=coords_px.device, dtype=torch.float32)
    periods = min_period * (max_period / min_period) ** (k / max(1, dim // 2 - 1))
    arg = coords_px.float()[..., None] * (2.0 * math.pi) / periods  # [.., n, dim/2]
    return torch.stack((arg.sin(), arg.cos()), dim=-1).flatten(-2).flatten(-2)


def absolute_pos_embed(
    batch: int, hw: tuple[int, int], stride: float, dim: int, min_period: float, device: torch.device | str | None = None
) -> Tensor:
    """:func:`absolute_sine_code` of every cell centre ``((x + 0.5) stride, (y + 0.5) stride)`` of an
    h x w map: ``[batch, h * w, dim]`` in raster order, ``dim/2`` features for y then ``dim/2`` for x
    (as :func:`valid_extent_pos_embed`). The same for every image: pixel positions need no per-image
    normalisation (padded cells are masked from the attention)."""
    h, w = int(hw[0]), int(hw[1])
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * stride
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)  # (y, x)
    return absolute_sine_code(grid, dim // 2, min_period).expand(batch, -1, -1)
