"""Writing the synthetic set as COCO (:func:`generate_synthetic`: PNG images, JSON annotations,
``meta.json``) and finding one already written with the same parameters (:func:`synthetic_exists`)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import numbers
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from hmkd.config import SynthConfig
from hmkd.errors import ConfigError
from hmkd.utils import write_json

from .presets import resolve_config
from .render import render_image

logger = logging.getLogger(__package__)  # hmkd.data.synthetic, the name its log lines always had

__all__ = ["GENERATOR_VERSION", "generate_synthetic", "synthetic_exists"]

GENERATOR_VERSION = 1
"""Bumped whenever the drawing changes, so stale folders are regenerated."""


def _side_ok(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 16


def _size_key(size: Any) -> int | list[int]:
    """The image size as the parameters record it: an int (square; as every set before non-square
    sizes recorded it) or ``[height, width]``; checked (each side at least 16 pixels)."""
    if isinstance(size, (list, tuple)):
        sides = list(size)
        ok = len(sides) == 2 and all(_side_ok(v) for v in sides)
    else:
        sides = size
        ok = _side_ok(size)
    if not ok:
        raise ConfigError(
            f"synthetic option 'size' must be an integer >= 16 (a square) or [height, width] of two such integers, "
            f"got {size!r}"
        )
    return [int(v) for v in sides] if isinstance(sides, list) else int(sides)


def _split_options(options: dict[str, Any]) -> tuple[SynthConfig, dict[str, Any], dict[str, Any]]:
    """``options`` -> (the set's size/seed/preset, the preset overrides, the resolved preset), checked.
    The defaults of the first are :class:`hmkd.config.SynthConfig`'s, the run config's ``data.synth``."""
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    spec = SynthConfig(**{k: v for k, v in options.items() if k in names})
    overrides = {k: v for k, v in options.items() if k not in names}
    spec.size = _size_key(spec.size)
    if int(spec.n_train) < 0 or int(spec.n_val) < 0:
        raise ConfigError(f"synthetic n_train/n_val must be >= 0, got {spec.n_train}/{spec.n_val}")
    return spec, overrides, resolve_config(spec.preset, overrides)


def _params(spec: SynthConfig, overrides: dict) -> dict:
    return json.loads(
        json.dumps(
            {
                "generator_version": GENERATOR_VERSION,
                "n_train": int(spec.n_train),
                "n_val": int(spec.n_val),
                "size": _size_key(spec.size),
                "seed": int(spec.seed),
                "preset": spec.preset,
                "overrides": {k: overrides[k] for k in sorted(overrides)},
            }
        )
    )


def _read_meta(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / "meta.json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _exists(out_dir: Path, params: dict) -> bool:
    meta = _read_meta(out_dir)
    if meta is None or meta.get("params") != params:
        return False
    for split, n in (("train", params["n_train"]), ("val", params["n_val"])):
        if not (out_dir / "annotations" / f"{split}.json").is_file():
            return False
        img_dir = out_dir / split / "images"
        if n and not (img_dir / f"{n:06d}.png").is_file():
            return False
    return True


def synthetic_exists(out_dir: str | os.PathLike, **options: Any) -> bool:
    """True when ``out_dir`` holds a complete set generated with exactly these options (those of
    :func:`generate_synthetic`)."""
    spec, overrides, _ = _split_options(options)
    return _exists(Path(out_dir), _params(spec, overrides))


def _split_stats(objs_per_image: list[int], areas: list[int]) -> dict[str, Any]:
    a = np.asarray(areas, dtype=np.float64)
    n = len(objs_per_image)
    return {
        "images": n,
        "objects": int(a.size),
        "objects_per_image": float(np.mean(objs_per_image)) if n else 0.0,
        "small": int((a < 32**2).sum()),
        "medium": int(((a >= 32**2) & (a < 96**2)).sum()),
        "large": int((a >= 96**2).sum()),
        # AI-TOD's buckets
        "very_tiny": int((a < 8**2).sum()),
        "tiny": int(((a >= 8**2) & (a < 16**2)).sum()),
        "small_16_32": int(((a >= 16**2) & (a < 32**2)).sum()),
        "empty_images": int(sum(1 for k in objs_per_image if k == 0)),
    }


def _generate_split(
    out_dir: Path, split: str, split_code: int, n: int, size: int | list[int], seed: int, cfg: dict,
    preset_code: int,
) -> dict[str, Any]:
    height, width = (size, size) if isinstance(size, int) else size
    img_dir = out_dir / split / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    images, anns, per_image, areas = [], [], [], []
    ann_id = 1
    for i in range(1, n + 1):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_code, i, preset_code]))
        pixels, objects = render_image(rng, size, cfg)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(img_dir / name, compress_level=1)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        for o in objects:
            rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
            anns.append(
                {
                    "id": ann_id,
                    "image_id": i,
                    "category_id": o["class_index"] + 1,
                    "bbox": o["bbox"],
                    "area": float(o["area"]),
                    "iscrowd": 0,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                }
            )
            ann_id += 1
            areas.append(o["area"])
        per_image.append(len(objects))
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(cfg["classes"])]
    data = {
        "info": {"description": f"hmkd synthetic small-object set ({split})", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    write_json(out_dir / "annotations" / f"{split}.json", data, indent=None, separators=(",", ":"))
    return _split_stats(per_image, areas)


def generate_synthetic(out_dir: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Generate (or reuse) the synthetic COCO-format data set in ``out_dir``.

    Args:
        out_dir: output folder (created).
        **options: the fields of :class:`SynthConfig` (defaults there): ``n_train``, ``n_val``
            (images per split), ``size`` (an int: a square image's side in pixels; ``[height, width]``:
            any other shape, the objects' size cap then taken from the shorter side), ``seed`` (image ``i`` of a
            split uses ``SeedSequence([seed, split, i, crc32(preset)])``), ``preset``
            (a name of ``PRESETS``); any other name replaces that key of the preset (see
            ``PRESETS``), e.g. ``objects_per_image=[3, 8]``.

    Returns:
        ``{"out_dir", "generated" (False if reused), "seconds", "params", "config",
        "train": stats, "val": stats}``; stats count images, objects and small/medium/large objects.

    Raises:
        ConfigError: unknown preset or option, or an invalid option value.
    """
    spec, overrides, cfg = _split_options(options)
    params = _params(spec, overrides)
    n_train, n_val, size, seed, preset = spec.n_train, spec.n_val, spec.size, spec.seed, spec.preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".generate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several processes (DDP ranks) may call this at once
        try:
            if _exists(out, params):
                meta = _read_meta(out) or {}
                logger.info("synthetic set in %s already exists with these parameters; reusing it", out)
                return {"out_dir": str(out), "generated": False, "seconds": 0.0, "params": params,
                        "config": meta.get("config", cfg), "train": meta.get("train", {}),
                        "val": meta.get("val", {})}
            (out / "meta.json").unlink(missing_ok=True)
            t0 = time.perf_counter()
            preset_code = zlib.crc32(preset.encode("utf-8"))
            train = _generate_split(out, "train", 0, int(n_train), size, int(seed), cfg, preset_code)
            val = _generate_split(out, "val", 1, int(n_val), size, int(seed), cfg, preset_code)
            seconds = time.perf_counter() - t0
            meta = {"params": params, "config": cfg, "train": train, "val": val}
            write_json(out / "meta.json", meta, indent=2, sort_keys=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    logger.info(
        "synthetic set (%s) written to %s in %.1f s: train %d images / %d objects (%.0f%% small), val %d / %d",
        preset, out, seconds, train["images"], train["objects"],
        100.0 * train["small"] / max(train["objects"], 1), val["images"], val["objects"],
    )
    return {"out_dir": str(out), "generated": True, "seconds": seconds, "params": params, "config": cfg,
            "train": train, "val": val}
