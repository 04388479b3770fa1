"""Synthetic generator: determinism, sanity of sizes/masks, idempotence, options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from hmkd.data.coco import CocoDetection
from hmkd.data.synthetic import generate_synthetic, synthetic_exists
from hmkd.errors import ConfigError

# pycocotools 2.0.x + numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = {"n_train": 4, "n_val": 2, "size": 96}


def _pixels(d: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for split in ("train", "val") for p in sorted((d / split / "images").glob("*.png"))]


def test_same_seed_identical_different_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ra = generate_synthetic(a, seed=3, **TINY)
    generate_synthetic(b, seed=3, **TINY)
    generate_synthetic(c, seed=4, **TINY)
    assert ra["generated"] and ra["train"]["images"] == 4 and ra["val"]["images"] == 2
    for split in ("train", "val"):
        ja = (a / "annotations" / f"{split}.json").read_bytes()
        assert ja == (b / "annotations" / f"{split}.json").read_bytes()
        assert ja != (c / "annotations" / f"{split}.json").read_bytes()
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert len(pa) == 6 and all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))


@pytest.mark.parametrize("preset, n_classes", [("default", 6), ("hard", 8)])
def test_annotations_are_sane(tmp_path, preset, n_classes):
    r = generate_synthetic(tmp_path, seed=0, preset=preset, **TINY)
    d = json.loads((tmp_path / "annotations" / "train.json").read_text())
    assert len(d["categories"]) == n_classes
    anns = d["annotations"]
    per_image = np.bincount([a["image_id"] for a in anns], minlength=5)[1:]
    assert per_image.min() >= (3 if preset == "default" else 20)
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).mean() > (0.6 if preset == "default" else 0.9)
    assert r["train"]["objects"] == len(anns) and r["train"]["small"] == int((areas < 32**2).sum())
    visible = {}
    for a in anns:
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == (96, 96) and int(m.sum()) == a["area"] and a["iscrowd"] == 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        # visible masks of one image never overlap
        seen = visible.setdefault(a["image_id"], np.zeros((96, 96), dtype=bool))
        assert not (seen & (m > 0)).any()
        seen |= m > 0
    if preset == "hard":
        sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns])
        assert np.median(sides) <= 16


def test_reuse_when_parameters_match(tmp_path):
    generate_synthetic(tmp_path, seed=1, **TINY)
    stamp = (tmp_path / "annotations" / "train.json").stat().st_mtime_ns
    assert synthetic_exists(tmp_path, seed=1, **TINY)
    assert not synthetic_exists(tmp_path, seed=2, **TINY)
    assert not synthetic_exists(tmp_path, seed=1, objects_per_image=[1, 2], **TINY)
    again = generate_synthetic(tmp_path, seed=1, **TINY)
    assert not again["generated"] and again["train"]["images"] == 4
    assert (tmp_path / "annotations" / "train.json").stat().st_mtime_ns == stamp
    small = dict(TINY, n_train=2)
    redo = generate_synthetic(tmp_path, seed=1, objects_per_image=[1, 3], **small)
    assert redo["generated"]
    assert len(list((tmp_path / "train" / "images").glob("*.png"))) == 2  # stale images removed
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["params"]["overrides"] == {"objects_per_image": [1, 3]}


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="'no_such_option'"):
        generate_synthetic(tmp_path, no_such_option=1, **TINY)
    with pytest.raises(ConfigError, match="preset 'nope'"):
        generate_synthetic(tmp_path, preset="nope", **TINY)
    with pytest.raises(ConfigError, match="'classes'"):
        generate_synthetic(tmp_path, classes=["disc", "blob"], **TINY)


def test_loads_as_coco_with_masks(tmp_path):
    generate_synthetic(tmp_path, seed=0, n_train=1, n_val=1, size=64)
    ds = CocoDetection(tmp_path / "val" / "images", tmp_path / "annotations" / "val.json", train=True, with_masks=True)
    img, t = ds[0]
    assert img.shape == (3, 64, 64) and t["masks"].shape[1:] == (64, 64)
    assert t["masks"].shape[0] == t["boxes"].shape[0] > 0
    assert ds.stats["clipped"] == 0 and ds.stats["dropped"] == 0


def test_aitod_preset_spans_the_aitod_buckets(tmp_path):
    r = generate_synthetic(tmp_path, seed=0, preset="aitod", n_train=6, n_val=1, size=192)
    t = r["train"]
    buckets = {"very_tiny": t["very_tiny"], "tiny": t["tiny"], "small_16_32": t["small_16_32"],
               "medium": t["medium"] + t["large"]}
    assert sum(buckets.values()) == t["objects"]
    for name, count in buckets.items():
        assert count >= 0.08 * t["objects"], (name, buckets)  # every bucket holds a real share


def test_pretrain_preset_has_other_classes_than_the_evaluation_sets(tmp_path):
    from hmkd.data.synthetic import PRESETS

    generate_synthetic(tmp_path, seed=0, preset="pretrain", n_train=2, n_val=1, size=128)
    d = json.loads((tmp_path / "annotations" / "train.json").read_text())
    names = {c["name"] for c in d["categories"]}
    assert names == set(PRESETS["pretrain"]["classes"]) and len(d["annotations"]) > 0
    for preset in ("default", "aitod"):
        assert not names & set(PRESETS[preset]["classes"]), preset
