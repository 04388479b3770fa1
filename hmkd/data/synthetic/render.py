"""Deterministic synthetic small-object detection data set, written as COCO (PNG images + JSON).

Layout written by :func:`generate_synthetic`::

    out_dir/train/images/000001.png ...   out_dir/val/images/000001.png ...
    out_dir/annotations/train.json        out_dir/annotations/val.json
    out_dir/meta.json                     (parameters + statistics; written last)

How an image is made (all randomness from a numpy ``Generator`` seeded by
``(seed, split, index, crc32(preset))``, so the same arguments give byte-identical JSON and
identical pixels, and image ``i`` does not depend on how many images are generated):

1. Background: a two-colour linear gradient in muted palette colours, low-frequency colour noise
   (bilinearly upsampled coarse grid) and, in some images, a stripe texture.
2. Distractors in the same palette as the objects: elongated ellipses, thin strokes, lobed blobs
   and soft (Gaussian) blobs, so colour never gives the class or the objectness away; none of them
   is one of the class shapes.
3. Objects: classes are shapes (``disc, square, triangle, ring, cross, diamond`` by default;
   ``hexagon`` and ``star`` join in the hard preset), colour drawn independently of the class
   (redrawn, up to 4 times, while within ``min_colour_distance`` of the local background, then
   blended toward the background by the ``contrast`` factor). Sizes (side of the shape's box)
   follow a mixture: mostly small (< 32 px), some medium, a few large. Shapes are rasterised with
   supersampled coverage (anti-aliased edges); the object's mask is coverage >= 0.5. Objects are
   painted largest first, later ones on top, optionally clustered next to earlier ones. An object
   is only placed if every object (itself included, also against the image border) keeps at least
   ``min_visible`` of its pixels and ``min_pixels`` pixels; otherwise it is re-placed
   (``place_tries`` times) or skipped. So every painted object is labelled, and no labelled object
   is mostly hidden.
4. Sensor noise over everything, then rounding to uint8.

Annotations are of what is *visible*: ``segmentation`` is the compressed RLE of the visible mask
(exact for tiny objects, unlike polygons), ``area`` its pixel count, ``bbox`` its tight box
``[x, y, w, h]`` in pixels, ``iscrowd`` 0.

Presets: ``"default"`` (the set of docs/CALIBRATION.md: 6-32 objects of 6-160 px, about 80% small, high contrast),
``"aitod"`` (the paper-regime benchmark's set: 10-40 objects whose sizes span AI-TOD's buckets, very
tiny to medium), ``"pretrain"`` (the ImageNet stand-in's set: the same kind of images with six other
classes, see :mod:`hmkd.engine.pretrain`) and ``"hard"`` (30-60 objects, mostly 4-16 px, clustered and
overlapping, 8 classes with confusable pairs disc/hexagon, square/diamond, cross/star, lower contrast
and more noise), any of whose keys can be overridden (see ``PRESETS``). A folder already holding a set made with the same
parameters (recorded in ``meta.json``) is not regenerated.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from hmkd.config import SynthConfig
from hmkd.errors import ConfigError
from hmkd.utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "SHAPES", "GENERATOR_VERSION", "generate_synthetic", "synthetic_exists", "render_image"]

GENERATOR_VERSION = 1
"""Bumped whenever the drawing changes, so stale folders are regenerated."""

# Palette shared by objects, distractors and (muted) backgrounds: colour never tells the class.
_PALETTE = np.array(
    [
        [220, 50, 47], [38, 139, 210], [133, 153, 0], [181, 137, 0], [211, 54, 130],
        [42, 161, 152], [203, 75, 22], [108, 113, 196], [235, 235, 225], [40, 40, 45],
        [150, 150, 150], [90, 60, 30],
    ],
    dtype=np.float32,
)

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "classes": ["disc", "square", "triangle", "ring", "cross", "diamond"],
        "objects_per_image": [6, 32],
        # [probability, min side, max side] in pixels; sides are clamped to 0.6 * image size.
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
    # the stand-in for ImageNet pretraining (hmkd.engine.pretrain): the same kind of images, other classes
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


# ---------------------------------------------------------------------------------------- shapes
# Each shape test takes local coordinates (u, v) scaled so the shape fills [-1, 1]^2 and returns
# a boolean array; `p` carries per-object parameters (ring hole, cross thickness, star depth).
def _disc(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return u * u + v * v <= 1.0


def _ring(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= p["hole"] ** 2)


def _square(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0


def _diamond(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _triangle(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return (v <= 1.0) & (2.0 * np.abs(u) <= v + 1.0)


def _cross(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    t = p["arm"]
    return ((au <= t) & (av <= 1.0)) | ((av <= t) & (au <= 1.0))


def _hexagon(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    s3 = math.sqrt(3.0) / 2.0
    av = np.abs(v) * s3
    return (av <= s3) & (s3 * np.abs(u) + 0.5 * av <= s3)


def _star(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u) + math.pi / 2.0
    frac = np.mod(phi * (5.0 / (2.0 * math.pi)), 1.0)
    tri = np.abs(frac - 0.5) * 2.0  # 1 at the tips, 0 between them
    return r <= p["inner"] + (1.0 - p["inner"]) * tri


def _pentagon(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(5):  # the half-planes of a regular pentagon's edges (apothem cos 36 degrees)
        a = math.pi / 2 + (2 * k + 1) * math.pi / 5
        inside &= u * math.cos(a) + v * math.sin(a) <= math.cos(math.pi / 5)
    return inside


def _crescent(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return (u * u + v * v <= 1.0) & ((u - p["bite"]) ** 2 + v * v > 0.8**2)


def _hourglass(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return (np.abs(v) <= 1.0) & (np.abs(u) <= np.abs(v) + 0.15)


def _chevron(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    outer = (v <= 1.0) & (2.0 * np.abs(u) <= v + 1.0)
    return outer & ~(2.0 * np.abs(u) <= v - 0.1)


# name -> (inside test, rotation: "free" or "jitter"). pentagon, crescent, hourglass and chevron are the
# classes of the "pretrain" preset only (the stand-in for ImageNet pretraining: other classes than the
# evaluation sets')
SHAPES: dict[str, tuple[Callable[[np.ndarray, np.ndarray, dict], np.ndarray], str]] = {
    "disc": (_disc, "free"),
    "ring": (_ring, "free"),
    "square": (_square, "jitter"),
    "diamond": (_diamond, "jitter"),
    "triangle": (_triangle, "free"),
    "cross": (_cross, "jitter"),
    "hexagon": (_hexagon, "free"),
    "star": (_star, "free"),
    "pentagon": (_pentagon, "free"),
    "crescent": (_crescent, "free"),
    "hourglass": (_hourglass, "free"),
    "chevron": (_chevron, "free"),
}


def _rasterise(
    test: Callable[[np.ndarray, np.ndarray, dict], np.ndarray],
    params: dict,
    cx: float,
    cy: float,
    half_w: float,
    half_h: float,
    angle: float,
) -> tuple[int, int, np.ndarray]:
    """Coverage of a shape on the pixel grid around (cx, cy).

    Returns ``(x0, y0, coverage)`` with coverage a float32 ``[h, w]`` patch whose top-left pixel is
    ``(x0, y0)`` in image coordinates (may lie outside the image).
    """
    radius = math.hypot(half_w, half_h)
    x0, y0 = int(math.floor(cx - radius)), int(math.floor(cy - radius))
    x1, y1 = int(math.ceil(cx + radius)), int(math.ceil(cy + radius))
    side = 2.0 * max(half_w, half_h)
    ss = 4 if side < 12 else (3 if side < 40 else 2)
    offs = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1) - cx
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1) - cy
    c, s = math.cos(angle), math.sin(angle)
    # rotate image offsets into the shape frame, then scale to [-1, 1]
    u = (xs[None, :] * c + ys[:, None] * s) / half_w
    v = (-xs[None, :] * s + ys[:, None] * c) / half_h
    inside = test(u, v, params)
    h, w = y1 - y0, x1 - x0
    cov = inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)
    return x0, y0, cov


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a ``[gh, gw, C]`` grid to ``[h, w, C]`` (elementwise, deterministic)."""
    gh, gw = grid.shape[:2]
    yy = np.linspace(0.0, gh - 1.0, h, dtype=np.float32)
    xx = np.linspace(0.0, gw - 1.0, w, dtype=np.float32)
    y0 = np.minimum(yy.astype(np.int64), gh - 2)
    x0 = np.minimum(xx.astype(np.int64), gw - 2)
    fy = (yy - y0)[:, None, None]
    fx = (xx - x0)[None, :, None]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _colour(rng: np.random.Generator, jitter: float = 18.0) -> np.ndarray:
    return np.clip(_PALETTE[rng.integers(len(_PALETTE))] + rng.uniform(-jitter, jitter, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, size: int, cfg: dict) -> np.ndarray:
    grey = np.float32(128.0)
    mix = rng.uniform(0.35, 0.7, 2).astype(np.float32)
    c0 = _colour(rng) * mix[0] + grey * (1 - mix[0])
    c1 = _colour(rng) * mix[1] + grey * (1 - mix[1])
    theta = rng.uniform(0, 2 * math.pi)
    coords = np.arange(size, dtype=np.float32) / np.float32(size - 1)
    t = coords[None, :] * np.float32(math.cos(theta)) + coords[:, None] * np.float32(math.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] + (c1 - c0)[None, None, :] * t[:, :, None]
    g = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, rng.uniform(8, 22), (g, g, 3)).astype(np.float32)
    img += _upsample(coarse, size, size)
    if rng.random() < cfg["texture_prob"]:
        phi = rng.uniform(0, math.pi)
        freq = rng.uniform(0.04, 0.25)
        amp = rng.uniform(4, 14)
        pos = np.arange(size, dtype=np.float32)
        wave = np.sin(
            np.float32(2 * math.pi * freq)
            * (pos[None, :] * np.float32(math.cos(phi)) + pos[:, None] * np.float32(math.sin(phi)))
        )
        tint = rng.uniform(0.5, 1.0, 3).astype(np.float32) * np.float32(amp)
        img += wave[:, :, None] * tint[None, None, :]
    return img


def _blend(img: np.ndarray, x0: int, y0: int, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` into ``img`` over a patch that may extend past the border."""
    H, W = img.shape[:2]
    h, w = alpha.shape
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if ix0 >= ix1 or iy0 >= iy1:
        return
    a = alpha[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0, None]
    region = img[iy0:iy1, ix0:ix1]
    col = colour if colour.ndim == 1 else colour[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    region *= 1.0 - a
    region += a * col


def _distractors(rng: np.random.Generator, img: np.ndarray, cfg: dict) -> None:
    size = img.shape[0]
    lo, hi = cfg["distractors"]
    for _ in range(int(rng.integers(lo, hi + 1))):
        kind = rng.integers(4)
        cx, cy = rng.uniform(0, size, 2)
        colour = _colour(rng, 25.0)
        opacity = rng.uniform(0.4, 0.95)
        length = float(np.exp(rng.uniform(math.log(4), math.log(max(5.0, 0.25 * size)))))
        angle = rng.uniform(0, math.pi)
        if kind == 0:  # elongated ellipse
            x0, y0, cov = _rasterise(_disc, {}, cx, cy, length / 2, length * rng.uniform(0.08, 0.3), angle)
        elif kind == 1:  # stroke
            width = min(rng.uniform(0.6, 2.0), length / 10)  # thin: never a small square
            x0, y0, cov = _rasterise(_square, {}, cx, cy, length / 2, width, angle)
        elif kind == 2:  # lumpy blob: several overlapping discs
            n = int(rng.integers(3, 6))
            # lobes spread around a ring so the blob never reads as a disc
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = rng.uniform(0.35, 0.6, n)
            offs = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
            radii = rng.uniform(0.28, 0.42, n)

            def lumpy(u: np.ndarray, v: np.ndarray, p: dict, offs=offs, radii=radii) -> np.ndarray:
                out = np.zeros(u.shape, dtype=bool)
                for (ox, oy), r in zip(offs, radii):
                    out |= (u - ox) ** 2 + (v - oy) ** 2 <= r * r
                return out

            x0, y0, cov = _rasterise(lumpy, {}, cx, cy, length / 2, length / 2 * rng.uniform(0.6, 1.0), angle)
        else:  # soft blob
            r = length / 2
            x0, y0 = int(math.floor(cx - 2 * r)), int(math.floor(cy - 2 * r))
            n = int(math.ceil(4 * r)) + 1
            xs = np.arange(x0, x0 + n, dtype=np.float32) + 0.5 - np.float32(cx)
            ys = np.arange(y0, y0 + n, dtype=np.float32) + 0.5 - np.float32(cy)
            cov = np.exp(-(xs[None, :] ** 2 + ys[:, None] ** 2) / np.float32(2 * (r / 1.5) ** 2)).astype(np.float32)
        _blend(img, x0, y0, cov * np.float32(opacity), colour)


def _draw_size(rng: np.random.Generator, cfg: dict, image_size: int) -> float:
    mix = cfg["size_mix"]
    probs = np.array([m[0] for m in mix], dtype=np.float64)
    k = int(rng.choice(len(mix), p=probs / probs.sum()))
    lo, hi = float(mix[k][1]), float(mix[k][2])
    cap = 0.6 * image_size
    lo, hi = min(lo, cap), min(hi, cap)
    return float(np.exp(rng.uniform(math.log(lo), math.log(max(hi, lo + 1e-6)))))


def render_image(
    rng: np.random.Generator, size: int, cfg: dict
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image.

    Returns:
        ``(image, objects)``: uint8 ``[size, size, 3]`` and, per labelled object, a dict with
        ``class_index`` (0-based into ``cfg["classes"]``), ``mask`` (bool ``[size, size]``,
        visible pixels), ``bbox`` ``[x, y, w, h]`` and ``area`` (visible pixel count).
    """
    classes = cfg["classes"]
    img = _background(rng, size, cfg)
    _distractors(rng, img, cfg)

    owner = np.full((size, size), -1, dtype=np.int32)
    placed: list[dict[str, Any]] = []  # cls, full, visible, x0, y0, h, w, cx, cy, side
    lo, hi = cfg["objects_per_image"]
    n_obj = int(rng.integers(lo, hi + 1))
    min_vis, min_px = float(cfg["min_visible"]), int(cfg["min_pixels"])
    min_dist = float(cfg["min_colour_distance"])
    jitter = math.radians(float(cfg["rotation_jitter"]))
    # larger objects are painted first, so small ones sit on top (and are rarely rejected)
    sides = sorted((_draw_size(rng, cfg, size) for _ in range(n_obj)), reverse=True)
    for side in sides:
        cls = int(rng.integers(len(classes)))
        test, rot_kind = SHAPES[classes[cls]]
        aspect = float(rng.uniform(*cfg["aspect"]))
        if classes[cls] in ("disc", "ring", "hexagon", "star", "pentagon", "crescent"):
            aspect = 1.0 + (aspect - 1.0) * 0.4  # keep round shapes round-ish
        half_w = side / 2 * math.sqrt(aspect)
        half_h = side / 2 / math.sqrt(aspect)
        angle = rng.uniform(0, 2 * math.pi) if rot_kind == "free" else rng.uniform(-jitter, jitter)
        params = {"hole": rng.uniform(0.45, 0.65), "arm": rng.uniform(0.28, 0.4), "inner": rng.uniform(0.38, 0.5)}
        if classes[cls] == "crescent":  # drawn only for crescents: the other classes' random streams stay as they were
            params["bite"] = rng.uniform(0.45, 0.7)
        base_colour = _colour(rng)
        contrast = np.float32(rng.uniform(*cfg["contrast"]))
        shade = rng.uniform(-0.15, 0.15, 2).astype(np.float32)
        opacity = np.float32(rng.uniform(0.85, 1.0))
        for _try in range(int(cfg["place_tries"])):
            if placed and rng.random() < cfg["cluster_prob"]:
                ref = placed[int(rng.integers(len(placed)))]
                spread = 0.7 * (ref["side"] + side) / 2
                cx, cy = ref["cx"] + rng.normal(0, spread), ref["cy"] + rng.normal(0, spread)
            else:
                margin = 0.25 * side
                cx, cy = rng.uniform(-margin, size + margin, 2)
            x0, y0, cov = _rasterise(test, params, cx, cy, half_w, half_h, angle)
            mask = cov >= 0.5
            full = int(mask.sum())
            if full < min_px:
                continue
            h, w = mask.shape
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            m_in = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            vis = int(m_in.sum())
            if vis < min_px or vis < min_vis * full:
                continue
            own = owner[iy0:iy1, ix0:ix1]
            hidden = own[m_in]
            hidden = hidden[hidden >= 0]
            ok = True
            counts = np.bincount(hidden, minlength=len(placed)) if hidden.size else None
            if counts is not None:
                for k in np.flatnonzero(counts):
                    left = placed[k]["visible"] - int(counts[k])
                    if left < min_px or left < min_vis * placed[k]["full"]:
                        ok = False
                        break
            if not ok:
                continue
            if counts is not None:
                for k in np.flatnonzero(counts):
                    placed[k]["visible"] -= int(counts[k])
            idx = len(placed)
            own[m_in] = idx
            # colour: blend toward the local background for low contrast, plus a linear shading
            patch_bg = img[iy0:iy1, ix0:ix1].reshape(-1, 3).mean(axis=0)
            for _c in range(4):  # a colour too close to the background would make the object invisible
                if float(np.abs(base_colour - patch_bg).max()) >= min_dist:
                    break
                base_colour = _colour(rng)
            colour = patch_bg + contrast * (base_colour - patch_bg)
            ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
            xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
            shading = (1.0 + shade[0] * xs + shade[1] * ys)[:, :, None]
            _blend(img, x0, y0, cov * opacity, colour[None, None, :] * shading)
            placed.append(
                {"cls": cls, "full": full, "visible": vis, "x0": ix0, "y0": iy0, "x1": ix1, "y1": iy1,
                 "cx": cx, "cy": cy, "side": side}
            )
            break

    sigma = np.float32(rng.uniform(*cfg["noise_sigma"]))
    img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = []
    for k, p in enumerate(placed):
        own = owner[p["y0"] : p["y1"], p["x0"] : p["x1"]] == k
        ys, xs = np.nonzero(own)
        if ys.size == 0:  # cannot happen given the visibility rule; kept for safety
            continue
        mask = np.zeros((size, size), dtype=bool)
        mask[p["y0"] : p["y1"], p["x0"] : p["x1"]] = own
        bx0, by0 = p["x0"] + int(xs.min()), p["y0"] + int(ys.min())
        bx1, by1 = p["x0"] + int(xs.max()) + 1, p["y0"] + int(ys.max()) + 1
        objects.append(
            {"class_index": p["cls"], "mask": mask, "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": int(ys.size)}
        )
    return image, objects


# ---------------------------------------------------------------------------------------- writing
def _resolve_config(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
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


def _split_options(options: dict[str, Any]) -> tuple[SynthConfig, dict[str, Any], dict[str, Any]]:
    """``options`` -> (the set's size/seed/preset, the preset overrides, the resolved preset), checked.
    The defaults of the first are :class:`hmkd.config.SynthConfig`'s, the run config's ``data.synth``."""
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    spec = SynthConfig(**{k: v for k, v in options.items() if k in names})
    overrides = {k: v for k, v in options.items() if k not in names}
    if int(spec.size) < 16:
        raise ConfigError(f"synthetic option 'size' must be at least 16 pixels, got {spec.size}")
    if int(spec.n_train) < 0 or int(spec.n_val) < 0:
        raise ConfigError(f"synthetic n_train/n_val must be >= 0, got {spec.n_train}/{spec.n_val}")
    return spec, overrides, _resolve_config(spec.preset, overrides)


def _params(spec: SynthConfig, overrides: dict) -> dict:
    return json.loads(
        json.dumps(
            {
                "generator_version": GENERATOR_VERSION,
                "n_train": int(spec.n_train),
                "n_val": int(spec.n_val),
                "size": int(spec.size),
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
    out_dir: Path, split: str, split_code: int, n: int, size: int, seed: int, cfg: dict, preset_code: int
) -> dict[str, Any]:
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
        images.append({"id": i, "file_name": name, "width": size, "height": size})
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
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
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
            (images per split), ``size`` (square image side in pixels), ``seed`` (image ``i`` of a
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
            train = _generate_split(out, "train", 0, int(n_train), int(size), int(seed), cfg, preset_code)
            val = _generate_split(out, "val", 1, int(n_val), int(size), int(seed), cfg, preset_code)
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
