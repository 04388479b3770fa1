"""COCO evaluation: numbers identical to pycocotools' COCOeval, conversion, detection checks,
inference over a loader, outputs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hmkd.engine.coco_results import bbox_detections_look_valid, check_detections, detections_to_coco
from hmkd.engine.evaluation import write_eval_outputs
from hmkd.engine.evaluator import SUMMARY_KEYS, coco_metrics
from hmkd.engine.inference import inference_on_dataset
from hmkd.errors import DataError

# pycocotools 2.0.x + numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZES = {1: (100, 100), 2: (150, 200), 3: (64, 64), 4: (300, 300)}  # image id -> (h, w)


def _rect_rle(h: int, w: int, x: int, y: int, bw: int, bh: int, notch: bool = False) -> dict:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y : y + bh, x : x + bw] = 1
    if notch:  # cut a corner so masks differ from boxes
        m[y : y + bh // 2, x : x + bw // 3] = 0
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _poly(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _gt() -> dict:
    anns = [
        # image 1: two small objects and a crowd region
        (1, 1, [10, 10, 12, 10], 0), (1, 4, [50, 50, 20, 20], 0), (1, 1, [60, 0, 40, 30], 1),
        # image 2: medium + small
        (2, 1, [20, 20, 50, 40], 0), (2, 4, [150, 100, 10, 8], 0),
        # image 3: one small object, no detections at all
        (3, 1, [5, 5, 10, 10], 0),
        # image 4: large + medium
        (4, 4, [10, 10, 150, 120], 0), (4, 1, [200, 200, 60, 60], 0),
    ]
    out = []
    for k, (img, cat, box, crowd) in enumerate(anns, start=1):
        h, w = SIZES[img]
        seg = _rect_rle(h, w, *box) if crowd else _poly(*box)
        out.append({"id": k, "image_id": img, "category_id": cat, "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]), "iscrowd": crowd, "segmentation": seg})
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (h, w) in SIZES.items()],
        "categories": [{"id": 1, "name": "alpha"}, {"id": 4, "name": "beta"}],
        "annotations": out,
    }


def _dets() -> list[dict]:
    rows = [
        (1, 1, [11, 10, 12, 10], 0.9), (1, 1, [12, 12, 12, 10], 0.6), (1, 4, [52, 49, 20, 20], 0.8),
        (1, 1, [65, 5, 20, 20], 0.7),  # inside the crowd region: ignored
        (1, 4, [0, 80, 10, 10], 0.3),
        (2, 1, [22, 25, 50, 40], 0.85), (2, 4, [150, 100, 10, 8], 0.4), (2, 1, [100, 10, 30, 30], 0.5),
        (4, 4, [15, 15, 140, 120], 0.95), (4, 1, [205, 200, 60, 60], 0.65), (4, 4, [200, 200, 60, 60], 0.2),
    ]
    out = []
    for k, (img, cat, box, score) in enumerate(rows):
        h, w = SIZES[img]
        out.append({"image_id": img, "category_id": cat, "bbox": [float(v) for v in box], "score": score,
                     "segmentation": _rect_rle(h, w, *box, notch=k % 3 == 0)})
    return out


def _reference(gt: dict, dets: list[dict], iou_type: str, img_ids=None):
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    if iou_type == "segm":  # results carry masks only: area = mask area (as detectron2 loads them)
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    if img_ids is not None:
        ev.params.imgIds = img_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_metrics_equal_pycocotools(iou_type, tmp_path):
    gt, dets = _gt(), _dets()
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    ref = _reference(gt, dets, iou_type)
    got = coco_metrics(gt, dets, iou_types=(iou_type,))[iou_type]
    for key, value in zip(SUMMARY_KEYS, ref.stats):
        assert _same(got[key], value * 100.0 if value >= 0 else math.nan), key
    assert 0 < got["mAP"] < 100 and not math.isnan(got["APl"])
    precision = ref.eval["precision"]
    for k, name in enumerate(["alpha", "beta"]):
        p = precision[:, :, k, 0, -1]
        assert got["per_class"][name] == p[p > -1].mean() * 100.0
    assert gt == gt_before and dets == dets_before  # inputs untouched
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert coco_metrics(str(path), dets, iou_types=(iou_type,)) == {iou_type: got}


def test_both_iou_types_and_faster_engine_agree():
    gt, dets = _gt(), _dets()
    both = coco_metrics(gt, dets, iou_types=("bbox", "segm"), class_names=["__background__", "A", "B"])
    assert set(both) == {"bbox", "segm"} and set(both["bbox"]["per_class"]) == {"A", "B"}
    assert both["bbox"]["mAP"] != both["segm"]["mAP"]
    ref = coco_metrics(gt, dets, iou_types=("bbox", "segm"), class_names=["A", "B"], engine="pycocotools")
    for t in both:
        for key in SUMMARY_KEYS:
            assert both[t][key] == ref[t][key]  # the default (faster) engine is bit-identical


def test_empty_detections_give_zeros():
    m = coco_metrics(_gt(), [], iou_types=("bbox", "segm"))
    for t in ("bbox", "segm"):
        assert all(m[t][k] == 0.0 for k in SUMMARY_KEYS)
        assert m[t]["per_class"] == {"alpha": 0.0, "beta": 0.0}


def test_nan_where_nothing_to_score_and_unknown_image():
    gt = _gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 4]  # no large objects left
    m = coco_metrics(gt, _dets())["bbox"]
    assert math.isnan(m["APl"]) and not math.isnan(m["APs"])
    with pytest.raises(DataError, match="image_id 99"):
        coco_metrics(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_detections_to_coco():
    h, w = 6, 8
    masks = torch.zeros(2, 1, h, w)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[0, 0, 0, 0] = 0.5  # exactly 0.5 is not foreground
    outputs = [
        {"boxes": torch.tensor([[1.0, 2.0, 5.0, 8.0], [0.5, 0.5, 1.5, 2.0]]), "scores": torch.tensor([0.9, 0.1]),
         "labels": torch.tensor([2, 1]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 1, h, w)},
    ]
    res = detections_to_coco(outputs, [7, 8], {1: 3, 2: 10}, with_masks=True)
    assert len(res) == 2
    assert res[0]["bbox"] == [1.0, 2.0, 4.0, 6.0] and res[0]["category_id"] == 10 and res[0]["image_id"] == 7
    assert res[1]["bbox"] == [0.5, 0.5, 1.0, 1.5] and res[1]["category_id"] == 3
    assert res[0]["score"] == pytest.approx(0.9)
    assert isinstance(res[0]["segmentation"]["counts"], str)
    decoded = mask_utils.decode(res[0]["segmentation"])
    assert decoded.shape == (h, w) and decoded.sum() == 6 and decoded[1:3, 2:5].all()
    assert "segmentation" not in detections_to_coco(outputs, [7, 8], {1: 3, 2: 10})[0]
    json.dumps(res)
    with pytest.raises(DataError, match="label 2"):
        detections_to_coco(outputs[:1], [7], {1: 3})


def _outputs_for(dets: list[dict], img_id: int, label_of: dict[int, int]) -> dict:
    rows = [d for d in dets if d["image_id"] == img_id]
    boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                          for d in rows], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "scores": torch.tensor([d["score"] for d in rows]),
            "labels": torch.tensor([label_of[d["category_id"]] for d in rows], dtype=torch.int64)}


def test_image_ids_scores_only_those_images():
    gt, dets = _gt(), _dets()
    cat_to_label = {1: 1, 4: 2}
    # float32 boxes as a model would give them
    res = detections_to_coco([_outputs_for(dets, i, cat_to_label) for i in (1, 3)], [1, 3], {1: 1, 2: 4})
    got = coco_metrics(gt, res, class_names=["__background__", "alpha", "beta"], image_ids=[3, 1])["bbox"]
    ref = _reference(gt, res, "bbox", img_ids=[1, 3])
    for key, value in zip(SUMMARY_KEYS, ref.stats):
        assert _same(got[key], value * 100.0 if value >= 0 else math.nan), key
    assert set(got["per_class"]) == {"alpha", "beta"}
    everything = coco_metrics(gt, res)["bbox"]  # the other images' objects count as misses
    assert everything["AR100"] < got["AR100"]
    with pytest.raises(DataError, match=r"image_ids \[99\] are not in the ground truth"):
        coco_metrics(gt, res, image_ids=[1, 99])


class _FixedModel(torch.nn.Module):
    """Stands in for a torchvision detector: returns stored outputs by image width."""

    def __init__(self, by_width: dict[int, dict]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.by_width = by_width
        self.calls = 0

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        self.calls += 1
        return [self.by_width[int(im.shape[-1])] for im in images]


def test_inference_on_dataset_and_outputs(tmp_path):
    gt, dets = _gt(), _dets()
    cat_to_label = {1: 1, 4: 2}
    model = _FixedModel({SIZES[i][1]: _outputs_for(dets, i, cat_to_label) for i in (1, 2, 4)})
    model.train()
    loader = [
        ([torch.zeros(3, *SIZES[1]), torch.zeros(3, *SIZES[2])], [{"image_id": torch.tensor(1)}, {"image_id": torch.tensor(2)}]),
        ([torch.zeros(3, *SIZES[4])], [{"image_id": torch.tensor(4)}]),
    ]
    res = inference_on_dataset(model, loader, "cpu", {1: 1, 2: 4}, progress=False)
    assert model.training and model.calls == 2
    assert len(res) == sum(1 for d in dets if d["image_id"] in (1, 2, 4))
    metrics = coco_metrics(gt, res)
    metrics["bbox"]["APl"] = math.nan
    paths = write_eval_outputs(tmp_path / "eval", metrics, res)
    saved = json.loads(open(paths["metrics"]).read())
    assert saved["bbox"]["APl"] is None and saved["bbox"]["mAP"] == pytest.approx(metrics["bbox"]["mAP"])
    assert json.loads(open(paths["detections"]).read()) == json.loads(json.dumps(res))
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["detections.json", "metrics.json"]


def test_fast_detection_checks_accept_what_the_loop_accepts():
    """The whole-list check is a shortcut of the per-detection loop: valid inputs of every accepted
    shape pass it; anything it does not vouch for goes to the loop (which names the bad one)."""
    import numpy as np

    images = {1: {"id": 1, "height": 10, "width": 10}, 2: {"id": 2, "height": 10, "width": 10}}
    valid = [
        {"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5},
        {"image_id": 2, "category_id": 2, "bbox": (1, 2, 3, 4), "score": 1},
        {"image_id": 1, "category_id": 1, "bbox": [np.float64(1.5), 2, 3, 4], "score": np.float64(0.25), "x": None},
    ]
    assert bbox_detections_look_valid(valid, images)
    check_detections(valid, images, ("bbox",))
    # np.int64 is not an int to the loop (data.coco.is_number): the shortcut must not let it through
    odd = valid + [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": np.int64(1)}]
    assert not bbox_detections_look_valid(odd, images)
    with pytest.raises(DataError, match=r"detections\[3\] \(image_id 1\) score np.int64\(1\) is not a finite number"):
        check_detections(odd, images, ("bbox",))


def test_coco_metrics_pauses_gc_and_restores_it(monkeypatch):
    import gc

    import hmkd.engine.evaluator as evaluator_module

    assert gc.isenabled()
    seen = []
    orig = evaluator_module._coco_metrics

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return orig(*a, **k)

    monkeypatch.setattr(evaluator_module, "_coco_metrics", spy)
    try:
        coco_metrics(_gt(), _dets())
        with pytest.raises(DataError):
            coco_metrics(_gt(), [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
        assert gc.isenabled()  # restored, also after an error
        gc.disable()
        coco_metrics(_gt(), _dets())
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()
    assert seen == [False, False, False]


@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_annotation_id_zero_is_not_a_false_positive(engine):
    """COCOeval stores a match as the GT id, 0 meaning unmatched: an annotation with id 0 (0-based
    exports) would turn its true positive into a false positive. Ids are renumbered privately."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
                          {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.8}]
    before = copy.deepcopy(gt)
    assert coco_metrics(gt, dets, engine=engine)["bbox"]["mAP"] == pytest.approx(100.0)
    assert gt == before  # the caller's dict keeps its ids
