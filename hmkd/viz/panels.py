"""What the side-by-side pictures share (:mod:`hmkd.viz.detections`, :mod:`hmkd.viz.heatmap`): the
checks and model building of a picture's panels (:func:`build_panel_models`), the font and its
sizes (about 1/45 of a panel's width, or a size given in pixels), box line widths, the title bar
over the panels (:func:`header_lines`, :func:`draw_header`, :func:`title_height`: a title that
does not fit is wrapped onto more lines), the legend under them (:func:`legend_lines`,
:func:`draw_legend`, :func:`legend_height`), the gap between panels and the red of small objects,
and the atomic PNG write (:func:`save_png`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from hmkd.errors import ConfigError
from hmkd.models.specs import ModelSpec, as_model
from hmkd.utils import atomic_open

SMALL_COLOUR = (255, 0, 0)
"""Small objects: their outline, and a panel title that counts them."""
PANEL_GAP = 4
"""Pixels between panels."""

__all__ = [
    "PANEL_GAP",
    "SMALL_COLOUR",
    "build_panel_models",
    "draw_header",
    "draw_legend",
    "fit_text",
    "font_size",
    "header_lines",
    "legend_height",
    "legend_lines",
    "line_height",
    "load_font",
    "save_png",
    "scratch_draw",
    "stroke",
    "text_size",
    "title_height",
    "wrap_text",
]


def build_panel_models(
    what: str,
    models: Sequence[tuple[str, ModelSpec]],
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Path, list[tuple[str, nn.Module]]]:
    """Checks shared by the side-by-side pictures, then ``(out folder, [(label, eval-mode model)])``."""
    if not models:
        raise ConfigError(f"{what}: no models given")
    if not images:
        raise ConfigError(f"{what}: no images given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, [(label, as_model(spec, num_classes=num_classes, device=device)) for label, spec in models]


# --------------------------------------------------------------------------- text and layout


def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut (with ``..``) to fit ``width`` pixels."""
    if text_size(draw, text, font)[0] <= width:
        return text
    while text and text_size(draw, text + "..", font)[0] > width:
        text = text[:-1]
    return text + ".."


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a word longer than a line
    is cut with ``..``)."""
    lines: list[str] = []
    cur = ""
    for word in str(text).split(" "):
        trial = f"{cur} {word}" if cur else word
        if text_size(draw, trial, font)[0] <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    lines.append(cur)
    return [fit_text(draw, line, font, width) for line in lines]


def font_size(width: int, text_px: int | None = None) -> int:
    """Title font size for panels ``width`` pixels wide: about 1/45 of it, 10 to 40 px, or
    ``text_px`` when given (a picture shown smaller than its pixels, e.g. in a README, needs more)."""
    if text_px is not None:
        return int(text_px)
    return int(max(10, min(40, round(width / 45))))


def line_height(fs: int) -> int:
    return fs + 5


def stroke(width: int) -> int:
    """Box line width unit for an image ``width`` pixels wide (1 up to 960 px, then 2, 3 ...)."""
    return max(1, round(width / 640))


def title_height(width: int, lines: int = 2, *, text_px: int | None = None) -> int:
    """Height in pixels of the title bar above panels ``width`` pixels wide holding ``lines`` lines
    (a title and one line of counts, unless a panel is too narrow for them: then more)."""
    return lines * line_height(font_size(width, text_px)) + 4


def scratch_draw() -> ImageDraw.ImageDraw:
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def header_lines(width: int, title: str, info: str, *, text_px: int | None = None) -> list[tuple[str, bool]]:
    """The lines of one panel's title bar: ``[(text, is_title)]`` (the title cut to one line, the
    information line wrapped)."""
    fs = font_size(width, text_px)
    draw = scratch_draw()
    out = [(fit_text(draw, str(title), load_font(fs), width - 6), True)]
    out += [(line, False) for line in wrap_text(draw, info, load_font(max(9, fs - 2)), width - 6)]
    return out


def draw_header(draw: ImageDraw.ImageDraw, x0: int, width: int, lines: Sequence[tuple[str, bool]],
                colour: tuple[int, int, int] = (60, 60, 60), *, text_px: int | None = None) -> None:
    """Draw :func:`header_lines` at panel offset ``x0`` (title black, the rest in ``colour``)."""
    fs = font_size(width, text_px)
    for k, (text, is_title) in enumerate(lines):
        font = load_font(fs if is_title else max(9, fs - 2))
        draw.text((x0 + 3, 2 + k * line_height(fs)), text, fill=(0, 0, 0) if is_title else colour, font=font)


def legend_lines(panel_width: int, text: str, width: int | None = None, *, text_px: int | None = None) -> list[str]:
    """``text`` wrapped to a picture ``width`` pixels wide (default ``panel_width``) in the font of
    panels ``panel_width`` pixels wide."""
    fs = font_size(panel_width, text_px)
    return wrap_text(scratch_draw(), text, load_font(max(9, fs - 2)), (width or panel_width) - 6)


def legend_height(width: int, lines: int, *, text_px: int | None = None) -> int:
    """Height in pixels of a legend of ``lines`` lines under panels ``width`` pixels wide."""
    return lines * line_height(font_size(width, text_px)) + 4 if lines else 0


def draw_legend(draw: ImageDraw.ImageDraw, y0: int, width: int, lines: Sequence[str], *,
                text_px: int | None = None) -> None:
    """Draw :func:`legend_lines` from ``y0`` down."""
    fs = font_size(width, text_px)
    for k, line in enumerate(lines):
        draw.text((3, y0 + 2 + k * line_height(fs)), line, fill=(60, 60, 60), font=load_font(max(9, fs - 2)))


def save_png(image: Image.Image, path: str | os.PathLike) -> str:
    """Save a PNG atomically (temp file + replace); returns the path."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return str(path)
