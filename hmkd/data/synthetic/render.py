"""Drawing one synthetic image (:func:`render_image`): background, distractors, the objects with
their visible masks, sensor noise (steps 1-4 of :mod:`hmkd.data.synthetic`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .shapes import SHAPES, rasterise

__all__ = ["render_image"]

# Palette shared by objects, distractors and (muted) backgrounds: colour never tells the class.
_PALETTE = np.array(
    [
        [220, 50, 47], [38, 139, 210], [133, 153, 0], [181, 137, 0], [211, 54, 130],
        [42, 161, 152], [203, 75, 22], [108, 113, 196], [235, 235, 225], [40, 40, 45],
        [150, 150, 150], [90, 60, 30],
    ],
    dtype=np.float32,
)

# the shape tests the distractors' elongated ellipses and thin strokes are drawn with
_DISC, _SQUARE = SHAPES["disc"][0], SHAPES["square"][0]


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


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(height, width)`` of an image ``size``: an int (square) or ``[height, width]``."""
    if isinstance(size, (list, tuple)):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def _background(rng: np.random.Generator, h: int, w: int, cfg: dict) -> np.ndarray:
    grey = np.float32(128.0)
    mix = rng.uniform(0.35, 0.7, 2).astype(np.float32)
    c0 = _colour(rng) * mix[0] + grey * (1 - mix[0])
    c1 = _colour(rng) * mix[1] + grey * (1 - mix[1])
    theta = rng.uniform(0, 2 * math.pi)
    # pixel coordinates over the longer side's span, so the gradient's direction is theta's on any h x w
    scale = np.float32(max(h, w) - 1)
    xc = np.arange(w, dtype=np.float32) / scale
    yc = np.arange(h, dtype=np.float32) / scale
    t = xc[None, :] * np.float32(math.cos(theta)) + yc[:, None] * np.float32(math.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] + (c1 - c0)[None, None, :] * t[:, :, None]
    g = int(rng.integers(3, 9))
    # a g x g grid over the shorter side (square cells on a non-square image; g x g on a square one)
    short = min(h, w)
    gh, gw = max(2, int(round(g * h / short))), max(2, int(round(g * w / short)))
    coarse = rng.normal(0.0, rng.uniform(8, 22), (gh, gw, 3)).astype(np.float32)
    img += _upsample(coarse, h, w)
    if rng.random() < cfg["texture_prob"]:
        phi = rng.uniform(0, math.pi)
        freq = rng.uniform(0.04, 0.25)
        amp = rng.uniform(4, 14)
        xpos = np.arange(w, dtype=np.float32)
        ypos = np.arange(h, dtype=np.float32)
        wave = np.sin(
            np.float32(2 * math.pi * freq)
            * (xpos[None, :] * np.float32(math.cos(phi)) + ypos[:, None] * np.float32(math.sin(phi)))
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
    h, w = img.shape[:2]
    extent = np.array([w, h], dtype=np.float64)  # (x, y) ranges; on a square image rng.uniform(0, size, 2)'s draws
    lo, hi = cfg["distractors"]
    for _ in range(int(rng.integers(lo, hi + 1))):
        kind = rng.integers(4)
        cx, cy = rng.uniform(0, extent)
        colour = _colour(rng, 25.0)
        opacity = rng.uniform(0.4, 0.95)
        length = float(np.exp(rng.uniform(math.log(4), math.log(max(5.0, 0.25 * min(h, w))))))
        angle = rng.uniform(0, math.pi)
        if kind == 0:  # elongated ellipse
            x0, y0, cov = rasterise(_DISC, {}, cx, cy, length / 2, length * rng.uniform(0.08, 0.3), angle)
        elif kind == 1:  # stroke
            width = min(rng.uniform(0.6, 2.0), length / 10)  # thin: never a small square
            x0, y0, cov = rasterise(_SQUARE, {}, cx, cy, length / 2, width, angle)
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

            x0, y0, cov = rasterise(lumpy, {}, cx, cy, length / 2, length / 2 * rng.uniform(0.6, 1.0), angle)
        else:  # soft blob
            r = length / 2
            x0, y0 = int(math.floor(cx - 2 * r)), int(math.floor(cy - 2 * r))
            n = int(math.ceil(4 * r)) + 1
            xs = np.arange(x0, x0 + n, dtype=np.float32) + 0.5 - np.float32(cx)
            ys = np.arange(y0, y0 + n, dtype=np.float32) + 0.5 - np.float32(cy)
            cov = np.exp(-(xs[None, :] ** 2 + ys[:, None] ** 2) / np.float32(2 * (r / 1.5) ** 2)).astype(np.float32)
        _blend(img, x0, y0, cov * np.float32(opacity), colour)


def _draw_size(rng: np.random.Generator, cfg: dict, image_size: int) -> float:
    """One object's side, clamped to 0.6 * ``image_size`` (the image's shorter side)."""
    mix = cfg["size_mix"]
    probs = np.array([m[0] for m in mix], dtype=np.float64)
    k = int(rng.choice(len(mix), p=probs / probs.sum()))
    lo, hi = float(mix[k][1]), float(mix[k][2])
    cap = 0.6 * image_size
    lo, hi = min(lo, cap), min(hi, cap)
    return float(np.exp(rng.uniform(math.log(lo), math.log(max(hi, lo + 1e-6)))))


def render_image(
    rng: np.random.Generator, size: int | tuple[int, int] | list[int], cfg: dict
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image of ``size``: an int (a square of that side) or ``[height, width]``. Sizes that
    depend on the image (the objects' 0.6 x cap, the distractors' length) use its shorter side; a
    square ``[s, s]`` gives the same image as ``s``.

    Returns:
        ``(image, objects)``: uint8 ``[H, W, 3]`` and, per labelled object, a dict with
        ``class_index`` (0-based into ``cfg["classes"]``), ``mask`` (bool ``[H, W]``,
        visible pixels), ``bbox`` ``[x, y, w, h]`` and ``area`` (visible pixel count).
    """
    H, W = _hw(size)
    classes = cfg["classes"]
    img = _background(rng, H, W, cfg)
    _distractors(rng, img, cfg)

    owner = np.full((H, W), -1, dtype=np.int32)
    placed: list[dict[str, Any]] = []  # cls, full, visible, x0, y0, h, w, cx, cy, side
    lo, hi = cfg["objects_per_image"]
    n_obj = int(rng.integers(lo, hi + 1))
    min_vis, min_px = float(cfg["min_visible"]), int(cfg["min_pixels"])
    min_dist = float(cfg["min_colour_distance"])
    jitter = math.radians(float(cfg["rotation_jitter"]))
    # larger objects are painted first, so small ones sit on top (and are rarely rejected)
    sides = sorted((_draw_size(rng, cfg, min(H, W)) for _ in range(n_obj)), reverse=True)
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
                cx, cy = rng.uniform(-margin, np.array([W + margin, H + margin], dtype=np.float64))
            x0, y0, cov = rasterise(test, params, cx, cy, half_w, half_h, angle)
            mask = cov >= 0.5
            full = int(mask.sum())
            if full < min_px:
                continue
            h, w = mask.shape
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
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
        mask = np.zeros((H, W), dtype=bool)
        mask[p["y0"] : p["y1"], p["x0"] : p["x1"]] = own
        bx0, by0 = p["x0"] + int(xs.min()), p["y0"] + int(ys.min())
        bx1, by1 = p["x0"] + int(xs.max()) + 1, p["y0"] + int(ys.max()) + 1
        objects.append(
            {"class_index": p["cls"], "mask": mask, "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": int(ys.size)}
        )
    return image, objects
