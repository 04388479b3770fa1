"""The synthetic generator's classes: shape tests (``SHAPES``) and their anti-aliased
rasterisation onto the pixel grid (:func:`rasterise`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["SHAPES", "rasterise"]


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


def rasterise(
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
