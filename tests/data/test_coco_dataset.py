"""CocoDetection: label mapping, crowd handling, clipping, empty images, masks, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hmkd_data_helpers import tiny_coco, write_image

from hmkd.data.coco import CocoDetection
from hmkd.errors import DataError, HMKDError


def test_noncontiguous_category_ids(coco_dir):
    img_dir, ann, _ = coco_dir
    ds = CocoDetection(img_dir, ann, train=True)
    assert ds.cat_ids == [2, 5, 9]
    assert ds.cat_to_label == {2: 1, 5: 2, 9: 3}
    assert ds.label_to_cat == {1: 2, 2: 5, 3: 9}
    assert ds.class_names == ["__background__", "two", "five", "nine"]
    assert ds.num_classes == 3
    assert ds.ann_file == str(ann)
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, 30, 40)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert t["labels"].tolist() == [3, 1]  # category 9 -> 3, category 2 -> 1
    assert t["image_id"].dtype == torch.int64 and int(t["image_id"]) == 11
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["area"].dtype == torch.float32 and t["iscrowd"].dtype == torch.int64
    assert t["area"].tolist() == [50.0, 100.0]  # COCO areas, untouched by clipping


def test_crowd_dropped_for_training_kept_for_eval(coco_dir):
    img_dir, ann, _ = coco_dir
    train = CocoDetection(img_dir, ann, train=True)[0][1]
    evalt = CocoDetection(img_dir, ann, train=False)[0][1]
    assert train["iscrowd"].tolist() == [0, 0]
    assert evalt["iscrowd"].tolist() == [0, 0, 1]
    assert evalt["labels"].tolist() == [3, 1, 2]


def test_clipping_dropping_and_empty_counts(coco_dir, caplog):
    img_dir, ann, _ = coco_dir
    with caplog.at_level(logging.INFO, logger="hmkd.data.coco"):
        ds = CocoDetection(img_dir, ann, train=True)
    s = ds.stats
    assert (s["images"], s["annotations"], s["crowd"]) == (3, 6, 1)
    assert s["clipped"] == 1  # the box past the border of image 11
    assert s["dropped"] == 2  # zero-width box and the box entirely outside image 12
    assert s["empty_images"] == 1  # image 13
    lines = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert len(lines) == 1 and str(ann) in lines[0]
    t0 = ds[0][1]
    assert t0["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [35.0, 25.0, 40.0, 30.0]]
    t1 = ds[1][1]
    assert t1["boxes"].tolist() == [[1.0, 1.0, 5.0, 5.0]]
    img, t2 = ds[2]
    assert img.shape == (3, 10, 20)
    assert t2["boxes"].shape == (0, 4) and t2["boxes"].dtype == torch.float32
    assert t2["labels"].shape == (0,) and t2["labels"].dtype == torch.int64
    assert t2["area"].shape == (0,) and t2["iscrowd"].shape == (0,)


def test_masks_from_polygon_rle_and_box(coco_dir):
    img_dir, ann, _ = coco_dir
    ds = CocoDetection(img_dir, ann, train=False, with_masks=True)
    _, t = ds[0]
    m = t["masks"]
    assert m.dtype == torch.uint8 and m.shape == (3, 30, 40)
    assert set(m.unique().tolist()) <= {0, 1}
    # polygon [2,3]-[12,8]: pycocotools rasterises the 10x5 rectangle
    assert int(m[0].sum()) == 50
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    assert (int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())) == (2, 11, 3, 7)
    # uncompressed RLE: the clipped 5x5 corner
    assert int(m[1].sum()) == 25 and int(m[1][25:, 35:].sum()) == 25
    # crowd RLE 8x8 at (20, 0)
    assert int(m[2].sum()) == 64 and int(m[2][0:8, 20:28].sum()) == 64
    # no segmentation: the box becomes the mask
    _, t1 = ds[1]
    assert t1["masks"].shape == (1, 30, 40) and int(t1["masks"][0].sum()) == 16
    # empty image
    _, t2 = ds[2]
    assert t2["masks"].shape == (0, 10, 20) and t2["masks"].dtype == torch.uint8


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def _mutated(fn) -> dict:
    d = tiny_coco()
    fn(d)
    return d


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not a JSON file"),
        (_mutated(lambda d: d.pop("images")), "'images'"),
        (_mutated(lambda d: d.pop("annotations")), "'annotations'"),
        (_mutated(lambda d: d.pop("categories")), "'categories'"),
        (_mutated(lambda d: d["annotations"][1].pop("bbox")), "annotations[1] (id 2) has no 'bbox'"),
        (_mutated(lambda d: d["annotations"][0].pop("category_id")), "has no 'category_id'"),
        (_mutated(lambda d: d["annotations"][0].pop("image_id")), "has no 'image_id'"),
        (_mutated(lambda d: d["annotations"][2].update(category_id=77)), "category_id 77"),
        (_mutated(lambda d: d["annotations"][2].update(image_id=999)), "image_id 999"),
        (_mutated(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "bbox [1, 2, 3]"),
    ],
)
def test_bad_annotation_file_names_file_and_entry(tmp_path, content, expected):
    p = _write(tmp_path, content)
    with pytest.raises(DataError) as e:
        CocoDetection(tmp_path, p, train=True)
    msg = str(e.value)
    assert str(p) in msg and expected in msg and "\n" not in msg
    assert isinstance(e.value, HMKDError)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json", train=True)


def test_missing_image_names_path(coco_dir):
    img_dir, ann, _ = coco_dir
    (img_dir / "b.png").unlink()
    ds = CocoDetection(img_dir, ann, train=True)
    with pytest.raises(DataError) as e:
        ds[1]
    assert str(img_dir / "b.png") in str(e.value) and "not found" in str(e.value)
    assert str(ann) in str(e.value)


def test_truncated_and_garbage_images(coco_dir):
    img_dir, ann, _ = coco_dir
    data = (img_dir / "a.png").read_bytes()
    (img_dir / "a.png").write_bytes(data[: len(data) // 2])
    (img_dir / "b.png").write_bytes(b"this is not an image")
    ds = CocoDetection(img_dir, ann, train=True)
    for idx, name in ((0, "a.png"), (1, "b.png")):
        with pytest.raises(DataError) as e:
            ds[idx]
        msg = str(e.value)
        assert str(img_dir / name) in msg and "\n" not in msg


def test_image_size_mismatch(coco_dir):
    img_dir, ann, _ = coco_dir
    write_image(img_dir / "a.png", 41, 30)
    with pytest.raises(DataError, match=r"a\.png: image is 41x30"):
        CocoDetection(img_dir, ann, train=True)[0]


def test_missing_optional_fields_are_filled(tmp_path):
    d = tiny_coco()
    for a in d["annotations"]:
        a.pop("area")
        a.pop("id")
        a.pop("iscrowd")
    for im in d["images"]:
        write_image(tmp_path / im["file_name"], im["width"], im["height"])
    p = _write(tmp_path, d)
    ds = CocoDetection(tmp_path, p, train=True)
    anns = ds.coco.dataset["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5, 6]
    assert anns[0]["area"] == 50.0 and anns[0]["iscrowd"] == 0
    assert ds._gt_modified
