"""Foreground / background masks on an FPN level grid (HMKD paper Sec. 3.2.1), and per-image padding.

All boxes are ``xyxy`` in pixels of the *resized input frame* (the detector transform's output).
Padding of the batch is bottom/right, so cell ``(x, y)`` of a level with stride ``s`` covers the
pixels ``[x*s, (x+1)*s) x [y*s, (y+1)*s)``.

Projection rule (:func:`project_boxes`), applied to each axis independently:

* a box spanning ``[a, b)`` pixels on an axis covers the cells it overlaps:
  ``first = floor(a / s)``, ``last = ceil(b / s) - 1``;
* if the box is smaller than one cell on that axis (``b - a < s``; this also catches degenerate
  or inverted boxes, the only way the range above can come out empty), it covers just the cell
  holding its centre on that axis: ``first = last = floor((a + b) / 2 / s)``;
* both indices are then clamped to the grid ``[0, W-1]`` (x) / ``[0, H-1]`` (y), so a box past
  the border marks the border cells it would have spilled over.

So a box smaller than a cell in both directions marks exactly the cell holding its centre.

FGD's own rule (:func:`fgd_box_cells`, ``box_rule="fgd"`` of :func:`fg_bg_masks`; yzd-v/FGD
``mmdet/distillation/losses/fgd.py``, ``FeatureLoss.forward``), kept for FGD as its authors run it:

* each box is scaled by the map's size over the image's *unpadded* resized size
  (``x' = x / img_w * W``, ``y' = y / img_h * H``, ``H x W`` the padded batch's map), not divided by
  the stride, so on a padded batch an image smaller than the padded frame has its boxes stretched;
* the cells are ``floor(x1') .. ceil(x2')`` (and ``floor(y1') .. ceil(y2')``), both inclusive, one
  cell more than the box overlaps (a box inside one cell marks 2 x 2 cells);
* a box's area is the count of that inclusive range before it is clamped to the map (a box on the
  right or bottom border counts a row / column past the map), while the cells written are those of
  the range that lie on the map.

Every function here is fully vectorised: boxes are padded to ``[B, Nmax, 4]`` and their cell
ranges broadcast against the ``[H, W]`` grid; there is no Python loop over boxes, cells or images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["BOX_RULES", "pad_by_image", "pad_boxes", "project_boxes", "fgd_box_cells", "box_mask", "fg_bg_masks"]

#: Box-to-cell rules of :func:`fg_bg_masks`: ``overlap`` (the module rule, HMKD's) and ``fgd`` (FGD's code).
BOX_RULES = ("overlap", "fgd")


def pad_by_image(values: Tensor, img: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Scatter flat rows ``values`` ``[N, ...]`` of images ``img`` ``[N]`` into ``[B, Nmax, ...]``.

    Rows keep their relative order within each image (stable sort by image index); padded rows are
    0. Returns ``(padded, valid)`` with ``valid`` a bool ``[B, Nmax]``, True for real rows; ``Nmax``
    is the largest row count of an image (0 when there is no row).
    """
    n = values.shape[0]
    counts = torch.bincount(img, minlength=batch) if n else torch.zeros(batch, dtype=torch.long, device=values.device)
    nmax = int(counts.max()) if batch else 0
    out = values.new_zeros((batch, nmax) + tuple(values.shape[1:]))
    valid = torch.zeros(batch, nmax, dtype=torch.bool, device=values.device)
    if n == 0:
        return out, valid
    order = torch.sort(img, stable=True).indices
    img_sorted = img[order]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=values.device) - starts[img_sorted]
    out[img_sorted, pos] = values[order]
    valid[img_sorted, pos] = True
    return out, valid


def pad_boxes(boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack a batch of per-image boxes into one zero-padded tensor (:func:`pad_by_image`).

    Args:
        boxes: one ``[N_b, 4]`` tensor per image (``N_b`` may be 0), all on the same device.

    Returns:
        ``(padded, valid)``: ``padded`` is ``[B, Nmax, 4]`` (floating dtype: the input's if it is
        floating, else float32; padded rows are 0) and ``valid`` a bool ``[B, Nmax]`` that is True
        for real boxes. ``Nmax`` is 0 when no image has a box.
    """
    n_img = len(boxes)
    if n_img == 0:
        return torch.zeros(0, 0, 4), torch.zeros(0, 0, dtype=torch.bool)
    flat = torch.cat([b.reshape(-1, 4) for b in boxes], dim=0)
    if not flat.is_floating_point():
        flat = flat.float()
    counts = torch.tensor([b.reshape(-1, 4).shape[0] for b in boxes], device=flat.device, dtype=torch.long)
    img = torch.repeat_interleave(torch.arange(n_img, device=flat.device), counts)
    return pad_by_image(flat, img, n_img)


def _axis_range(lo: Tensor, hi: Tensor, stride: int, size: int) -> tuple[Tensor, Tensor]:
    """Inclusive cell range on one axis for pixel extents ``[lo, hi)`` (see the module rule)."""
    first = torch.floor(lo / stride)
    last = torch.ceil(hi / stride) - 1
    centre = torch.floor((lo + hi) * 0.5 / stride)
    small = (hi - lo) < stride
    first = torch.where(small, centre, first)
    last = torch.where(small, centre, last)
    first = first.clamp(0, size - 1).long()
    last = last.clamp(0, size - 1).long()
    return first, last


def project_boxes(boxes_padded: Tensor, stride: int, feat_hw: tuple[int, int]) -> Tensor:
    """Project pixel boxes onto a level grid as inclusive cell index ranges.

    Args:
        boxes_padded: ``[B, N, 4]`` xyxy boxes in input-frame pixels (e.g. from :func:`pad_boxes`).
        stride: the level's stride ``s`` in pixels (4 for P2, 8 for P3, ...).
        feat_hw: the level's grid size ``(H, W)``.

    Returns:
        LongTensor ``[B, N, 4]`` of ``(x0, y0, x1, y1)`` inclusive cell indices, following the module
        rule: overlapped cells ``floor(x1_px/s) .. ceil(x2_px/s)-1``; on an axis where the box is
        smaller than a cell, the cell holding its centre; clamped to ``[0, W-1]`` / ``[0, H-1]``.
        Always ``x0 <= x1`` and ``y0 <= y1``.
    """
    h, w = int(feat_hw[0]), int(feat_hw[1])
    b = boxes_padded
    if not b.is_floating_point():
        b = b.float()
    x0, x1 = _axis_range(b[..., 0], b[..., 2], stride, w)
    y0, y1 = _axis_range(b[..., 1], b[..., 3], stride, h)
    return torch.stack([x0, y0, x1, y1], dim=-1)


def fgd_box_cells(
    boxes_padded: Tensor, image_sizes: Tensor, feat_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """FGD's box-to-cell rule (module docstring): inclusive cell ranges and their unclamped areas.

    Args:
        boxes_padded: ``[B, N, 4]`` xyxy boxes in resized-image pixels (e.g. from :func:`pad_boxes`).
        image_sizes: ``[B, 2]`` each image's unpadded resized size ``(h, w)``.
        feat_hw: the level's grid size ``(H, W)`` (of the padded batch).

    Returns:
        ``(cells, area)``: LongTensor ``[B, N, 4]`` of ``(x0, y0, x1, y1)`` inclusive cell indices,
        ``floor(x1 / w * W) .. ceil(x2 / w * W)`` (the same for y), *not* clamped to the grid (cells
        off the map are simply never written); float ``[B, N]`` area ``(x1 - x0 + 1) * (y1 - y0 + 1)``
        of that unclamped range (at least 1).
    """
    h, w = int(feat_hw[0]), int(feat_hw[1])
    b = boxes_padded if boxes_padded.is_floating_point() else boxes_padded.float()
    sizes = image_sizes.to(device=b.device, dtype=b.dtype)
    img_h, img_w = sizes[:, 0, None], sizes[:, 1, None]  # [B, 1]
    # FGD's order of operations (divide by the image size, then multiply by the map size), so that
    # floor/ceil land on the same cells as its code
    x0 = torch.floor(b[..., 0] / img_w * w).long()
    x1 = torch.ceil(b[..., 2] / img_w * w).long()
    y0 = torch.floor(b[..., 1] / img_h * h).long()
    y1 = torch.ceil(b[..., 3] / img_h * h).long()
    area = ((x1 - x0 + 1) * (y1 - y0 + 1)).clamp(min=1).to(b.dtype)
    return torch.stack([x0, y0, x1, y1], dim=-1), area


def _sizes_tensor(
    image_sizes: Sequence[Sequence[int]] | Tensor | None, n_img: int, feat_hw: tuple[int, int], stride: int, device
) -> Tensor:
    """``[B, 2]`` unpadded sizes; None: the map covers each image exactly (``H*stride x W*stride``)."""
    if image_sizes is None:
        return torch.tensor([[feat_hw[0] * stride, feat_hw[1] * stride]] * n_img, dtype=torch.float32, device=device)
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(-1, 2)
    if sizes.shape[0] != n_img:
        raise ValueError(f"fg_bg_masks: {sizes.shape[0]} image sizes for {n_img} images")
    if not bool((sizes > 0).all()):
        raise ValueError(f"fg_bg_masks: image sizes must be positive, got {sizes.tolist()}")
    return sizes


def _inside(cells: Tensor, valid: Tensor, feat_hw: tuple[int, int]) -> Tensor:
    """Bool ``[B, N, H, W]``: cell lies in the (valid) box's projected range."""
    h, w = int(feat_hw[0]), int(feat_hw[1])
    device = cells.device
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    c = cells[..., None, None]  # [B, N, 4, 1, 1]
    in_x = (xs >= c[:, :, 0]) & (xs <= c[:, :, 2])  # [B, N, 1, W]
    in_y = (ys >= c[:, :, 1]) & (ys <= c[:, :, 3])  # [B, N, H, 1]
    return in_x & in_y & valid[:, :, None, None]


def box_mask(boxes: Sequence[Tensor], feat_hw: tuple[int, int], stride: int) -> Tensor:
    """Bool ``[B, H, W]`` mask of the cells covered by any projected box of each image.

    Same cells as the ``M`` of :func:`fg_bg_masks`; use it for a subset of the boxes (e.g. the
    small-object mask). Images without boxes give an all-False map.
    """
    h, w = int(feat_hw[0]), int(feat_hw[1])
    padded, valid = pad_boxes(boxes)
    if padded.shape[1] == 0:
        return torch.zeros(len(boxes), h, w, dtype=torch.bool, device=padded.device)
    cells = project_boxes(padded, stride, (h, w))
    return _inside(cells, valid, (h, w)).any(dim=1)


def fg_bg_masks(
    boxes: Sequence[Tensor],
    feat_hw: tuple[int, int],
    stride: int,
    *,
    overlap: Literal["min", "max"] = "min",
    box_rule: Literal["overlap", "fgd"] = "overlap",
    image_sizes: Sequence[Sequence[int]] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Binary foreground mask ``M`` and scale mask ``K`` of paper Sec. 3.2.1 (FGD's scale mask).

    Args:
        boxes: one ``[N_b, 4]`` xyxy pixel box tensor per image (``N_b`` may be 0).
        feat_hw: the level's grid size ``(H, W)``.
        stride: the level's stride in pixels.
        overlap: rule for cells covered by several boxes. ``"min"`` (default, HMKD paper Sec.
            3.2.1): the minimum of their ``1/(H_g*W_g)``, i.e. the largest box wins. ``"max"``
            (FGD, Yang et al. 2022, "we choose the smallest box"): the maximum, i.e. the smallest
            box wins.
        box_rule: ``"overlap"`` (default, the module rule: the cells a box overlaps, by the stride,
            clamped, HMKD's) or ``"fgd"`` (FGD's code, :func:`fgd_box_cells`: scaled by the unpadded
            image size, ``floor..ceil`` inclusive, area of the unclamped range; ``stride`` unused
            unless ``image_sizes`` is None).
        image_sizes: for ``box_rule="fgd"``, each image's unpadded resized size ``(h, w)``; None:
            the map covers each image exactly (``(H * stride, W * stride)``, no padding).

    Returns:
        ``(M, K)``, both float32 ``[B, H, W]`` on the boxes' device.
        ``M = 1`` on cells covered by any projected box, else 0.
        ``K = min_g 1/(H_g*W_g)`` (``max_g`` with ``overlap="max"``) over the boxes ``g`` covering
        the cell (``H_g, W_g >= 1`` the box's size in cells from :func:`project_boxes`), and
        ``1/N_bg`` on background cells, ``N_bg`` the image's number of background cells (if
        ``N_bg = 0`` there is no background cell and nothing is divided by zero). An image
        without boxes has ``M = 0`` and ``K = 1/(H*W)``. With ``box_rule="fgd"`` the cells and
        ``H_g * W_g`` are those of :func:`fgd_box_cells`.
    """
    if overlap not in ("min", "max"):
        raise ValueError(f"fg_bg_masks: overlap must be 'min' or 'max', got {overlap!r}")
    if box_rule not in BOX_RULES:
        raise ValueError(f"fg_bg_masks: box_rule must be one of {', '.join(BOX_RULES)}, got {box_rule!r}")
    h, w = int(feat_hw[0]), int(feat_hw[1])
    padded, valid = pad_boxes(boxes)
    n_img, device = padded.shape[0], padded.device
    if padded.shape[1] == 0:
        m = torch.zeros(n_img, h, w, device=device)
        return m, torch.full((n_img, h, w), 1.0 / (h * w), device=device)
    if box_rule == "fgd":
        sizes = _sizes_tensor(image_sizes, n_img, (h, w), stride, device)
        cells, area = fgd_box_cells(padded, sizes, (h, w))
        area = area.float()
    else:
        cells = project_boxes(padded, stride, (h, w))
        area = ((cells[..., 2] - cells[..., 0] + 1) * (cells[..., 3] - cells[..., 1] + 1)).float()
    inside = _inside(cells, valid, (h, w))  # [B, N, H, W]
    area = area[:, :, None, None]
    if overlap == "min":  # min of 1/area == 1/(largest covering area); 0 where no box covers
        cover_area = torch.where(inside, area, area.new_zeros(())).amax(dim=1)
    else:  # "max": max of 1/area == 1/(smallest covering area); 0 where no box covers
        # (FGD's unclamped areas can exceed H*W, so the "no box" marker is +inf)
        cover_area = torch.where(inside, area, area.new_full((), math.inf)).amin(dim=1)
        cover_area = torch.where(torch.isinf(cover_area), cover_area.new_zeros(()), cover_area)
    fg = cover_area > 0
    m = fg.float()
    n_bg = (~fg).sum(dim=(1, 2)).clamp(min=1).float()  # [B]
    k_bg = (1.0 / n_bg)[:, None, None].expand(n_img, h, w)
    k = torch.where(fg, 1.0 / cover_area.clamp(min=1.0), k_bg)
    return m, k
