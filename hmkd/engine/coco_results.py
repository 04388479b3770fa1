"""The COCO results format: torchvision detector outputs converted to it, and a list of results
checked before it is scored.

A result is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"(, "segmentation": RLE)}``.
:func:`check_detections` turns what pycocotools would meet with a raw KeyError/TypeError/IndexError
(or, for a bad RLE, undefined behaviour) into a one-line :class:`~hmkd.errors.DataError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from hmkd.data.coco import is_number, segmentation_problem
from hmkd.errors import DataError

__all__ = ["bbox_detections_look_valid", "check_detections", "detections_to_coco", "segm_problem"]


def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat: Mapping[int, int],
    with_masks: bool = False,
    drop_unknown: bool = False,
) -> list[dict]:
    """Convert torchvision detection outputs to the COCO results format.

    Label 0 is the background, never a category: a detection with it (torchvision's own RetinaNet
    and FCOS heads can emit one; hmkd's pin it away) is left out.

    Args:
        outputs: one dict per image with ``boxes`` (xyxy, original image pixels), ``scores``,
            ``labels`` (contiguous 1..K) and, with masks, ``masks`` (``[N, 1, H, W]`` probabilities
            or ``[N, H, W]``).
        image_ids: the COCO image id of each output.
        label_to_cat: contiguous label → the data set's own category id.
        with_masks: also emit ``segmentation`` (mask > 0.5, compressed RLE, counts as str).
        drop_unknown: leave out detections whose label has no category (``data.label_map:
            category_id``: a label between two category ids, e.g. one of torchvision's "N/A" COCO
            outputs) instead of raising.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"(, "segmentation")}, ...]``.

    Raises:
        DataError: a label has no category (model and data set disagree on the classes).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"detections_to_coco: {len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict] = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().to("cpu", torch.float64)
        if boxes.numel() == 0:
            continue
        scores = out["scores"].detach().to("cpu", torch.float64).tolist()
        labels = out["labels"].detach().to("cpu").tolist()
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        xywh = xywh.tolist()
        rles = None
        if with_masks:
            if "masks" not in out:
                raise ValueError("detections_to_coco: with_masks=True but the output has no 'masks'")
            m = out["masks"].detach().to("cpu")
            if m.dim() == 4:
                m = m[:, 0]
            binary = (m > 0.5) if m.is_floating_point() else (m > 0)
            arr = np.asfortranarray(binary.numpy().astype(np.uint8).transpose(1, 2, 0))
            rles = mask_utils.encode(arr)
        for k, (label, box, score) in enumerate(zip(labels, xywh, scores)):
            if label not in label_to_cat:
                if label == 0 or drop_unknown:
                    continue
                raise DataError(
                    f"model label {label} has no category in the data set (labels "
                    f"{min(label_to_cat)}..{max(label_to_cat)}); check the model's num_classes"
                )
            r = {"image_id": int(img_id), "category_id": int(label_to_cat[label]), "bbox": box, "score": score}
            if rles is not None:
                rle = rles[k]
                r["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def segm_problem(seg: Any, h: int, w: int) -> str | None:
    """Why a polygon list or RLE ``seg`` cannot be used on an ``h`` x ``w`` image, or None."""
    if isinstance(seg, list):
        if not all(isinstance(p, list) for p in seg):
            return "polygons must be lists of numbers"
    elif not isinstance(seg, dict) or "counts" not in seg:
        return "neither polygons nor an RLE"
    return segmentation_problem(seg, h, w)


_NUMBER_TYPES = (int, float)  # as data.coco.is_number (np.float64 is a float, np.int64 is not)


def _all_numbers(types: set[type]) -> bool:
    return all(issubclass(t, _NUMBER_TYPES) and not issubclass(t, bool) for t in types)


def bbox_detections_look_valid(detections: Sequence[Any], images: Mapping[int, dict]) -> bool:
    """Whole-list (C-speed) form of :func:`check_detections`' bbox checks: True when every
    detection certainly passes them; False sends the caller to the per-detection loop, which
    names the first bad one (the fast path may also be stricter, never looser)."""
    try:
        if set(map(type, detections)) != {dict}:
            return False
        img_ids, cat_ids, scores, boxes = zip(*map(itemgetter("image_id", "category_id", "score", "bbox"), detections))
        if not set(img_ids) <= images.keys():  # a list/dict id is unhashable: TypeError below
            return False
        if set(map(type, cat_ids)) & {list, dict}:
            return False
        if set(map(type, boxes)) - {list, tuple} or set(map(len, boxes)) != {4}:
            return False
        flat = list(chain.from_iterable(boxes))
        if not (_all_numbers(set(map(type, scores))) and _all_numbers(set(map(type, flat)))):
            return False
        return bool(np.isfinite(np.asarray(scores, dtype=np.float64)).all()
                    and np.isfinite(np.asarray(flat, dtype=np.float64)).all())
    except (KeyError, TypeError, ValueError, OverflowError):
        return False


def check_detections(detections: Sequence[Any], images: Mapping[int, dict], iou_types: Sequence[str]) -> None:
    """One-line DataErrors for malformed COCO results, which pycocotools would meet with a raw
    KeyError/TypeError/IndexError (or, for a bad RLE, undefined behaviour)."""
    if "segm" not in iou_types and detections and bbox_detections_look_valid(detections, images):
        return
    for i, d in enumerate(detections):
        if not isinstance(d, Mapping):
            raise DataError(f"detections[{i}] is not an object: {d!r:.80}")
        img_id = d.get("image_id")
        if isinstance(img_id, (list, dict)) or img_id not in images:
            raise DataError(f"detection for image_id {img_id!r}, which is not in the ground truth")
        for key in ("category_id", "score"):
            if key not in d:
                raise DataError(f"detections[{i}] (image_id {img_id}) has no '{key}'")
        if isinstance(d["category_id"], (list, dict)):
            raise DataError(f"detections[{i}] (image_id {img_id}) category_id {d['category_id']!r} is not an id")
        if not is_number(d["score"]):
            raise DataError(f"detections[{i}] (image_id {img_id}) score {d['score']!r} is not a finite number")
        if "bbox" in iou_types:
            box = d.get("bbox")
            if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(is_number(v) for v in box):
                raise DataError(f"detections[{i}] (image_id {img_id}) bbox {box!r:.80} is not 4 finite numbers")
        if "segm" in iou_types and "segmentation" in d:
            im, seg = images[img_id], d["segmentation"]
            if not isinstance(seg, Mapping) or not isinstance(seg.get("counts"), (str, bytes)):
                problem = "not a compressed RLE {'size', 'counts': str} as COCO results need"
            else:
                problem = segm_problem(dict(seg), im["height"], im["width"])
            if problem is not None:
                raise DataError(f"detections[{i}] (image_id {img_id}) has an unusable segmentation ({problem})")
