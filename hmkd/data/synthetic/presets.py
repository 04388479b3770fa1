"""The synthetic generator's presets (``PRESETS``) and how a preset with overrides becomes the
configuration the renderer draws from (:func:`resolve_config`, which checks every key and value)."""

from __future__ import annotations

import copy
import json
from typing import Any

from hmkd.errors import ConfigError

from .shapes import SHAPES

__all__ = ["PRESETS", "resolve_config"]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "classes": ["disc", "square", "triangle", "ring", "cross", "diamond"],
        "objects_per_image": [6, 32],
        # [probability, min side, max side] in pixels; sides are clamped to 0.6 * the image's shorter side.
        "size_mix": [[0.75, 6, 31], [0.20, 32, 96], [0.05, 96, 160]],
        "aspect": [0.8, 1.25],
        "rotation_jitter": 10.0,  # degrees, for shapes whose rotation defines the class
        "contrast": [0.75, 1.0],  # 1 = pure palette colour, 0 = local background colour
        "noise_sigma": [2.0, 6.0],  # sensor noise, 0-255 units
        "distractors": [8, 24],
        "texture_prob": 0.4,
        "cluster_prob": 0.1,
        "min_visible": 0.6,
        "min_pixels": 8,
        "min_colour_distance": 60.0,  # palette colour vs local background, max over RGB (0-255)
        "place_tries": 6,
    },
    # the paper-regime evaluation set: object sides spanning AI-TOD's buckets (very tiny < 8 px,
    # tiny 8-16, small 16-32, medium >= 32; areas in px^2 are those sides squared)
    "aitod": {
        "classes": ["disc", "square", "triangle", "ring", "cross", "diamond"],
        "objects_per_image": [10, 40],
        "size_mix": [[0.22, 5, 9], [0.33, 9, 17], [0.30, 17, 34], [0.15, 34, 96]],
        "aspect": [0.8, 1.25],
        "rotation_jitter": 10.0,
        "contrast": [0.6, 1.0],
        "noise_sigma": [2.0, 7.0],
        "distractors": [10, 28],
        "texture_prob": 0.4,
        "cluster_prob": 0.2,
        "min_visible": 0.6,
        "min_pixels": 8,
        "min_colour_distance": 60.0,
        "place_tries": 6,
    },
    # the stand-in for ImageNet pretraining (hmkd.training.pretrain): the same kind of images, other classes
    "pretrain": {
        "classes": ["hexagon", "star", "pentagon", "crescent", "hourglass", "chevron"],
        "objects_per_image": [8, 32],
        "size_mix": [[0.5, 6, 20], [0.35, 20, 48], [0.15, 48, 128]],
        "aspect": [0.8, 1.25],
        "rotation_jitter": 10.0,
        "contrast": [0.6, 1.0],
        "noise_sigma": [2.0, 7.0],
        "distractors": [8, 24],
        "texture_prob": 0.4,
        "cluster_prob": 0.15,
        "min_visible": 0.6,
        "min_pixels": 8,
        "min_colour_distance": 60.0,
        "place_tries": 6,
    },
    "hard": {
        "classes": ["disc", "hexagon", "square", "diamond", "triangle", "ring", "cross", "star"],
        "objects_per_image": [30, 60],
        "size_mix": [[0.85, 4, 16], [0.12, 16, 40], [0.03, 40, 96]],
        "aspect": [0.8, 1.25],
        "rotation_jitter": 20.0,
        "contrast": [0.35, 0.7],
        "noise_sigma": [4.0, 10.0],
        "distractors": [20, 45],
        "texture_prob": 0.6,
        "cluster_prob": 0.45,
        "min_visible": 0.5,
        "min_pixels": 6,
        "min_colour_distance": 60.0,
        "place_tries": 6,
    },
}

# the paper's image size for cost runs (configs/coco/cost_800x1333.yaml, 800 x 1333): the `aitod` set's
# look with VisDrone-like counts, 45 objects per image of which ~36 small (sides 6-31 px) and ~9 larger
# (32-160 px), and clutter in proportion to the larger image
PRESETS["paper_size"] = {**copy.deepcopy(PRESETS["aitod"]), "objects_per_image": [45, 45],
                         "size_mix": [[0.8, 6, 31], [0.2, 32, 160]], "distractors": [40, 100]}


def resolve_config(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``PRESETS[preset]`` with ``overrides`` replacing its keys, checked.

    Raises:
        ConfigError: unknown preset, key or shape, or an invalid value.
    """
    if preset not in PRESETS:
        raise ConfigError(f"synthetic preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    cfg = json.loads(json.dumps(PRESETS[preset]))
    for key, value in overrides.items():
        if key not in cfg:
            raise ConfigError(f"synthetic option {key!r} is unknown; valid options: {sorted(cfg)}")
        cfg[key] = json.loads(json.dumps(value))
    bad = [c for c in cfg["classes"] if c not in SHAPES]
    if bad or not cfg["classes"]:
        raise ConfigError(f"synthetic option 'classes' has unknown shapes {bad}; known: {sorted(SHAPES)}")
    if len(set(cfg["classes"])) != len(cfg["classes"]):
        raise ConfigError(f"synthetic option 'classes' repeats a shape: {cfg['classes']}")
    lo, hi = cfg["objects_per_image"]
    if not 0 <= lo <= hi:
        raise ConfigError(f"synthetic option 'objects_per_image' must be [min, max] with 0 <= min <= max, got {[lo, hi]}")
    for entry in cfg["size_mix"]:
        if len(entry) != 3 or entry[0] < 0 or not 0 < entry[1] <= entry[2]:
            raise ConfigError(f"synthetic option 'size_mix' entry {entry} must be [probability, min_side, max_side]")
    if not 0.0 < float(cfg["min_visible"]) <= 1.0:
        raise ConfigError(f"synthetic option 'min_visible' must be in (0, 1], got {cfg['min_visible']}")
    return cfg
