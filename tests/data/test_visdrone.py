"""VisDrone-DET parsing: ignored regions, class 11, score 0, trailing commas, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hmkd_data_helpers import write_image

from hmkd.data.visdrone import VISDRONE_CLASSES, VisDroneDetection, convert_visdrone
from hmkd.engine.evaluator import coco_metrics
from hmkd.errors import DataError

TXT = """\
10,10,20,15,1,4,0,0,
50,12,8,16,1,1,1,2

0,40,30,20,0,0,0,0,
70,40,10,10,0,11,0,0
5,5,4,4,0,6,0,0
90,50,20,20,1,9,0,1
"""


@pytest.fixture()
def vis_dir(tmp_path: Path) -> Path:
    root = tmp_path / "VisDrone2019-DET-val"
    write_image(root / "images" / "0000001_00001_d_0000001.jpg", 100, 60)
    write_image(root / "images" / "0000002_00002_d_0000002.jpg", 32, 24)
    (root / "annotations").mkdir()
    (root / "annotations" / "0000001_00001_d_0000001.txt").write_text(TXT)
    (root / "annotations" / "0000002_00002_d_0000002.txt").write_text("")
    return root


def test_convert_handles_ignored_others_and_score0(vis_dir, tmp_path):
    out = tmp_path / "out" / "val.json"
    stats = convert_visdrone(vis_dir, out)
    d = json.loads(out.read_text())
    assert [c["name"] for c in d["categories"]] == list(VISDRONE_CLASSES)
    assert [c["id"] for c in d["categories"]] == list(range(1, 11))
    assert [(im["id"], im["width"], im["height"]) for im in d["images"]] == [(1, 100, 60), (2, 32, 24)]
    objs = [a for a in d["annotations"] if a["iscrowd"] == 0]
    crowd = [a for a in d["annotations"] if a["iscrowd"] == 1]
    assert [(a["category_id"], a["bbox"]) for a in objs] == [
        (4, [10.0, 10.0, 20.0, 15.0]),
        (1, [50.0, 12.0, 8.0, 16.0]),
        (9, [90.0, 50.0, 10.0, 10.0]),  # clipped to the 100x60 image
    ]
    # ignored region (cat 0) and "others" (cat 11): one crowd box per class; score-0 tricycle: its own class
    region0 = [a for a in crowd if a["bbox"] == [0.0, 40.0, 30.0, 20.0]]
    others = [a for a in crowd if a["bbox"] == [70.0, 40.0, 10.0, 10.0]]
    score0 = [a for a in crowd if a["bbox"] == [5.0, 5.0, 4.0, 4.0]]
    assert sorted(a["category_id"] for a in region0) == list(range(1, 11))
    assert sorted(a["category_id"] for a in others) == list(range(1, 11))
    assert [a["category_id"] for a in score0] == [6]
    assert len(crowd) == 21
    assert stats["objects"] == 3 and stats["crowd_boxes"] == 21 and stats["clipped"] == 1
    assert (stats["ignored_regions"], stats["others"], stats["score0"], stats["rows"]) == (1, 1, 1, 6)
    assert len({a["id"] for a in d["annotations"]}) == len(d["annotations"])


def test_dataset_targets_exclude_ignored(vis_dir):
    ds = VisDroneDetection(vis_dir, train=True)
    assert ds.num_classes == 10 and ds.class_names[1:] == list(VISDRONE_CLASSES)
    img, t = ds[0]
    assert img.shape == (3, 60, 100)
    assert t["labels"].tolist() == [4, 1, 9]
    assert t["boxes"].tolist()[0] == [10.0, 10.0, 30.0, 25.0]
    assert t["iscrowd"].tolist() == [0, 0, 0]
    _, t_empty = ds[1]
    assert t_empty["boxes"].shape == (0, 4)
    ev = VisDroneDetection(vis_dir, train=False)
    assert int((ev[0][1]["iscrowd"] == 1).sum()) == 21


def test_detections_in_ignored_region_are_not_false_positives(vis_dir, tmp_path):
    out = tmp_path / "val.json"
    convert_visdrone(vis_dir, out)
    perfect = [
        {"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 15], "score": 0.5},
        {"image_id": 1, "category_id": 1, "bbox": [50, 12, 8, 16], "score": 0.5},
        {"image_id": 1, "category_id": 9, "bbox": [90, 50, 10, 10], "score": 0.5},
    ]
    in_ignored = [
        {"image_id": 1, "category_id": c, "bbox": [2, 42, 20, 15], "score": 0.9} for c in (1, 4, 9)
    ] + [{"image_id": 1, "category_id": 6, "bbox": [5, 5, 4, 4], "score": 0.9}]
    m = coco_metrics(out, perfect + in_ignored)["bbox"]
    assert m["mAP"] == pytest.approx(100.0)
    fp = [{"image_id": 1, "category_id": 4, "bbox": [60, 30, 20, 15], "score": 0.9}]
    assert coco_metrics(out, perfect + fp)["bbox"]["per_class"]["car"] < 100.0


def test_wrong_field_count_names_file_and_line(vis_dir):
    txt = vis_dir / "annotations" / "0000002_00002_d_0000002.txt"
    txt.write_text("1,2,3,4,1,1,0,0\n\n1,2,3,4,1,1,0\n")
    with pytest.raises(DataError) as e:
        VisDroneDetection(vis_dir, train=True)
    msg = str(e.value)
    assert f"{txt}:3:" in msg and "expected 8" in msg and "\n" not in msg


def test_non_numeric_and_bad_category(vis_dir):
    txt = vis_dir / "annotations" / "0000002_00002_d_0000002.txt"
    txt.write_text("1,2,x,4,1,1,0,0\n")
    with pytest.raises(DataError, match=r":1: non-numeric"):
        convert_visdrone(vis_dir, vis_dir / "o.json")
    txt.write_text("1,2,3,4,1,12,0,0\n")
    with pytest.raises(DataError, match=r":1: object_category 12"):
        convert_visdrone(vis_dir, vis_dir / "o.json")


def test_missing_txt_and_missing_folder(vis_dir, tmp_path):
    (vis_dir / "annotations" / "0000002_00002_d_0000002.txt").unlink()
    with pytest.raises(DataError, match="0000002_00002_d_0000002.txt"):
        VisDroneDetection(vis_dir, train=True)
    with pytest.raises(DataError, match="images"):
        VisDroneDetection(tmp_path / "nothing", train=True)
