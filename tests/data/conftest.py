"""Fixtures for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hmkd_data_helpers import tiny_coco, write_image


@pytest.fixture()
def coco_dir(tmp_path: Path) -> tuple[Path, Path, dict]:
    """``(images_dir, ann_file, data)`` of the tiny set written to disk."""
    data = tiny_coco()
    img_dir = tmp_path / "images"
    for im in data["images"]:
        write_image(img_dir / im["file_name"], im["width"], im["height"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann, data
