"""build_dataset by kind, the DATASETS registry and gt_json_for."""

from __future__ import annotations

import json

import pytest
import torch
from hmkd_data_helpers import write_image

from hmkd.data import DATASETS, build_dataset, collate_fn, gt_json_for
from hmkd.errors import ConfigError

SYNTH = {"n_train": 2, "n_val": 2, "size": 64, "seed": 5}


def test_registry_lists_every_kind():
    assert set(DATASETS) == {"coco", "visdrone", "synthetic"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in DATASETS.values())


def test_synthetic_generated_on_first_use_and_split_by_train(tmp_path):
    root = tmp_path / "synth"
    train = build_dataset("synthetic", train=True, root=str(root), synth=SYNTH, scales=[48, 64], max_size=80)
    val = build_dataset("synthetic", train=False, root=str(root), synth=SYNTH)
    assert (root / "meta.json").is_file()
    assert train.ann_file.endswith("train.json") and val.ann_file.endswith("val.json")
    assert len(train) == 2 and len(val) == 2 and train.num_classes == 6
    img, t = train[0]
    assert img.dtype == torch.float32 and min(img.shape[1:]) in (48, 64)
    images, targets = collate_fn([val[0], val[1]])
    assert len(images) == 2 and images[0].shape == (3, 64, 64)
    assert gt_json_for(val) == val.ann_file
    # reused without parameters
    again = build_dataset("synthetic", train=False, root=str(root))
    assert len(again) == 2


def test_coco_kind_paths_and_gt_for_subset(coco_dir):
    img_dir, ann, data = coco_dir
    ds = build_dataset("coco", train=False, root=str(ann.parent), ann_file=ann.name, images_dir="images")
    assert len(ds) == 3 and gt_json_for(ds) == str(ann)
    sub = torch.utils.data.Subset(torch.utils.data.Subset(ds, [2, 0]), [1])  # image id 11
    gt = gt_json_for(sub)
    assert [im["id"] for im in gt["images"]] == [11]
    assert {a["image_id"] for a in gt["annotations"]} == {11}
    assert gt["categories"] == data["categories"]


def test_visdrone_kind_gives_dict_gt(tmp_path):
    write_image(tmp_path / "images" / "x.jpg", 20, 10)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "x.txt").write_text("1,1,5,5,1,4,0,0\n")
    ds = build_dataset("visdrone", train=True, root=str(tmp_path))
    gt = gt_json_for(ds)
    assert isinstance(gt, dict) and len(gt["annotations"]) == 1
    json.dumps(gt)


def test_bad_kind_and_missing_ann_file(tmp_path):
    with pytest.raises(ConfigError, match="'nope'"):
        build_dataset("nope", train=True, root=str(tmp_path))
    with pytest.raises(ConfigError, match="data.train_ann"):
        build_dataset("coco", train=True, root=str(tmp_path))
