"""``data.label_map``: contiguous labels 1..K, or the data set's own category ids as labels (what
torchvision's COCO checkpoints expect: 91 outputs, COCO's ids with their gaps); evaluation maps
labels back to category ids either way. Tested on a small COCO-format set with COCO's real id list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models import detection as tvd

from hmkd.config import load_config
from hmkd.data import build_data, build_dataset
from hmkd.engine.coco_results import detections_to_coco
from hmkd.engine.evaluation import evaluate
from hmkd.engine.evaluator import coco_metrics
from hmkd.errors import ConfigError, DataError

from hmkd_data_helpers import write_image

# COCO's categories as torchvision's COCO checkpoints index them (91 entries: background, the 80
# classes at their COCO ids, "N/A" at the 10 unused ids)
TV_COCO = tvd.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
COCO_IDS = [i for i, name in enumerate(TV_COCO) if name not in ("__background__", "N/A")]
# (image, category id, box): ids on both sides of COCO's gaps (11 | 13, 25 | 27, 83 | 84) and the last
OBJECTS = [(1, 1, [4, 4, 30, 40]), (1, 13, [40, 10, 20, 20]), (1, 90, [10, 50, 50, 10]),
           (2, 3, [0, 0, 64, 30]), (2, 27, [20, 35, 30, 25]), (2, 84, [5, 40, 10, 10]), (2, 11, [40, 5, 20, 20])]


def write_coco_ids(root: Path) -> Path:
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)],
        "categories": [{"id": c, "name": TV_COCO[c]} for c in COCO_IDS],
        "annotations": [{"id": k, "image_id": im, "category_id": c, "bbox": [float(v) for v in b],
                         "area": float(b[2] * b[3]), "iscrowd": 0} for k, (im, c, b) in enumerate(OBJECTS, start=1)],
    }
    for i in (1, 2):
        write_image(root / "images" / f"{i}.png", 64, 64, value=40 * i)
    (root / "ann.json").write_text(json.dumps(data))
    return root


def dataset(root: Path, label_map: str, train: bool = False):
    return build_dataset("coco", train=train, root=str(root), ann_file="ann.json", images_dir="images", hflip=False,
                         label_map=label_map)


def test_category_id_labels_are_cocos_ids_and_91_outputs(tmp_path):
    root = write_coco_ids(tmp_path)
    assert len(COCO_IDS) == 80 and COCO_IDS[-1] == 90
    contiguous, by_id = dataset(root, "contiguous"), dataset(root, "category_id")
    assert contiguous.num_classes == 80 and by_id.num_classes == 90  # + background: torchvision's 91 outputs
    for ds in (contiguous, by_id):
        for i in range(len(ds)):
            _, t = ds[i]
            cats = [c for im, c, _ in OBJECTS if im == ds.ids[i]]
            assert [ds.label_to_cat[int(l)] for l in t["labels"]] == cats  # evaluation maps back either way
            if ds is by_id:
                assert t["labels"].tolist() == cats
    assert contiguous.cat_to_label[13] == 12 and contiguous.cat_to_label[90] == 80
    assert by_id.label_to_cat == {c: c for c in COCO_IDS}
    # names by label follow torchvision's list, "N/A" at the unused ids
    assert by_id.label_names == list(TV_COCO)
    assert contiguous.label_names == contiguous.class_names


@pytest.mark.parametrize("label_map", ["contiguous", "category_id"])
def test_evaluation_maps_labels_back_to_category_ids(tmp_path, label_map):
    """Detections equal to the ground truth, in the detector's labels, score 100 mAP with the data
    set's own category ids in the results."""
    root = write_coco_ids(tmp_path)
    ds = dataset(root, label_map)
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(0.9, 0.5, len(t["labels"]))})
        ids.append(int(t["image_id"]))
    dets = detections_to_coco(outputs, ids, ds.label_to_cat, drop_unknown=label_map == "category_id")
    assert sorted(d["category_id"] for d in dets) == sorted(c for _, c, _ in OBJECTS)
    metrics = coco_metrics(json.loads((root / "ann.json").read_text()), dets)
    assert metrics["bbox"]["mAP"] == pytest.approx(100.0)


def test_labels_without_a_category(tmp_path):
    root = write_coco_ids(tmp_path)
    by_id = dataset(root, "category_id")
    out = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]] * 3), "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([12, 0, 13])}]  # 12: one of torchvision's "N/A" outputs; 0: background
    dets = detections_to_coco(out, [1], by_id.label_to_cat, drop_unknown=True)
    assert [d["category_id"] for d in dets] == [13]
    with pytest.raises(DataError, match="model label 12 has no category"):
        detections_to_coco(out, [1], by_id.label_to_cat)
    # the background label is never a category, whatever the map
    contiguous = dataset(root, "contiguous")
    out[0]["labels"] = torch.tensor([1, 0, 80])
    assert [d["category_id"] for d in detections_to_coco(out, [1], contiguous.label_to_cat)] == [1, 90]


def test_bad_label_maps(tmp_path):
    root = write_coco_ids(tmp_path)
    with pytest.raises(ConfigError, match="data.label_map must be one of contiguous, category_id, got 'ids'"):
        dataset(root, "ids")
    data = json.loads((root / "ann.json").read_text())
    data["categories"].append({"id": 0, "name": "zero"})
    (root / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        dataset(root, "category_id")
    assert "category id 0 cannot be a label with data.label_map: category_id" in str(e.value)
    assert "\n" not in str(e.value)


def test_hmkd_eval_of_a_torchvision_coco_model_with_category_ids(tmp_path):
    """``hmkd eval`` of a torchvision COCO-format model (91 outputs, random weights) on the set: the
    model is built from the config's torchvision preset, the file loads as it is, and detections.json
    holds COCO category ids only (labels at COCO's unused ids are dropped)."""
    root = write_coco_ids(tmp_path / "data")
    torch.manual_seed(0)
    tv = tvd.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():  # every class scores alike, so that the unused ids are predicted too
        tv.roi_heads.box_predictor.cls_score.weight.zero_()
        tv.roi_heads.box_predictor.cls_score.bias.zero_()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    preset = Path(__file__).resolve().parents[2] / "configs" / "torchvision" / "fasterrcnn_mobilenet_v3_large_320_fpn.yaml"
    cfg = load_config(str(preset), [
        "device=cpu", "data.kind=coco", f"data.root={root}", "data.val_ann=ann.json", "data.val_images=images",
        "data.label_map=category_id", "data.eval_batch_size=2", "model.min_size=64", "model.max_size=64",
        "model.score_thresh=0.0", "model.detections_per_img=300",
    ])
    assert build_data(cfg, train=False).num_classes == 90
    metrics = evaluate(cfg, weights=str(tmp_path / "tv.pth"), out_dir=str(tmp_path / "eval"), progress=False)
    assert set(metrics) == {"bbox"}
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= set(COCO_IDS)
    assert len({d["category_id"] for d in dets}) > 10  # many classes, none of the 10 unused ids
