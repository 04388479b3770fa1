"""The default (faster-coco-eval + precision repair) engine equals pycocotools bit for bit."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hmkd.engine.evaluator import coco_metrics


def _rle(h: int, w: int, x: float, y: float, bw: float, bh: float) -> dict:
    m = np.zeros((h, w), np.uint8)
    m[int(y): int(y + bh) + 1, int(x): int(x + bw) + 1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def _random_set(seed: int, n_img: int = 16) -> tuple[dict, list[dict]]:
    r = np.random.default_rng(seed)
    images, anns, dets, aid = [], [], [], 1
    for i in range(1, n_img + 1):
        h, w = int(r.integers(60, 200)), int(r.integers(60, 200))
        images.append({"id": i, "height": h, "width": w, "file_name": f"{i}.png"})
        for _ in range(int(r.integers(0, 8))):
            bw, bh = float(r.uniform(2, min(w, 120) / 1.5)), float(r.uniform(2, min(h, 120) / 1.5))
            x, y = float(r.uniform(0, w - bw)), float(r.uniform(0, h - bh))
            rle = _rle(h, w, x, y, bw, bh)
            anns.append({"id": aid, "image_id": i, "category_id": int(r.choice([1, 3, 7])), "bbox": [x, y, bw, bh],
                         "area": float(mask_utils.area(rle)), "iscrowd": int(r.random() < 0.05), "segmentation": rle})
            aid += 1
        for _ in range(int(r.integers(0, 12))):
            bw, bh = float(r.uniform(2, w / 2)), float(r.uniform(2, h / 2))
            x, y = float(r.uniform(0, w - bw)), float(r.uniform(0, h - bh))
            dets.append({"image_id": i, "category_id": int(r.choice([1, 3, 7])), "bbox": [x, y, bw, bh],
                         "score": float(r.random()), "segmentation": _rle(h, w, x, y, bw, bh)})
        for a in [a for a in anns if a["image_id"] == i][:3]:  # some true positives
            if r.random() < 0.7:
                dets.append({"image_id": i, "category_id": a["category_id"], "bbox": list(a["bbox"]),
                             "score": float(r.random()), "segmentation": a["segmentation"]})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 3, 7)]}, dets


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("seed", range(6))
def test_faster_engine_is_bit_identical_to_pycocotools(seed: int) -> None:
    gt, dets = _random_set(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = coco_metrics(gt, dets, ("bbox", "segm"), engine="pycocotools")
        got = coco_metrics(gt, dets, ("bbox", "segm"))
    for t in ref:
        for k, v in ref[t].items():
            if k == "per_class":
                assert all(_same(v[c], got[t][k][c]) for c in v), (t, k)
            else:
                assert _same(v, got[t][k]), (t, k, v, got[t][k])


def test_detections_are_not_modified() -> None:
    gt, dets = _random_set(0)
    before = [dict(d) for d in dets]
    coco_metrics(gt, dets, ("bbox",))
    assert dets == before
