"""AI-TOD's size buckets in :func:`hmkd.engine.evaluator.coco_metrics`: the same numbers as the AI-TOD
evaluation (faster-coco-eval-aitod, the AI-TOD fork of faster-coco-eval) and as pycocotools run with
AI-TOD's parameters, on ground truth spanning every bucket and more than 100 detections per image."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hmkd.engine.evaluator import AITOD_AREAS, AITOD_KEYS, aitod_from_precision, coco_metrics, quiet


def _random_set(seed: int, n_images: int = 6, per_image: int = 160) -> tuple[dict, list[dict]]:
    """Ground truth with object sides from 3 to 80 px (every AI-TOD bucket), three classes, and
    ``per_image`` detections per image (maxDets limits them per image and class): jittered copies of the objects (some of the wrong class) and clutter."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 400, "height": 400})
        n_obj = int(rng.integers(20, 60))
        for _ in range(n_obj):
            side = float(np.exp(rng.uniform(np.log(3), np.log(80))))
            w, h = side * rng.uniform(0.8, 1.25), side * rng.uniform(0.8, 1.25)
            x, y = rng.uniform(0, 400 - w), rng.uniform(0, 400 - h)
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if rng.random() < 0.8:
                jit = rng.normal(0, 0.15 * side, 4)
                dets.append({"image_id": i, "category_id": cat if rng.random() < 0.85 else int(rng.integers(1, 4)),
                             "bbox": [x + jit[0], y + jit[1], max(1.0, w + jit[2]), max(1.0, h + jit[3])],
                             "score": float(rng.uniform(0.05, 1.0))})
        n_clutter = per_image - sum(1 for d in dets if d["image_id"] == i)
        for _ in range(max(0, n_clutter)):
            s = float(np.exp(rng.uniform(np.log(3), np.log(60))))
            dets.append({"image_id": i, "category_id": int(rng.integers(1, 4)),
                         "bbox": [rng.uniform(0, 390), rng.uniform(0, 390), s, s], "score": float(rng.uniform(0.0, 0.6))})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    return gt, dets


def _pycocotools_aitod(gt: dict, dets: list[dict], max_dets: int) -> dict[str, float]:
    with quiet():
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.params.areaRng = [list(r) for r in AITOD_AREAS.values()]
        ev.params.areaRngLbl = list(AITOD_AREAS)
        ev.params.maxDets = [1, 100, max_dets]
        ev.evaluate()
        ev.accumulate()
    return aitod_from_precision(ev.eval["precision"], ev.params.iouThrs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_aitod_buckets_equal_pycocotools_with_aitod_parameters(seed: int, engine: str) -> None:
    gt, dets = _random_set(seed)
    ours = coco_metrics(gt, dets, engine=engine, aitod_max_dets=1500)["bbox"]["aitod"]
    ref = _pycocotools_aitod(gt, dets, 1500)
    assert ours["max_dets"] == 1500
    for k in AITOD_KEYS:
        assert ours[k] == ref[k], k  # bit for bit
    assert all(math.isfinite(ours[k]) for k in AITOD_KEYS)


@pytest.mark.parametrize("max_dets", [1500, 120])
def test_aitod_buckets_match_the_aitod_fork(max_dets: int) -> None:
    """faster-coco-eval-aitod (AI-TOD's evaluation): stats 0, 2, 3 are AP, AP50, AP75 and 4-7 the
    very tiny, tiny, small and medium APs, at its largest maxDets. That fork keeps faster-coco-eval's
    precision tp / (tp + fp) without pycocotools' + eps, which hmkd repairs (see
    ``match_pycocotools_precision``): the numbers then differ by at most an ulp or so."""
    fork = pytest.importorskip("faster_coco_eval_aitod")
    gt, dets = _random_set(3, per_image=420)  # > 120 per image and class
    ours = coco_metrics(gt, dets, aitod_max_dets=max_dets)["bbox"]["aitod"]
    with quiet():
        cgt = fork.COCO(copy.deepcopy(gt))
        ev = fork.COCOeval_faster(cgt, cgt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.params.maxDets = [1, 100, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {"AP": ev.stats[0], "AP50": ev.stats[2], "AP75": ev.stats[3], "APvt": ev.stats[4], "APt": ev.stats[5],
             "APs": ev.stats[6], "APm": ev.stats[7]}
    assert list(ev.params.areaRngLbl) == list(AITOD_AREAS)
    assert np.allclose(np.asarray(ev.params.areaRng, dtype=float), np.asarray(list(AITOD_AREAS.values())))
    for k in AITOD_KEYS:
        assert ours[k] == pytest.approx(100.0 * stats[k], abs=1e-9), k


def test_max_dets_changes_what_is_scored() -> None:
    gt, dets = _random_set(4, per_image=420)  # maxDets count per image and class: > 100 of them here
    many = coco_metrics(gt, dets, aitod_max_dets=1500)["bbox"]
    few = coco_metrics(gt, dets, aitod_max_dets=100)["bbox"]
    assert many["mAP"] == few["mAP"]  # COCO's numbers keep maxDets 100
    assert many["aitod"]["AP"] != few["aitod"]["AP"]
    assert "aitod" not in coco_metrics(gt, dets)["bbox"]
    with pytest.raises(ValueError, match="aitod_max_dets"):
        coco_metrics(gt, dets, aitod_max_dets=10)
