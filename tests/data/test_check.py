"""The pre-flight data check (hmkd.data.check): every image's header and every annotation looked at
before iteration 1, problems as one-line errors naming the file, the one-screen summary; a JSON
without width/height reads them from the images."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from hmkd_data_helpers import tiny_coco, write_image

from hmkd.data import CocoDetection, build_dataset, gt_json_for
from hmkd.data.check import MAX_LISTED, check_dataset, format_reports, read_image_size
from hmkd.errors import DataError


def _write(tmp_path: Path, data: dict) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    for im in data["images"]:
        if not (img_dir / im["file_name"]).exists():
            write_image(img_dir / im["file_name"], im.get("width", 40), im.get("height", 30))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


def test_summary_counts_what_the_training_targets_hold(coco_dir) -> None:
    img_dir, ann, _ = coco_dir
    report = check_dataset(CocoDetection(img_dir, ann, train=True), "train")
    assert report.images == 3 and report.problems == []
    # a: two boxes (one clipped), one crowd; b: one dropped (zero width), one outside (dropped), one kept
    assert report.boxes == 3 and report.crowd == 1 and report.empty_images == 1
    assert report.per_class == {"two": 1, "five": 1, "nine": 1}  # sorted-id order of names, counts per class
    assert report.sizes == {"small": 3, "medium": 0, "large": 0}
    assert report.clipped == 1 and report.dropped == 2
    lines = format_reports([report])
    assert len(lines) <= 5
    assert lines[0].startswith("train: 3 images, 3 boxes (1.0 per image), small 100% / medium 0% / large 0%")
    assert "1 images without boxes" in lines[1] and "1 crowd regions" in lines[1] and "2 degenerate boxes dropped" in lines[1]
    assert "per class: five 1, nine 1, two 1" in lines[2]


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("missing", r"images/b.png: image file not found \(image id 12 in .*ann.json\)$"),
        ("size", r"images/b.png: image is 41x30 but .*ann.json says 40x30 \(image id 12\)$"),
        ("not-an-image", r"images/b.png: unreadable \(cannot identify image file .*\) \(image id 12 in .*ann.json\)$"),
    ],
)
def test_a_broken_image_is_found_before_training(tmp_path: Path, breakage, match) -> None:
    img_dir, ann = _write(tmp_path, tiny_coco())
    b = img_dir / "b.png"
    if breakage == "missing":
        b.unlink()
    elif breakage == "size":
        write_image(b, 41, 30)
    else:
        b.write_bytes(b"this is not a png")
    ds = CocoDetection(img_dir, ann, train=True)  # building the set does not read the images
    with pytest.raises(DataError, match=match) as e:
        check_dataset(ds, "train")
    assert "\n" not in str(e.value)
    # data.check_images: false reads the annotations only
    report = check_dataset(ds, "train", read_images=False)
    assert report.boxes == 3 and "images not read" in format_reports([report])[0]


def test_many_problems_one_line_and_the_first_ones_logged(tmp_path: Path, caplog) -> None:
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 40)],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    write_image(tmp_path / "1.png", 8, 8)
    ds = CocoDetection(tmp_path, ann, train=True)
    with caplog.at_level(logging.WARNING, logger="hmkd.data.check"), pytest.raises(DataError) as e:
        check_dataset(ds, "train")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / '2.png'}: image file not found (image id 2 in")
    assert msg.endswith(f"; 37 more problem(s) in the train split (the first {MAX_LISTED} are logged above)")
    assert len([r for r in caplog.records if "image file not found" in r.getMessage()]) == MAX_LISTED


def test_a_training_split_without_annotations_is_an_error(tmp_path: Path) -> None:
    data = tiny_coco()
    data["annotations"] = [a for a in data["annotations"] if a["iscrowd"]]  # a crowd region only
    img_dir, ann = _write(tmp_path, data)
    ds = CocoDetection(img_dir, ann, train=True)
    for read_images in (True, False):
        with pytest.raises(DataError, match=r"ann.json: the train split has no annotations \(3 images, 0 boxes, 1 crowd regions\)"):
            check_dataset(ds, "train", read_images=read_images)
    assert check_dataset(CocoDetection(img_dir, ann, train=False), "val").boxes == 0  # a val split may be empty


def test_width_and_height_are_read_from_the_images_when_the_json_lacks_them(tmp_path: Path, coco_dir) -> None:
    img_dir, ann, data = coco_dir
    for im in data["images"]:
        del im["width"], im["height"]
    ann.write_text(json.dumps(data))
    ds = CocoDetection(img_dir, ann, train=True)
    assert [(ds.coco.imgs[i]["width"], ds.coco.imgs[i]["height"]) for i in ds.ids] == [(40, 30), (40, 30), (20, 10)]
    assert ds.stats["clipped"] == 1  # boxes clipped to the size read from the image
    assert check_dataset(ds, "train").problems == []
    gt = gt_json_for(ds)
    assert isinstance(gt, dict) and gt["images"][0]["width"] == 40  # evaluation gets the filled sizes
    assert tuple(ds[0][0].shape[-2:]) == (30, 40)


def test_the_synthetic_set_passes(tmp_path: Path) -> None:
    ds = build_dataset("synthetic", train=True, root=str(tmp_path / "s"),
                       synth={"n_train": 3, "n_val": 2, "size": 64, "seed": 0})
    report = check_dataset(ds, "train")
    assert report.images == 3 and report.boxes > 0 and sum(report.sizes.values()) == report.boxes


def test_header_reads_are_fast(tmp_path: Path) -> None:
    """Headers only: a large image costs what a small one does (nothing is decoded)."""
    write_image(tmp_path / "big.png", 4000, 3000)
    t0 = time.perf_counter()
    for _ in range(20):
        assert read_image_size(tmp_path / "big.png") == (4000, 3000)
    assert (time.perf_counter() - t0) / 20 < 0.01
