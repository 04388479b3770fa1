"""Helpers shared by the data tests: a tiny COCO set and image writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, w: int, h: int, value: int = 100) -> None:
    """Write a small RGB PNG (pixel value varies with x so flips are visible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[:, :, 0] = (np.arange(w) * 7 % 256).astype(np.uint8)[None, :]
    Image.fromarray(arr).save(path)


def tiny_coco() -> dict:
    """Three images (40x30, 40x30, 20x10), non-contiguous category ids 5, 2, 9."""
    return {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 12, "file_name": "b.png", "width": 40, "height": 30},
            {"id": 13, "file_name": "empty.png", "width": 20, "height": 10},
        ],
        "categories": [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}, {"id": 9, "name": "nine"}],
        "annotations": [
            # a: a normal box (polygon), a box past the right/bottom border (RLE), a crowd box
            {"id": 1, "image_id": 11, "category_id": 9, "bbox": [2, 3, 10, 5], "area": 50.0, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
            {"id": 2, "image_id": 11, "category_id": 2, "bbox": [35, 25, 10, 10], "area": 100.0, "iscrowd": 0,
             "segmentation": {"size": [30, 40], "counts": [30 * 35 + 25, 5, 25, 5, 25, 5, 25, 5, 25, 5]}},
            {"id": 3, "image_id": 11, "category_id": 5, "bbox": [20, 0, 8, 8], "area": 64.0, "iscrowd": 1,
             "segmentation": {"size": [30, 40], "counts": [20 * 30, 8, 22, 8, 22, 8, 22, 8, 22, 8, 22, 8, 22, 8, 22, 8, 382]}},
            # b: a degenerate box (zero width), one entirely outside, one normal with no segmentation
            {"id": 4, "image_id": 12, "category_id": 5, "bbox": [5, 5, 0, 4], "area": 0.0, "iscrowd": 0},
            {"id": 5, "image_id": 12, "category_id": 5, "bbox": [50, 5, 4, 4], "area": 16.0, "iscrowd": 0},
            {"id": 6, "image_id": 12, "category_id": 5, "bbox": [1, 1, 4, 4], "area": 16.0, "iscrowd": 0},
        ],
    }
