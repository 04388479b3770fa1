"""COCO metrics of detections against a ground truth: :func:`coco_metrics` and its two engines.

Metrics are COCO-API numbers (pycocotools' ``COCOeval`` protocol: 10 IoU thresholds .50:.95, 101
recall points, maxDets 100, small/medium/large = area < 32^2 / < 96^2 / above), reported in percent
(``COCOeval.stats * 100``). Where COCOeval has nothing to score (e.g. ``APl`` when the ground truth
holds no large object) it returns -1; we report ``nan`` instead (as detectron2 does), and
:func:`hmkd.engine.evaluation.write_eval_outputs` writes it as JSON ``null``.

Engine: ``faster`` (default): faster-coco-eval 1.8's C++ matching and accumulation, whose one
difference from pycocotools (precision ``tp/(tp+fp)`` without pycocotools' ``+eps``, so 1.0 instead
of 1 - 2^-52 where ``tp+fp == 1``) is repaired after accumulation (:func:`match_pycocotools_precision`),
which makes every number bit-identical to pycocotools' ``COCOeval``; ``engine="pycocotools"`` runs
the reference itself. ``tests/engine/test_evaluator.py`` checks the two for exact equality (boxes
and masks, small/medium/large and crowd ground truth, random sets). Detections for ``segm`` are loaded without their
``bbox`` key (as detectron2 does), so a detection's area is its mask area, not its box area.

Besides COCO's, ``aitod_max_dets`` adds AI-TOD's size buckets (very tiny < 8^2, tiny 8^2-16^2, small
16^2-32^2, medium >= 32^2 px^2 of area) under ``"aitod"``: AI-TOD's protocol (its evaluation toolkit's
area ranges and maxDets ``[1, 100, N]``, N = 1500 there, 500 in VisDrone's) on the same engines;
``tests/engine/test_evaluator_aitod.py`` checks it against faster-coco-eval-aitod, the AI-TOD fork.

The detections are COCO results (:mod:`hmkd.engine.coco_results` converts a detector's outputs and
checks a list before it is scored); :mod:`hmkd.engine.inference` produces them over a data set.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hmkd.data.coco import load_coco_json, validate_coco_dict
from hmkd.engine.coco_results import check_detections, segm_problem
from hmkd.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "AITOD_AREAS",
    "AITOD_KEYS",
    "SUMMARY_KEYS",
    "aitod_from_precision",
    "coco_metrics",
    "gc_paused",
    "make_eval",
    "match_pycocotools_precision",
    "quiet",
]

AITOD_AREAS: dict[str, list[float]] = {
    "all": [0.0, 1e5**2], "verytiny": [0.0, 8.0**2], "tiny": [8.0**2, 16.0**2], "small": [16.0**2, 32.0**2],
    "medium": [32.0**2, 1e5**2],
}
"""AI-TOD's area ranges (px^2), in its toolkit's order."""
AITOD_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APvt", "APt", "APs", "APm")
"""The AI-TOD numbers reported under ``"aitod"`` (all at its largest maxDets)."""

SUMMARY_KEYS: tuple[str, ...] = (
    "mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
"""Names of ``COCOeval.stats[0:12]`` in order."""

_IOU_TYPES = ("bbox", "segm")

ENGINE_NAMES = {
    "faster": "scored by faster-coco-eval's COCOeval, made bit-identical to pycocotools'",
    "pycocotools": "scored by pycocotools' COCOeval",
}
"""How the evaluation log names each engine (the numbers are pycocotools' exactly either way)."""


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


def quiet() -> contextlib.AbstractContextManager:
    """Swallow what pycocotools prints to stdout."""
    return contextlib.redirect_stdout(io.StringIO())


def match_pycocotools_precision(ev: Any, gt_data: dict) -> int:
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


def make_eval(engine: str, gt_data: dict, dets: list[dict], iou_type: str) -> Any:
    """Build a COCOeval-like object of the chosen engine, evaluated, accumulated and summarised."""
    if engine == "pycocotools":
        with quiet():
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


def _accumulated(engine: str, data: dict, dets: list[dict], iou_type: str, ids: list[int] | None,
                 **params: Any) -> Any:
    """An evaluation of ``engine`` over ``ids`` (None: every image) with ``params`` set on its
    parameters, evaluated and accumulated, its precision made pycocotools' (faster engine)."""
    ev = make_eval(engine, data, dets, iou_type)
    if ids is not None:
        ev.params.imgIds = ids
    for name, value in params.items():
        setattr(ev.params, name, value)
    with quiet():
        ev.evaluate()
        ev.accumulate()
        if engine == "faster":
            match_pycocotools_precision(ev, data)
    return ev


def _dets_for(iou_type: str, detections: Sequence[dict]) -> list[dict]:
    """Fresh copies of ``detections`` for one evaluation (loadRes adds keys to them): for ``segm``
    without their ``bbox`` (a detection's area is then its mask's), for ``bbox`` without masks."""
    if iou_type == "segm":
        dets = []
        for d in detections:
            if "segmentation" not in d:
                raise ValueError("segm evaluation needs detections with 'segmentation' (with_masks=True)")
            dets.append(copy.deepcopy({k: v for k, v in d.items() if k != "bbox"}))
        return dets
    # shallow copies: loadRes only adds keys to each dict, it never changes the values
    dets = [dict(d) for d in detections]
    if any("segmentation" in d for d in dets):
        for d in dets:
            d.pop("segmentation", None)
    return dets


def _aitod_metrics(
    engine: str, data: dict, dets: list[dict], iou_type: str, ids: list[int] | None, max_dets: int
) -> dict[str, Any]:
    """AI-TOD's numbers: the same evaluation with its area ranges and maxDets ``[1, 100, max_dets]``."""
    ev = _accumulated(engine, data, dets, iou_type, ids, areaRng=[list(r) for r in AITOD_AREAS.values()],
                      areaRngLbl=list(AITOD_AREAS), maxDets=[1, 100, max_dets])
    out: dict[str, Any] = {"max_dets": max_dets}
    out.update(aitod_from_precision(np.asarray(ev.eval["precision"]), ev.params.iouThrs))
    return out


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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
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


def _pct(x: float) -> float:
    return float(x) * 100.0 if x >= 0 else math.nan


def _mean_ap(precision: np.ndarray) -> float:
    p = precision[precision > -1]
    return float(p.mean() * 100.0) if p.size else math.nan


def aitod_from_precision(precision: np.ndarray, iou_thrs: Sequence[float]) -> dict[str, float]:
    """AI-TOD's AP numbers (percent) from an accumulated ``precision [T, R, K, A, M]`` whose areas are
    :data:`AITOD_AREAS` in order: each the mean over the entries > -1 at the last maxDets, as
    COCOeval's ``_summarize`` computes them."""
    thr = np.asarray(iou_thrs, dtype=np.float64)
    a = {name: i for i, name in enumerate(AITOD_AREAS)}
    at = lambda t: np.flatnonzero(np.isclose(thr, t))  # noqa: E731
    return {
        "AP": _mean_ap(precision[:, :, :, a["all"], -1]),
        "AP50": _mean_ap(precision[at(0.5), :, :, a["all"], -1]),
        "AP75": _mean_ap(precision[at(0.75), :, :, a["all"], -1]),
        "APvt": _mean_ap(precision[:, :, :, a["verytiny"], -1]),
        "APt": _mean_ap(precision[:, :, :, a["tiny"], -1]),
        "APs": _mean_ap(precision[:, :, :, a["small"], -1]),
        "APm": _mean_ap(precision[:, :, :, a["medium"], -1]),
    }


def coco_metrics(
    gt: str | os.PathLike | dict,
    detections: Sequence[dict],
    iou_types: Sequence[str] = ("bbox",),
    class_names: Sequence[str] | None = None,
    *,
    image_ids: Iterable[int] | None = None,
    engine: str = "faster",
    aitod_max_dets: int | None = None,
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
            precision made bit-identical to pycocotools', see :func:`match_pycocotools_precision`)
            or ``"pycocotools"`` (the reference COCOeval).
        aitod_max_dets: also score AI-TOD's size buckets (:data:`AITOD_AREAS`) with maxDets
            ``[1, 100, aitod_max_dets]`` (AI-TOD: 1500, VisDrone: 500); None: COCO's metrics only.

    Returns:
        ``{iou_type: {"mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
        "ARm", "ARl", "per_class": {name: AP}}}`` (plus ``"aitod": {"max_dets", "AP", "AP50", "AP75",
        "APvt", "APt", "APs", "APm"}`` with ``aitod_max_dets``); ``nan`` where COCOeval has nothing to score.
    """
    if aitod_max_dets is not None and int(aitod_max_dets) < 100:
        raise ValueError(f"aitod_max_dets must be >= 100 (AI-TOD's maxDets are [1, 100, N]), got {aitod_max_dets}")
    with gc_paused():
        return _coco_metrics(gt, detections, iou_types, class_names, image_ids, engine, aitod_max_dets)


def _coco_metrics(
    gt: str | os.PathLike | dict,
    detections: Sequence[dict],
    iou_types: Sequence[str],
    class_names: Sequence[str] | None,
    image_ids: Iterable[int] | None,
    engine: str,
    aitod_max_dets: int | None = None,
) -> dict[str, dict[str, Any]]:
    gt_data = _load_gt_dict(gt)
    cat_ids = sorted(c["id"] for c in gt_data["categories"])
    names = _class_names(gt_data, cat_ids, class_names)
    known_imgs = {im["id"]: im for im in gt_data["images"]}
    check_detections(detections, known_imgs, iou_types)
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
                problem = segm_problem(a["segmentation"], im["height"], im["width"])
                if problem is not None:  # pycocotools would crash or read out of bounds on it
                    raise DataError(f"ground truth annotation id {a.get('id')} has an unusable segmentation ({problem})")
        dets = _dets_for(iou_type, detections)
        ev = _accumulated(engine, data, dets, iou_type, ids)
        with quiet():
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
        if aitod_max_dets is not None:
            out["aitod"] = _aitod_metrics(engine, data, _dets_for(iou_type, detections), iou_type, ids, int(aitod_max_dets))
        results[iou_type] = out
        logger.info(
            "%s: mAP %.2f AP50 %.2f AP75 %.2f APs %.2f APm %.2f APl %.2f (%d detections on %d images; %s)",
            iou_type, out["mAP"], out["AP50"], out["AP75"], out["APs"], out["APm"], out["APl"], len(dets),
            len(ids) if ids is not None else len(known_imgs), ENGINE_NAMES.get(engine, engine),
        )
    return results
