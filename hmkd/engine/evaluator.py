"""COCO evaluation of torchvision detectors: results conversion, metrics, evaluator, inference loop.

Metrics are COCO-API numbers (pycocotools' ``COCOeval`` protocol: 10 IoU thresholds .50:.95, 101
recall points, maxDets 100, small/medium/large = area < 32^2 / < 96^2 / above), reported in percent
(``COCOeval.stats * 100``). Where COCOeval has nothing to score (e.g. ``APl`` when the ground truth
holds no large object) it returns -1; we report ``nan`` instead (as detectron2 does), and
:func:`write_eval_outputs` writes it as JSON ``null``.

Engine: ``faster`` (default): faster-coco-eval 1.8's C++ matching and accumulation, whose one
difference from pycocotools (precision ``tp/(tp+fp)`` without pycocotools' ``+eps``, so 1.0 instead
of 1 - 2^-52 where ``tp+fp == 1``) is repaired after accumulation (:func:`_match_pycocotools_precision`),
which makes every number bit-identical to pycocotools' ``COCOeval``; ``engine="pycocotools"`` runs
the reference itself. ``tests/engine/test_evaluator.py`` checks the two for exact equality (boxes
and masks, small/medium/large and crowd ground truth, random sets). Detections for ``segm`` are loaded without their
``bbox`` key (as detectron2 does), so a detection's area is its mask area, not its box area.

Distributed runs: :class:`COCOEvaluator` and :func:`inference_on_dataset` gather results from all
ranks (``all_gather_object``) and drop the duplicate images a ``DistributedSampler`` pads with.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from hmkd.data.coco import _is_number, load_coco_json, segmentation_problem, validate_coco_dict
from hmkd.errors import DataError, HMKDError

logger = logging.getLogger(__name__)

__all__ = [
    "COCOEvaluator",
    "coco_metrics",
    "detections_to_coco",
    "inference_on_dataset",
    "write_eval_outputs",
    "SUMMARY_KEYS",
]

SUMMARY_KEYS: tuple[str, ...] = (
    "mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
"""Names of ``COCOeval.stats[0:12]`` in order."""

_IOU_TYPES = ("bbox", "segm")


# ------------------------------------------------------------------------------------ conversion
def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat: Mapping[int, int],
    with_masks: bool = False,
) -> list[dict]:
    """Convert torchvision detection outputs to the COCO results format.

    Args:
        outputs: one dict per image with ``boxes`` (xyxy, original image pixels), ``scores``,
            ``labels`` (contiguous 1..K) and, with masks, ``masks`` (``[N, 1, H, W]`` probabilities
            or ``[N, H, W]``).
        image_ids: the COCO image id of each output.
        label_to_cat: contiguous label → the data set's own category id.
        with_masks: also emit ``segmentation`` (mask > 0.5, compressed RLE, counts as str).

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


# ------------------------------------------------------------------------------------ metrics
def _load_gt_dict(gt: str | os.PathLike | dict) -> dict:
    """A private, validated copy of the ground truth (COCOeval mutates the annotations it reads)."""
    if isinstance(gt, dict):
        # validation and COCOeval only set top-level keys of the image/annotation/category dicts
        # (id, area, iscrowd, ignore, segmentation := RLE), never change nested values in place,
        # so a copy of every such dict keeps the caller's data intact (a deep copy costs ~10x more)
        data = dict(gt)
        for key in ("images", "annotations", "categories"):
            if isinstance(gt.get(key), list):
                data[key] = [dict(x) if isinstance(x, dict) else copy.deepcopy(x) for x in gt[key]]
        validate_coco_dict(data, "<ground-truth dict>")
        return data
    return load_coco_json(gt)


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())


def _match_pycocotools_precision(ev: Any, gt_data: dict) -> int:
    """Make faster-coco-eval's accumulated ``precision`` bit-identical to pycocotools'.

    faster-coco-eval's C++ accumulate computes a precision point as ``tp / (tp + fp)``,
    pycocotools as ``tp / (tp + fp + eps)``. They differ only where ``tp + fp == 1`` (1.0 against
    1 - 2^-52): the first stretch of a curve whose first non-ignored detection is a true positive
    and whose second is not; after the precision envelope, pycocotools' value is what it samples
    at every recall threshold ``r <= 1/npig`` (``npig``: the curve's non-ignored ground truths).
    Matching and recall are the same. A second C++ accumulate over the same per-image evaluations at
    recall thresholds ``{1/npig, 2/npig}`` finds those curves (precision 1.0 at the first true
    positive, < 1.0 at the second) without re-matching; their entries get pycocotools' value.
    Returns the number of entries changed. (Found and prototyped in hmkd.bench.evalspeed.)
    """
    import faster_coco_eval.faster_eval_api_cpp as _C

    p = ev._paramsEval
    prec = ev.eval["precision"]
    t_n, _, k_n, a_n, m_n = prec.shape
    cidx = {c: i for i, c in enumerate(p.catIds)} if p.useCats else None
    imgs = set(p.imgIds)
    area_rng = np.asarray(p.areaRng, dtype=np.float64)
    npig = np.zeros((k_n, a_n), dtype=np.int64)  # pycocotools' count of gtIgnore == 0 per curve
    for ann in gt_data["annotations"]:
        if ann["image_id"] not in imgs or ann.get("iscrowd", 0) or ann.get("ignore", 0):
            continue
        k = cidx.get(ann["category_id"]) if cidx is not None else 0
        if k is not None:
            npig[k] += ~((ann["area"] < area_rng[:, 0]) | (ann["area"] > area_rng[:, 1]))
    ns = np.unique(npig[npig > 0])
    if not ns.size:
        return 0
    thr = np.unique(np.concatenate([1.0 / ns, 2.0 / ns]))
    p2 = copy.deepcopy(p)
    p2.recThrs = thr.tolist()
    e2 = np.asarray(_C.COCOevalAccumulate(p2, ev._evalImgs_cpp)["precision"]).reshape(t_n, len(thr), k_n, a_n, m_n)
    rec = np.asarray(p.recThrs, dtype=np.float64)
    one = np.ones(1, dtype=np.float64)
    value = (one / (one * 0.0 + one + np.spacing(1)))[0]  # pycocotools' tp / (tp + fp + eps) at tp=1, fp=0
    fixed = 0
    for k, a in zip(*np.nonzero(npig)):
        n = npig[k, a]
        i1, i2 = np.searchsorted(thr, 1.0 / n), np.searchsorted(thr, 2.0 / n)
        cond = (e2[:, i1, k, a, :] == 1.0) & (e2[:, i2, k, a, :] < 1.0)  # [T, M]
        rmask = rec <= 1.0 / n
        for t, m in zip(*np.nonzero(cond)):
            prec[t, rmask, k, a, m] = value
            fixed += int(rmask.sum())
    return fixed


def _make_eval(engine: str, gt_data: dict, dets: list[dict], iou_type: str) -> Any:
    """Build a COCOeval-like object of the chosen engine, evaluated, accumulated and summarised."""
    if engine == "pycocotools":
        with _quiet():
            gt = COCO()
            gt.dataset = gt_data
            gt.createIndex()
            if dets:
                dt = gt.loadRes(dets)
            else:
                dt = COCO()
                dt.dataset = {"images": list(gt_data["images"]), "categories": copy.deepcopy(gt_data["categories"]),
                              "annotations": []}
                dt.createIndex()
            ev = COCOeval(gt, dt, iou_type)
        return ev
    if engine == "faster":
        from faster_coco_eval import COCO as FCOCO
        from faster_coco_eval import COCOeval_faster

        gt = FCOCO(gt_data, print_function=logger.debug)
        if dets:
            dt = gt.loadRes(dets)
        else:
            dt = FCOCO(
                {"images": list(gt_data["images"]), "categories": copy.deepcopy(gt_data["categories"]),
                 "annotations": []},
                print_function=logger.debug,
            )
        return COCOeval_faster(gt, dt, iou_type, print_function=logger.debug, separate_eval=True)
    raise ValueError(f"unknown COCO evaluation engine {engine!r}; use 'pycocotools' or 'faster'")


def _class_names(gt_data: dict, cat_ids: list[int], class_names: Sequence[str] | None) -> list[str]:
    if class_names is not None:
        names = list(class_names)
        if len(names) == len(cat_ids) + 1:
            names = names[1:]  # drop "__background__"
        if len(names) != len(cat_ids):
            raise ValueError(
                f"class_names has {len(class_names)} entries but the ground truth has {len(cat_ids)} categories"
            )
    else:
        by_id = {c["id"]: str(c.get("name", f"class_{c['id']}")) for c in gt_data["categories"]}
        names = [by_id[c] for c in cat_ids]
    out, seen = [], set()
    for name, cid in zip(names, cat_ids):
        key = name if name not in seen else f"{name} ({cid})"
        seen.add(key)
        out.append(key)
    return out


def _segm_problem(seg: Any, h: int, w: int) -> str | None:
    if isinstance(seg, list):
        if not all(isinstance(p, list) for p in seg):
            return "polygons must be lists of numbers"
    elif not isinstance(seg, dict) or "counts" not in seg:
        return "neither polygons nor an RLE"
    return segmentation_problem(seg, h, w)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (restored after, even on error).

    Loading COCO results creates one dict (and a list) per detection; with the collector on, each
    ~700 new containers trigger a collection that walks the young objects, and the older
    generations are walked again and again as the results pile up: on 500k detections that is ~2 s
    of a ~5.5 s evaluation (measured, ``hmkd bench evalspeed``). Pausing it only delays freeing
    cyclic garbage until the block ends (reference counting still frees everything else at once);
    it changes no number.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_NUMBER_TYPES = (int, float)  # as data.coco._is_number (np.float64 is a float, np.int64 is not)


def _all_numbers(types: set[type]) -> bool:
    return all(issubclass(t, _NUMBER_TYPES) and not issubclass(t, bool) for t in types)


def _bbox_detections_look_valid(detections: Sequence[Any], images: Mapping[int, dict]) -> bool:
    """Whole-list (C-speed) form of :func:`_check_detections`' bbox checks: True when every
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


def _check_detections(detections: Sequence[Any], images: Mapping[int, dict], iou_types: Sequence[str]) -> None:
    """One-line DataErrors for malformed COCO results, which pycocotools would meet with a raw
    KeyError/TypeError/IndexError (or, for a bad RLE, undefined behaviour)."""
    if "segm" not in iou_types and detections and _bbox_detections_look_valid(detections, images):
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
        if not _is_number(d["score"]):
            raise DataError(f"detections[{i}] (image_id {img_id}) score {d['score']!r} is not a finite number")
        if "bbox" in iou_types:
            box = d.get("bbox")
            if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise DataError(f"detections[{i}] (image_id {img_id}) bbox {box!r:.80} is not 4 finite numbers")
        if "segm" in iou_types and "segmentation" in d:
            im, seg = images[img_id], d["segmentation"]
            if not isinstance(seg, Mapping) or not isinstance(seg.get("counts"), (str, bytes)):
                problem = "not a compressed RLE {'size', 'counts': str} as COCO results need"
            else:
                problem = _segm_problem(dict(seg), im["height"], im["width"])
            if problem is not None:
                raise DataError(f"detections[{i}] (image_id {img_id}) has an unusable segmentation ({problem})")


def _pct(x: float) -> float:
    return float(x) * 100.0 if x >= 0 else math.nan


def coco_metrics(
    gt: str | os.PathLike | dict,
    detections: Sequence[dict],
    iou_types: Sequence[str] = ("bbox",),
    class_names: Sequence[str] | None = None,
    *,
    image_ids: Iterable[int] | None = None,
    engine: str = "faster",
) -> dict[str, dict[str, Any]]:
    """COCO metrics of ``detections`` against ``gt``, in percent.

    Args:
        gt: COCO ground truth, a JSON path or a COCO-format dict (not modified).
        detections: COCO results (see :func:`detections_to_coco`); may be empty.
        iou_types: any of ``"bbox"``, ``"segm"``.
        class_names: names for ``per_class`` in sorted-category-id order (with or without a leading
            ``"__background__"``); default: the ground truth's category names.
        image_ids: evaluate only these images (default: every image of ``gt``).
        engine: ``"faster"`` (default: faster-coco-eval's C++ matching and accumulation, its
            precision made bit-identical to pycocotools', see :func:`_match_pycocotools_precision`)
            or ``"pycocotools"`` (the reference COCOeval).

    Returns:
        ``{iou_type: {"mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
        "ARm", "ARl", "per_class": {name: AP}}}``; ``nan`` where COCOeval has nothing to score.
    """
    with _gc_paused():
        return _coco_metrics(gt, detections, iou_types, class_names, image_ids, engine)


def _coco_metrics(
    gt: str | os.PathLike | dict,
    detections: Sequence[dict],
    iou_types: Sequence[str],
    class_names: Sequence[str] | None,
    image_ids: Iterable[int] | None,
    engine: str,
) -> dict[str, dict[str, Any]]:
    gt_data = _load_gt_dict(gt)
    cat_ids = sorted(c["id"] for c in gt_data["categories"])
    names = _class_names(gt_data, cat_ids, class_names)
    known_imgs = {im["id"]: im for im in gt_data["images"]}
    _check_detections(detections, known_imgs, iou_types)
    ids = None if image_ids is None else sorted({int(i) for i in image_ids})
    if ids is not None:
        missing = [i for i in ids if i not in known_imgs]
        if missing:
            raise DataError(f"image_ids {missing[:5]} are not in the ground truth")
    results: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        if iou_type not in _IOU_TYPES:
            raise ValueError(f"iou_type {iou_type!r} is not supported; use one of {_IOU_TYPES}")
        data = gt_data if len(iou_types) == 1 else copy.deepcopy(gt_data)
        if iou_type == "segm":
            for a in data["annotations"]:
                if "segmentation" not in a or a["segmentation"] in (None, []):
                    raise DataError(
                        f"ground truth annotation id {a.get('id')} has no 'segmentation'; segm evaluation needs masks"
                    )
                im = known_imgs[a["image_id"]]
                problem = _segm_problem(a["segmentation"], im["height"], im["width"])
                if problem is not None:  # pycocotools would crash or read out of bounds on it
                    raise DataError(f"ground truth annotation id {a.get('id')} has an unusable segmentation ({problem})")
            dets = []
            for d in detections:
                if "segmentation" not in d:
                    raise ValueError("segm evaluation needs detections with 'segmentation' (with_masks=True)")
                d2 = {k: v for k, v in d.items() if k != "bbox"}
                dets.append(copy.deepcopy(d2))
        else:
            # shallow copies: loadRes only adds keys to each dict, it never changes the values
            dets = [dict(d) for d in detections]
            if any("segmentation" in d for d in dets):
                for d in dets:
                    d.pop("segmentation", None)
        ev = _make_eval(engine, data, dets, iou_type)
        if ids is not None:
            ev.params.imgIds = ids
        with _quiet():
            ev.evaluate()
            ev.accumulate()
            if engine == "faster":
                _match_pycocotools_precision(ev, data)
            ev.summarize()
        stats = [float(s) for s in ev.stats[: len(SUMMARY_KEYS)]]
        out: dict[str, Any] = {k: _pct(v) for k, v in zip(SUMMARY_KEYS, stats)}
        precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
        eval_cats = list(ev.params.catIds)
        per_class = {}
        for name, cid in zip(names, cat_ids):
            k = eval_cats.index(cid)
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[name] = float(p.mean() * 100.0) if p.size else math.nan
        out["per_class"] = per_class
        results[iou_type] = out
        logger.info(
            "%s: mAP %.2f AP50 %.2f AP75 %.2f APs %.2f APm %.2f APl %.2f (%d detections, %s)",
            iou_type, out["mAP"], out["AP50"], out["AP75"], out["APs"], out["APm"], out["APl"], len(dets), engine,
        )
    return results


# ------------------------------------------------------------------------------------ distributed
def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_unique(image_ids: list[int], results: list[dict]) -> tuple[list[int], list[dict]]:
    """All-gather (image ids, results) and keep each image's results from the first rank that had it."""
    if _dist_world() == 1:
        return image_ids, results
    parts: list[Any] = [None] * _dist_world()
    dist.all_gather_object(parts, (image_ids, results))
    seen: set[int] = set()
    all_ids: list[int] = []
    all_results: list[dict] = []
    for ids, res in parts:
        new = [i for i in dict.fromkeys(ids) if i not in seen]
        new_set = set(new)
        all_ids.extend(new)
        all_results.extend(r for r in res if r["image_id"] in new_set)
        seen.update(new)
    return all_ids, all_results


# ------------------------------------------------------------------------------------ evaluator
class COCOEvaluator:
    """detectron2-style evaluator: ``reset()``, ``process(targets, outputs)``, ``evaluate()``.

    Only the images seen by ``process`` are scored, so evaluating on part of a data set does not
    count the unseen images' objects as misses.

    Args:
        gt: COCO ground truth (path or dict), e.g. ``hmkd.data.gt_json_for(dataset)``.
        label_to_cat: contiguous label → category id (``dataset.label_to_cat``).
        iou_types: ``("bbox",)``, ``("segm",)`` or both.
        class_names: names for ``per_class`` (``dataset.class_names``).
        engine: ``"pycocotools"`` or ``"faster"``.
    """

    def __init__(
        self,
        gt: str | os.PathLike | dict,
        label_to_cat: Mapping[int, int],
        iou_types: Sequence[str] = ("bbox",),
        class_names: Sequence[str] | None = None,
        *,
        engine: str = "faster",
    ) -> None:
        self.gt = gt
        self.label_to_cat = dict(label_to_cat)
        self.iou_types = tuple(iou_types)
        self.class_names = None if class_names is None else list(class_names)
        self.engine = engine
        self.with_masks = "segm" in self.iou_types
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        self._image_ids: list[int] = []
        self._results: list[dict] = []

    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add a batch: ``targets`` give ``image_id``, ``outputs`` are the model's detections."""
        ids = [int(t["image_id"]) for t in targets]
        self._image_ids.extend(ids)
        self._results.extend(detections_to_coco(outputs, ids, self.label_to_cat, with_masks=self.with_masks))

    @property
    def detections(self) -> list[dict]:
        """COCO results processed so far (this rank only)."""
        return self._results

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Metrics over every processed image (gathered over ranks; ``{}`` on ranks other than 0)."""
        ids, results = _gather_unique(self._image_ids, self._results)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return {}
        if not ids:
            logger.warning("COCOEvaluator.evaluate: no image was processed")
            return {}
        return coco_metrics(self.gt, results, self.iou_types, self.class_names, image_ids=ids, engine=self.engine)


# ------------------------------------------------------------------------------------ loaders
def _len_or_none(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def next_batch(it: Iterator) -> Any:
    """``next(it)`` of a DataLoader iterator, keeping the project's one-line error messages.

    An :class:`~hmkd.errors.HMKDError` raised in a DataLoader worker comes back from torch as the
    same type with the message ``Caught DataError in DataLoader worker process N.`` followed by
    the worker's traceback; it is re-raised with the original one-line message (its last line).
    """
    try:
        return next(it)
    except HMKDError as e:
        msg = str(e)
        if "\n" not in msg:
            raise
        last = msg.rstrip().splitlines()[-1].strip()
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        raise type(e)(last[len(prefix):] if last.startswith(prefix) else last) from None


def close_loader_iter(it: Any) -> None:
    """Stop a DataLoader iterator's worker processes now.

    Left to garbage collection, a multi-process iterator that an exception keeps alive is only
    cleaned up at interpreter exit, where torch does nothing and ``multiprocessing`` stops the
    workers with SIGTERM, which our workers ignore (see ``hmkd.engine.trainer._worker_init``):
    the process would hang on exit instead of reporting the error.
    """
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# ------------------------------------------------------------------------------------ inference
def inference_on_dataset(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str,
    label_to_cat: Mapping[int, int],
    with_masks: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Run a torchvision detection model over a loader of ``(images, targets)`` and collect COCO results.

    The model is put in eval mode (its previous mode is restored) and run under
    ``torch.inference_mode()``; it must return boxes in the coordinates of the images it is given
    (torchvision detectors do). In a distributed run the results of all ranks are gathered.

    Returns:
        COCO results (see :func:`detections_to_coco`).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    n_images, compute_time = 0, 0.0
    start = time.perf_counter()
    it = iter(loader)
    try:
        with torch.inference_mode():
            bar = tqdm(total=_len_or_none(loader), desc="inference", disable=not progress, dynamic_ncols=True)
            while True:
                try:
                    images, targets = next_batch(it)
                except StopIteration:
                    break
                bar.update(1)
                images = [img.to(device, non_blocking=True) for img in images]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                outputs = model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compute_time += time.perf_counter() - t0
                outputs = [{k: v.to("cpu") for k, v in o.items()} for o in outputs]
                ids = [int(t["image_id"]) for t in targets]
                image_ids.extend(ids)
                results.extend(detections_to_coco(outputs, ids, label_to_cat, with_masks=with_masks))
                n_images += len(images)
            bar.close()
    finally:
        close_loader_iter(it)
        model.train(was_training)
    total = time.perf_counter() - start
    logger.info(
        "inference: %d images in %.1f s (model %.3f s/image), %d detections",
        n_images, total, compute_time / max(n_images, 1), len(results),
    )
    _, results = _gather_unique(image_ids, results)
    return results


# ------------------------------------------------------------------------------------ outputs
def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_eval_outputs(out_dir: str | os.PathLike, metrics: Mapping[str, Any], detections: Sequence[dict]) -> dict[str, str]:
    """Write ``metrics.json`` and ``detections.json`` into ``out_dir`` atomically.

    Each file is written to a temporary file in the same folder and renamed over the target, so a
    reader never sees a half-written file. Non-finite metrics (``nan``) are written as ``null``.

    Returns:
        ``{"metrics": path, "detections": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "detections": out / "detections.json"}
    _write_json_atomic(paths["metrics"], _json_safe(metrics))
    _write_json_atomic(paths["detections"], _json_safe(list(detections)))
    return {k: str(v) for k, v in paths.items()}
