"""What each model finds: ground-truth objects matched to detections, for the detection pictures'
``show="found"`` (:func:`hmkd.viz.detections.draw_panels`).

Every panel after the ground truth marks each ground-truth object as found (green: a detection of
its class at or above the score threshold overlaps it with IoU >= 0.5, matched one to one, most
confident first, as COCO does) or missed (red), and, from the second model on, the objects it finds
that the first model misses in yellow; detections that find no object are not drawn, only counted
in the title (``found 14/31 small, 20/40 all; 80 other dets``). The ground-truth panel draws the
objects in white, without tags. This is the picture that shows what one model finds that another
misses, where drawing every detection of a weak model above a low threshold gives a carpet of tags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import ImageDraw
from torchvision.ops import box_iou

from hmkd.errors import ConfigError

FOUND_COLOUR = (40, 220, 40)
MISSED_COLOUR = (255, 40, 40)
NEW_COLOUR = (255, 230, 0)
"""``show="found"``: an object the panel's model finds, misses, and finds where the first model misses it."""
TRUTH_COLOUR = (255, 255, 255)
"""``show="found"``: the ground-truth panel's boxes."""
MATCH_IOU = 0.5
"""A detection finds an object at this IoU or more."""

__all__ = ["FOUND_COLOUR", "MATCH_IOU", "MISSED_COLOUR", "NEW_COLOUR", "TRUTH_COLOUR", "draw_found", "found_line",
           "found_status", "match_to_truth"]


def match_to_truth(
    det: Mapping[str, Any],
    truth: Mapping[str, Any],
    *,
    score_thresh: float = 0.0,
    iou_thresh: float = MATCH_IOU,
) -> torch.Tensor:
    """For each ground-truth object, the index (into ``det``) of the detection that finds it, -1
    where none does: COCO's greedy matching at one IoU threshold. Detections at or above
    ``score_thresh``, most confident first, each take the not yet matched object of their class
    that they overlap most, if that IoU (:func:`torchvision.ops.box_iou`) is at least
    ``iou_thresh``. Crowd objects (``iscrowd``) are never found."""
    gt_boxes = torch.as_tensor(truth["boxes"], dtype=torch.float32).reshape(-1, 4)
    gt_labels = torch.as_tensor(truth["labels"]).reshape(-1)
    crowd = torch.as_tensor(truth.get("iscrowd", torch.zeros(len(gt_boxes))), dtype=torch.bool).reshape(-1)
    boxes = torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(det["labels"]).reshape(-1)
    scores = torch.as_tensor(det["scores"], dtype=torch.float32).reshape(-1)
    found = torch.full((len(gt_boxes),), -1, dtype=torch.int64)
    if not len(gt_boxes) or not len(boxes):
        return found
    iou = box_iou(boxes, gt_boxes)
    iou[labels[:, None] != gt_labels[None, :]] = -1.0
    iou[:, crowd] = -1.0
    for d in torch.argsort(scores, descending=True, stable=True).tolist():
        if scores[d] < score_thresh:
            break
        row = iou[d].clone()
        row[found >= 0] = -1.0
        g = int(row.argmax())
        if row[g] >= iou_thresh:
            found[g] = d
    return found


def found_status(results: Sequence[tuple[str, Mapping[str, Any]]], panels: Sequence[Mapping[str, Any]],
                 score_thresh: float) -> list[dict[str, Any] | None]:
    """Per panel (None for the ground truth) the status of each ground-truth object (``found``,
    ``missed``, ``new``: found where the first model misses it) and the counts (``found`` /
    ``objects``, ``found_small`` / ``small``, ``other``: detections that find nothing; from the
    second model on ``gained``, ``lost`` and ``versus``, the first model's title).

    ``results`` are the picture's ``(title, detections)`` (ground truth: the entry without
    scores); ``panels`` what the picture drew of each: ``truth``, ``crowd`` and ``small`` flags
    and the ``scores`` at or above ``score_thresh``."""
    truth_at = [i for i, p in enumerate(panels) if p["truth"]]
    if not truth_at:
        raise ConfigError("show='found' needs the image's ground truth (an entry without scores) to match detections with")
    truth = results[truth_at[0]][1]
    gt = panels[truth_at[0]]
    real = ~gt["crowd"]
    small = gt["small"]
    out: list[dict[str, Any] | None] = []
    first: torch.Tensor | None = None
    first_title = ""
    for (title, det), p in zip(results, panels):
        if p["truth"]:
            out.append(None)
            continue
        hit = match_to_truth(det, truth, score_thresh=score_thresh) >= 0
        status = ["found" if h else "missed" for h in hit.tolist()]
        info: dict[str, Any] = {
            "status": status,
            "found": int((hit & real).sum()), "objects": int(real.sum()),
            "found_small": int((hit & small).sum()), "small": int(small.sum()),
            "other": len(p["scores"]) - int(hit.sum()),
        }
        if first is None:
            first, first_title = hit, str(title)
        else:
            gained, lost = hit & ~first, first & ~hit
            info.update(gained=int(gained.sum()), lost=int(lost.sum()), versus=first_title)
            info["status"] = ["new" if g else s for g, s in zip(gained.tolist(), status)]
        out.append(info)
    return out


def found_line(f: Mapping[str, Any], score_thresh: float) -> str:
    """A model panel's counts of :func:`found_status` as its title's second line."""
    text = (f"found {f['found_small']}/{f['small']} small, {f['found']}/{f['objects']} all; "
            f"{f['other']} other dets >= {score_thresh:.2f}")
    if "versus" in f:
        text += f"; +{f['gained']}/-{f['lost']} vs {f['versus']}"
    return text


def draw_found(draw: ImageDraw.ImageDraw, truth: Mapping[str, Any], info: Mapping[str, Any] | None,
               x0: int, y0: int, unit: int) -> None:
    """The ground-truth objects (``truth``: the drawn ``boxes`` and ``crowd`` flags) on the panel at
    ``(x0, y0)``, each outlined in the colour of its status in ``info`` (white on the ground-truth
    panel, ``info`` None) over a dark halo, so that it shows on any background; missed ones thin
    and first, found ones thick on top; crowd regions thin grey."""
    status = ["truth"] * len(truth["boxes"]) if info is None else info["status"]
    colour = {"truth": TRUTH_COLOUR, "found": FOUND_COLOUR, "missed": MISSED_COLOUR, "new": NEW_COLOUR}
    rank = {"missed": 0, "truth": 1, "found": 1, "new": 2}
    for j in sorted(range(len(status)), key=lambda j: rank[status[j]]):
        x1, y1, x2, y2 = truth["boxes"][j].tolist()
        rect = [x1 + x0, y1 + y0, max(x1, x2) + x0, max(y1, y2) + y0]
        if truth["crowd"][j]:
            draw.rectangle(rect, outline=(150, 150, 150), width=unit)
            continue
        width = unit if status[j] == "missed" else 3 * unit
        draw.rectangle([rect[0] - unit, rect[1] - unit, rect[2] + unit, rect[3] + unit], outline=(0, 0, 0),
                       width=width + 2 * unit)
        draw.rectangle(rect, outline=colour[status[j]], width=width)
