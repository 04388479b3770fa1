"""Helpers shared by the reliability tests: tiny data on disk, tiny models, running the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# A tiny FCOS (ResNet-18, 64 FPN channels, P3-P6, 128 px): builds in well under a second on CPU.
TINY_MODEL = [
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=64", "model.head_convs=1",
    "model.levels=[P3,P4,P5,P6]", "model.min_size=128", "model.max_size=128",
    "model.detections_per_img=20", "model.topk_candidates=100",
]
TINY_MODEL_KW = dict(
    fpn_channels=64, levels=["P3", "P4", "P5", "P6"], min_size=128, max_size=128, head_convs=1,
    detections_per_img=20, topk_candidates=100,
)


def write_image(path: Path, w: int, h: int, seed: int = 0) -> None:
    """A small RGB PNG with some texture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def tiny_coco() -> dict:
    """Three images (96x96, 96x80, 64x64), category ids 3 and 7, one image without annotations.

    Annotation 1 carries a polygon, 2 an RLE, 5 a compressed RLE; 3 is a crowd box, 4 crosses the border.
    """
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 96, "height": 96},
            {"id": 2, "file_name": "b.png", "width": 96, "height": 80},
            {"id": 3, "file_name": "c.png", "width": 64, "height": 64},
        ],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 16], "area": 320.0, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 26, 10, 26]]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [40, 40, 8, 8], "area": 64.0, "iscrowd": 0,
             "segmentation": {"size": [96, 96], "counts": [40 * 96 + 40, 8, 88, 8, 88, 8, 88, 8, 88, 8, 88, 8, 88,
                                                           8, 88, 8, 96 * 96 - 47 * 96 - 48]}},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 30], "area": 900.0, "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [80, 60, 30, 30], "area": 900.0, "iscrowd": 0},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [20, 50, 12, 10], "area": 120.0, "iscrowd": 0,
             "segmentation": {"size": [80, 96], "counts": "bc1:V2000000000000000000000^n4"}},
        ],
    }


def write_coco(root: Path, data: dict | None = None, ann_name: str = "ann.json") -> tuple[Path, Path, dict]:
    """Write the images of ``data`` (default :func:`tiny_coco`) under ``root/images`` and the JSON."""
    data = tiny_coco() if data is None else data
    img_dir = root / "images"
    images = data.get("images") if isinstance(data.get("images"), list) else tiny_coco()["images"]
    for i, im in enumerate(images):
        try:
            p, w, h = img_dir / im["file_name"], int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):  # a deliberately broken entry: no image for it
            continue
        if not p.exists():
            write_image(p, w, h, seed=i)
    ann = root / ann_name
    ann.write_text(json.dumps(data))
    return img_dir, ann, data


VISDRONE_ROWS = [
    "10,12,20,16,1,4,0,0",  # car
    "50,40,6,9,1,1,0,1",  # pedestrian
    "0,0,30,20,0,0,0,0",  # ignored region
    "60,60,50,50,1,6,1,0",  # truck crossing the border (clipped)
    "5,70,0,4,1,2,0,0",  # zero width (dropped)
]


def write_visdrone(root: Path, rows: list[str] | None = None, size: tuple[int, int] = (96, 80)) -> Path:
    """A one-image VisDrone-DET folder (``images/0000001.jpg`` + ``annotations/0000001.txt``)."""
    write_image(root / "images" / "0000001.jpg", *size)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "0000001.txt").write_text("\n".join(VISDRONE_ROWS if rows is None else rows) + "\n")
    return root


def child_env() -> dict[str, str]:
    """Environment for a ``python -m hmkd`` child: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def popen_cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    """Start ``python -m hmkd ARGS`` (stdout/stderr captured as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "hmkd", *args], cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw,
    )


def error_line(stderr: str) -> str:
    """The ``hmkd: error:`` line of a failed command's stderr; asserts it is the only one and the last.

    Log lines (INFO, e.g. a data set summary) may come before it; a traceback may not.
    """
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [l for l in lines if l.startswith("hmkd: error:")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    return errors[0]
