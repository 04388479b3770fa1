"""VisDrone-DET (``images/*.jpg`` + ``annotations/*.txt``) read as a COCO-format data set.

Format of an annotation row (one object per line)::

    bbox_left,bbox_top,bbox_width,bbox_height,score,object_category,truncation,occlusion

Choices (VisDrone's own toolkit is the reference for what is ignored; COCO's crowd mechanism is
how we express "ignored" so that pycocotools' COCOeval can score the set):

* Classes 1..10 are ``pedestrian, people, bicycle, car, van, truck, tricycle, awning-tricycle,
  bus, motor``; they keep their VisDrone ids as COCO category ids (labels 1..10 too).
* Category 0 (ignored region) and 11 (others) are not training targets. Each such row becomes ten
  crowd boxes (``iscrowd=1``), one per class 1..10 over the same region, so COCOeval ignores
  detections of any class that fall inside it (VisDrone's toolkit likewise drops detections in
  ignored regions).
* Rows of classes 1..10 with ``score == 0`` (VisDrone: "not considered in evaluation") are not
  training targets either; each becomes one crowd box of its own class.
* Truncation and occlusion are kept as extra annotation fields (``truncation``, ``occlusion``);
  they do not make an object ignored (VisDrone-DET evaluates truncated and occluded objects).
* Boxes are clipped to the image in the converted JSON (training and evaluation then agree);
  rows with width or height <= 0 after clipping are dropped. Both are counted.
* Image ids are 1..N in sorted file-name order; ``width``/``height`` are read from the image files.
  Every image must have its ``.txt`` (empty files are fine: an image without objects); a txt
  without an image is ignored with a warning.
* Parsing: blank lines are skipped and one trailing comma is allowed. A row with a field count
  other than 8, a non-numeric or non-finite (nan/inf) field, a non-integer score, category,
  truncation or occlusion, or a category outside 0..11 raises :class:`hmkd.errors.DataError`
  naming the file and the line number.
* Metrics computed this way are COCO-API numbers on VisDrone, not the VisDrone toolkit's numbers
  (which use maxDets 500 and their own matching); say so when reporting.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from hmkd.errors import DataError
from hmkd.utils import write_json

from .coco import CocoDetection

logger = logging.getLogger(__name__)

__all__ = [
    "VISDRONE_CLASSES",
    "parse_visdrone_txt",
    "visdrone_to_coco",
    "convert_visdrone",
    "VisDroneDetection",
]

VISDRONE_CLASSES: tuple[str, ...] = (
    "pedestrian",
    "people",
    "bicycle",
    "car",
    "van",
    "truck",
    "tricycle",
    "awning-tricycle",
    "bus",
    "motor",
)
IGNORED_REGION = 0
OTHERS = 11
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_visdrone_txt(path: str | os.PathLike) -> list[tuple[int, tuple[float, float, float, float], int, int, int, int]]:
    """Parse one VisDrone-DET annotation file.

    Returns:
        One tuple per row: ``(line_number, (left, top, width, height), score, category,
        truncation, occlusion)``.

    Raises:
        DataError: naming the file and line number for a malformed row.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read annotation file ({' '.join(str(e).split())})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if fields and fields[-1] == "":
            fields = fields[:-1]  # one trailing comma is allowed
        if len(fields) != 8:
            raise DataError(f"{p}:{lineno}: expected 8 comma-separated fields, got {len(fields)}: {line!r}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(f"{p}:{lineno}: non-numeric field in {line!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{p}:{lineno}: non-finite number (nan/inf) in {line!r}")
        if not all(v.is_integer() for v in values[4:]):
            raise DataError(f"{p}:{lineno}: score, object_category, truncation and occlusion must be integers in {line!r}")
        box = tuple(values[:4])
        score, cat, trunc, occl = (int(v) for v in values[4:])
        if not 0 <= cat <= 11:
            raise DataError(f"{p}:{lineno}: object_category {cat} is outside 0..11")
        rows.append((lineno, box, score, cat, trunc, occl))  # type: ignore[arg-type]
    return rows


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({' '.join(str(e).split())})") from None


def visdrone_to_coco(src_dir: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """Build the COCO dict of a VisDrone-DET folder (``images/`` + ``annotations/``).

    Returns:
        ``(coco_dict, stats)``; the dict's ``file_name`` entries are relative to ``src_dir/images``.

    Raises:
        DataError: a folder, image or txt is missing or malformed (message names the path/line).
    """
    src = Path(src_dir)
    img_dir, ann_dir = src / "images", src / "annotations"
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(f"{d}: VisDrone folder not found (expected images/ and annotations/ under {src})")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    stems = {p.stem for p in images}
    orphans = [p.name for p in ann_dir.glob("*.txt") if p.stem not in stems]
    if orphans:
        logger.warning("%s: %d annotation files have no image (e.g. %s); ignored", ann_dir, len(orphans), orphans[0])

    categories = [{"id": i + 1, "name": n, "supercategory": "visdrone"} for i, n in enumerate(VISDRONE_CLASSES)]
    stats: dict[str, Any] = {
        "images": len(images),
        "rows": 0,
        "objects": 0,
        "ignored_regions": 0,
        "others": 0,
        "score0": 0,
        "crowd_boxes": 0,
        "clipped": 0,
        "degenerate": 0,
        "per_class": {n: 0 for n in VISDRONE_CLASSES},
    }
    out_images, out_anns = [], []
    ann_id = 1
    for img_id, img_path in enumerate(images, start=1):
        txt = ann_dir / (img_path.stem + ".txt")
        if not txt.is_file():
            raise DataError(f"{txt}: annotation file missing for image {img_path}")
        w, h = _image_size(img_path)
        out_images.append({"id": img_id, "file_name": img_path.name, "width": w, "height": h})
        for lineno, (x, y, bw, bh), score, cat, trunc, occl in parse_visdrone_txt(txt):
            stats["rows"] += 1
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                stats["degenerate"] += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
                stats["clipped"] += 1
            box = [x1, y1, x2 - x1, y2 - y1]
            area = box[2] * box[3]
            extra = {"truncation": trunc, "occlusion": occl, "visdrone_line": lineno}
            if cat in (IGNORED_REGION, OTHERS):
                stats["ignored_regions" if cat == IGNORED_REGION else "others"] += 1
                crowd_cats = range(1, len(VISDRONE_CLASSES) + 1)
            elif score == 0:
                stats["score0"] += 1
                crowd_cats = range(cat, cat + 1)
            else:
                stats["objects"] += 1
                stats["per_class"][VISDRONE_CLASSES[cat - 1]] += 1
                out_anns.append(
                    {"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": box, "area": area,
                     "iscrowd": 0, **extra}
                )
                ann_id += 1
                continue
            for c in crowd_cats:
                out_anns.append(
                    {"id": ann_id, "image_id": img_id, "category_id": c, "bbox": box, "area": area,
                     "iscrowd": 1, **extra}
                )
                ann_id += 1
                stats["crowd_boxes"] += 1
    data = {
        "info": {"description": f"VisDrone-DET converted by hmkd from {src}"},
        "images": out_images,
        "annotations": out_anns,
        "categories": categories,
    }
    logger.info(
        "%s: %d images, %d objects, %d ignored regions + %d 'others' + %d score-0 rows as %d crowd boxes, "
        "%d clipped, %d degenerate dropped",
        src, stats["images"], stats["objects"], stats["ignored_regions"], stats["others"], stats["score0"],
        stats["crowd_boxes"], stats["clipped"], stats["degenerate"],
    )
    return data, stats


def convert_visdrone(src_dir: str | os.PathLike, out_json: str | os.PathLike) -> dict[str, Any]:
    """Convert a VisDrone-DET folder to a COCO JSON file (written atomically).

    The JSON's ``file_name`` entries are relative to ``src_dir/images``.

    Returns:
        Conversion statistics (images, objects, crowd boxes, clipped/degenerate counts, per class).
    """
    data, stats = visdrone_to_coco(src_dir)
    write_json(out_json, data, indent=None)
    return stats


class VisDroneDetection(CocoDetection):
    """VisDrone-DET read straight from its txt files (converted in memory, see module docstring).

    Args:
        root: folder holding ``images/`` and ``annotations/``.
        train: training targets (crowd/ignored boxes left out) or evaluation targets.
        transforms: callable ``(image, target) -> (image, target)``; ``None`` means ``ToTensor()``.
        label_map: as :class:`CocoDetection` (VisDrone's ids are 1..10, so both give the same labels).
    """

    def __init__(
        self, root: str | os.PathLike, *, train: bool, transforms: Callable | None = None, label_map: str = "contiguous"
    ) -> None:
        self.root = Path(root)
        data, self.conversion_stats = visdrone_to_coco(self.root)
        super().__init__(
            self.root / "images", data, train=train, transforms=transforms, with_masks=False,
            source=str(self.root / "annotations"), label_map=label_map,
        )
