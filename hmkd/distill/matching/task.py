"""What the matching decoder is trained on: its real and fake inquiries, and the cells of each object.

ICD trains its decoder to tell real inquiries (objects, centre jittered) from fake ones (random boxes
of a random class) and to localise the real ones. Its inquiries carry no image feature, so the
decoder can only tell a fake by looking at the map. HMKD's inquiries also carry the teacher's
feature at the object (``query_feature``); with random fakes the decoder then reads real-or-fake off
the inquiry's own feature and never needs to attend to the object (measured: identification stays
at 0.955 with the keys shuffled). ``fakes: displaced`` closes that shortcut: a displaced fake is a
copy of a real inquiry (class, size, teacher feature) whose position is moved outside the object, so
real and fake differ only in whether the map holds that object where the inquiry points.

Functions here are the task's sampling (:func:`sample_inquiries`), the cells an inquiry's box covers
on the key maps (:func:`cells_in_boxes`, for direct attention supervision and for the attention
quality measures) and the supervision loss (:func:`attention_in_box_loss`); :class:`AuxOutput` is
what the task gives back (:meth:`~hmkd.distill.matching.decoder.MatchingDecoder.aux_task`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hmkd.distill.masks import pad_boxes

__all__ = [
    "FAKE_KINDS",
    "MAX_INQUIRIES",
    "MAX_INQUIRIES_DEFAULT",
    "AuxOutput",
    "attention_in_box_loss",
    "attention_in_box_share",
    "cells_in_boxes",
    "fake_count",
    "sample_inquiries",
]

#: Fake inquiries: ``random`` (ICD's: random box, random class), ``displaced`` (a real object's
#: inquiry moved outside its box), ``mixed`` (half displaced, half random).
FAKE_KINDS = ("random", "displaced", "mixed")
#: ICD's fake boxes on a non-COCO label set (``UNIFORM_SAMPLE_BOX`` / ``NUM_CLASSES != 80``):
#: (w, h) ~ N(0.2, 0.2) of the image, clipped to mean +- 2 std, then to [0.002, 0.7]; centre
#: uniform, clipped to [0.03, 0.97].
FAKE_SIZE_MEAN, FAKE_SIZE_STD = 0.2, 0.2
FAKE_SIZE_RANGE = (0.002, 0.7)
FAKE_CENTRE_RANGE = (0.03, 0.97)
#: ICD's ``MAX_LABELS`` (cap on real + fake inquiries per image): 100 for Faster/Mask R-CNN
#: (``RCNN_R_50_R101_icd_FPN_1x.yaml``, ``MaskRCNN_...``), 300 otherwise (``utils/build.py``).
MAX_INQUIRIES = {"faster_rcnn": 100, "mask_rcnn": 100}
MAX_INQUIRIES_DEFAULT = 300


@dataclass
class AuxOutput:
    """What :meth:`~hmkd.distill.matching.decoder.MatchingDecoder.aux_task` gives back.

    Attributes:
        losses: ``{"identification": BCE, "localisation": L1}``.
        queries: the encoded inquiries [B, Nq, hidden] (each image's real ones first, then its fakes;
            padded rows are 0), with their graph to the encoder.
        real: bool [B, Nq], True for real (object) inquiries.
        valid: bool [B, Nq], True for real and fake inquiries (False on padding).
        logits: the identification logits [B, Nq] (float32, detached).
        boxes: each inquiry's box [B, Nq, 4] px (a fake's own), ``centres`` [B, Nq, 2] its jittered
            position, ``displaced`` [B, Nq] bool its kind: what the quality measures read.
        localisation: the predicted (l, t, r, b) [B, Nq, 4] (image-normalised, detached).
        attention: the layer's attention [B, heads, Nq, U] when it was computed explicitly
            (``attention_supervision`` > 0), else None.
    """

    losses: dict[str, Tensor]
    queries: Tensor
    real: Tensor
    valid: Tensor
    logits: Tensor | None = None
    boxes: Tensor | None = None
    centres: Tensor | None = None
    displaced: Tensor | None = None
    localisation: Tensor | None = None
    attention: Tensor | None = None

    def real_queries(self) -> tuple[Tensor, Tensor]:
        """(queries [B, Nr, hidden], real [B, Nr]): the first Nr = max objects per image rows, where
        every image's real inquiries are (rows of fakes among them are False in ``real``)."""
        nr = int(self.real.sum(1).max()) if self.real.numel() else 0
        return self.queries[:, :nr], self.real[:, :nr]


def fake_count(n_real: int, fakes_per_real: int, cap: int) -> int:
    """Fake inquiries of an image with ``n_real`` objects (ICD's ``SAMPLE_RULE='relative'``):
    ``min(max(1, (f + 1) n), max(cap, n)) - n``, i.e. f per object, real + fake capped at
    ``cap`` (never below the objects), and one fake for an image without objects."""
    total = min(max(1, (fakes_per_real + 1) * n_real), max(cap, n_real))
    return total - n_real


def _random_fakes(n: int, img: Tensor, sizes: Tensor, num_classes: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """ICD's random fakes of images ``img`` [n]: (boxes [n, 4] px, labels [n])."""
    device = sizes.device
    labels = torch.randint(1, num_classes + 1, (n,), device=device, generator=generator)
    lo, hi = FAKE_CENTRE_RANGE
    ctr = torch.rand(n, 2, device=device, generator=generator).clamp(lo, hi)
    wh = FAKE_SIZE_MEAN + FAKE_SIZE_STD * torch.randn(n, 2, device=device, generator=generator)
    wh = wh.clamp(FAKE_SIZE_MEAN - 2 * FAKE_SIZE_STD, FAKE_SIZE_MEAN + 2 * FAKE_SIZE_STD).clamp(*FAKE_SIZE_RANGE)
    img_wh = sizes[img].flip(-1)
    boxes = torch.cat((ctr - wh / 2, ctr + wh / 2), dim=-1).clamp(0.0, 1.0) * img_wh.repeat(1, 2)
    return boxes, labels


def _displaced_offsets(side: Tensor, low: float, high: float, img_wh: Tensor, centre: Tensor,
                       generator: torch.Generator | None) -> Tensor:
    """Offsets [n, 2] px moving ``centre`` by ``r (cos t w, sin t h)``, r ~ U(low, high), t ~ U(0, 2 pi);
    a component that leaves the image is reversed (same distance), then the point is clamped to it."""
    n = side.shape[0]
    device = side.device
    r = low + (high - low) * torch.rand(n, device=device, generator=generator)
    t = 2.0 * math.pi * torch.rand(n, device=device, generator=generator)
    off = torch.stack((t.cos(), t.sin()), dim=-1) * r[:, None] * side
    moved = centre + off
    off = torch.where((moved < 0) | (moved > img_wh), -off, off)
    return (centre + off).clamp(min=torch.zeros_like(img_wh), max=img_wh) - centre


def sample_inquiries(
    gt: Tensor,
    labels: Tensor,
    img: Tensor,
    sizes: Tensor,
    counts: Sequence[int],
    *,
    num_classes: int,
    fakes_per_real: int,
    cap: int,
    jitter: float,
    fakes: str = "random",
    displacement: tuple[float, float] = (1.5, 3.0),
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The aux task's real + fake inquiries, flat: every object, then the displaced fakes, then the
    random ones (grouped per image later by :func:`~hmkd.distill.masks.pad_by_image`, which keeps
    this order within an image, so each image's real inquiries come first).

    Args:
        gt, labels, img: the batch's boxes [N, 4] (xyxy px), labels [N] and image index [N].
        sizes: [B, 2] per image (h, w) px. counts: objects per image.
        num_classes, fakes_per_real, cap: :func:`fake_count`'s and the random fakes' class range.
        jitter: every inquiry's centre (and a displaced fake's feature point) moves by
            ``U(-jitter, jitter) x (w, h)`` of its box.
        fakes: :data:`FAKE_KINDS`. A displaced fake copies a random object of its image (class,
            size, and the point its teacher feature is read at: that object's jittered centre) and
            moves its position by ``r x (w, h)`` in a random direction, ``r ~ U(displacement)``
            (kept in the image). Images without objects get random fakes.
        displacement: (low, high) of r; low >= 1 puts a fake's centre outside its source's box.

    Returns:
        ``boxes`` [M, 4] px (a fake's own box), ``centres`` [M, 2] px (the jittered position the
        inquiry encodes), ``feature_centres`` [M, 2] px (where its teacher feature is read: its own
        centre, except for displaced fakes), ``labels`` [M], ``img`` [M], ``real`` [M] bool,
        ``displaced`` [M] bool, ``sizes``.
    """
    if fakes not in FAKE_KINDS:
        raise ValueError(f"sample_inquiries: fakes must be one of {FAKE_KINDS}, got {fakes!r}")
    device = gt.device
    n_img = len(counts)
    n_fake = torch.tensor([fake_count(n, fakes_per_real, cap) for n in counts], device=device)
    has_obj = torch.tensor(list(counts), device=device) > 0
    n_disp = torch.zeros_like(n_fake)
    if fakes == "displaced":
        n_disp = torch.where(has_obj, n_fake, 0)
    elif fakes == "mixed":
        n_disp = torch.where(has_obj, n_fake // 2, 0)
    n_rand = n_fake - n_disp
    arange = torch.arange(n_img, device=device)

    # displaced fakes: copies of a random object of the same image, moved outside it
    disp_img = torch.repeat_interleave(arange, n_disp)
    first = torch.cumsum(torch.tensor([0, *counts], device=device), 0)[:-1]
    pick = (torch.rand(disp_img.shape[0], device=device, generator=generator)
            * torch.tensor(list(counts), device=device, dtype=torch.float32)[disp_img]).long()
    src = first[disp_img] + pick
    src_boxes = gt[src]
    src_side = src_boxes[:, 2:] - src_boxes[:, :2]
    src_centre = (src_boxes[:, :2] + src_boxes[:, 2:]) / 2
    off = _displaced_offsets(src_side, displacement[0], displacement[1], sizes[disp_img].flip(-1), src_centre, generator)
    disp_boxes = src_boxes + off.repeat(1, 2)

    rand_img = torch.repeat_interleave(arange, n_rand)
    rand_boxes, rand_labels = _random_fakes(rand_img.shape[0], rand_img, sizes, num_classes, generator)

    all_boxes = torch.cat((gt, disp_boxes, rand_boxes))
    side = all_boxes[:, 2:] - all_boxes[:, :2]
    shift = (torch.rand(side.shape, device=device, generator=generator) * 2 - 1) * jitter * side
    centres = (all_boxes[:, :2] + all_boxes[:, 2:]) / 2 + shift
    n_gt, n_d, n_r = gt.shape[0], disp_boxes.shape[0], rand_boxes.shape[0]
    # a displaced fake reads its source's teacher feature at the source's own (jittered) centre
    feature_centres = torch.cat((centres[:n_gt], src_centre + shift[n_gt:n_gt + n_d], centres[n_gt + n_d:]))
    flags = torch.zeros(n_gt + n_d + n_r, dtype=torch.bool, device=device)
    real = flags.clone()
    real[:n_gt] = True
    displaced = flags.clone()
    displaced[n_gt:n_gt + n_d] = True
    return {
        "boxes": all_boxes,
        "centres": centres,
        "feature_centres": feature_centres,
        "labels": torch.cat((labels, labels[src], rand_labels)),
        "img": torch.cat((img, disp_img, rand_img)),
        "real": real,
        "displaced": displaced,
        "sizes": sizes,
    }


def cells_in_boxes(boxes: Tensor, grid: Sequence[tuple[int, int, float]], margin: float = 0.0) -> Tensor:
    """Bool [B, N, U]: the key cells each box covers, over the key maps' positions in order.

    A cell (y, x) of a level (h, w, stride) is in a box when its centre ``((x + 0.5) s, (y + 0.5) s)``
    lies in ``[x1 - margin s, x2 + margin s) x [y1 - margin s, y2 + margin s)``; the cell holding the
    box's centre is always in (so a box smaller than a cell has one). ``margin = 2``: "within 2 cells".

    Args:
        boxes: [B, N, 4] xyxy px (padded rows give masks that callers ignore).
        grid: per key map (h, w, stride px), in the order the keys concatenate them.
    """
    out = []
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    for h, w, s in grid:
        xs = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) * s
        ys = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) * s
        in_x = (xs >= (x1 - margin * s)[..., None]) & (xs < (x2 + margin * s)[..., None])  # [B, N, w]
        in_y = (ys >= (y1 - margin * s)[..., None]) & (ys < (y2 + margin * s)[..., None])  # [B, N, h]
        inside = in_y[..., :, None] & in_x[..., None, :]  # [B, N, h, w]
        col = (cx / s).floor().long().clamp(0, w - 1)
        row = (cy / s).floor().long().clamp(0, h - 1)
        centre = (torch.arange(h, device=boxes.device)[:, None] == row[..., None, None]) & (
            torch.arange(w, device=boxes.device)[None, :] == col[..., None, None]
        )
        out.append((inside | centre).flatten(-2))
    return torch.cat(out, dim=-1)


def attention_in_box_loss(attention: Tensor, inside: Tensor, real: Tensor, eps: float = 1e-6) -> Tensor:
    """Direct supervision of the attention towards the object (``attention_supervision``, an
    extension beyond the paper): ``-log(eps + sum_{j in box} m_ij)`` averaged over every head and
    real inquiry (0 without any).

    Args:
        attention: [B, heads, N, U] (rows sum to 1).
        inside: bool [B, N, U] (:func:`cells_in_boxes`).
        real: bool [B, N], the inquiries supervised.
    """
    mass = (attention.float() * inside[:, None].float()).sum(-1)  # [B, heads, N]
    picked = mass[real[:, None, :].expand_as(mass)]
    if picked.numel() == 0:
        return mass.sum() * 0.0
    return -(picked + eps).log().mean()


def attention_in_box_share(attention: Tensor, boxes: Sequence[Tensor], grid: Sequence[tuple[int, int, float]],
                           valid: Tensor, inside: Tensor | None = None) -> Tensor:
    """The mean attention mass inside each inquiry's own box (over heads and inquiries; 0 without any):
    what HMKD logs as ``metric.in_box_*``.

    Args:
        attention: [B, heads, N, U] of the inquiries of ``boxes`` (per image, in order).
        boxes: per image [N_b, 4] xyxy px.
        grid: the key maps' (h, w, stride) (:attr:`~hmkd.distill.matching.decoder.KeyValues.grid`).
        valid: bool [B, N], the real rows of ``attention``.
        inside: bool [B, N, U]: the cells of each box, when ``attention`` is not over the key maps'
            cells in order (e.g. over windows); default :func:`cells_in_boxes` of the boxes over ``grid``.
    """
    if inside is None:
        padded, _ = pad_boxes([b.to(device=attention.device, dtype=torch.float32) for b in boxes])
        inside = cells_in_boxes(padded, grid)
    mass = (attention.float() * inside[:, None].float()).sum(-1)  # [B, heads, N]
    weight = valid[:, None, :].float().expand_as(mass)
    return (mass * weight).sum() / weight.sum().clamp(min=1.0)
