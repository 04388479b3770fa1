"""Detection pictures: the detections of several models on one image, side by side (paper Fig. 4).

For each image, :func:`draw_detections` writes one PNG with one panel per model. Every panel has the
image's original resolution (plus a title bar on top), boxes coloured by class with ``label score``
tags, and *small* detections (box area below ``small_area``, 32 x 32 px by default, measured in the
original image, as COCO's APs does) marked distinctly: a red outer outline around the class-coloured
box, as the paper highlights small objects in red, and a count in the panel title.

This module also holds the small helpers the inspection tools share: :func:`load_image` (a file to a
``[3, H, W]`` float tensor in ``[0, 1]``), :func:`as_model` (a model, a :class:`ModelConfig` or a
``(ModelConfig, weights_path)`` pair to an eval-mode detector) and :func:`specs_from_config`
(``--weights LABEL=CKPT`` pairs to model specs: ``teacher*`` labels take the config's teacher
architecture, every other label the student's, since a distilled student is a student).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from hmkd.config import Config, ModelConfig
from hmkd.errors import CheckpointError, ConfigError
from hmkd.utils import atomic_open, write_json
from hmkd.models import build_model, read_state_dict

ModelSpec = Union[nn.Module, ModelConfig, tuple[ModelConfig, Union[str, None]]]
"""A detector given as a module, as a config (its own ``weights``), or as ``(config, weights path)``."""

SMALL_COLOUR = (255, 0, 0)
# tab10-like class colours without pure red, which marks small detections
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (255, 187, 120),
    (152, 223, 138), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (174, 199, 232), (0, 90, 50), (90, 0, 120), (120, 90, 0),
]
_SEP = 4  # pixels between panels

__all__ = [
    "ModelSpec",
    "PALETTE",
    "SMALL_COLOUR",
    "as_model",
    "class_colour",
    "draw_detections",
    "draw_panels",
    "infer_num_classes",
    "load_image",
    "run_detector",
    "specs_from_config",
]


# --------------------------------------------------------------------------- shared helpers


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as RGB float ``[3, H, W]`` in ``[0, 1]``; ``size=(H, W)`` resizes it (bilinear)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: image file not found")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None:
                im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except OSError as e:
        raise ConfigError(f"{path}: not a readable image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def infer_num_classes(cfg: ModelConfig, weights: str) -> int:
    """The class count (without background) of a detector checkpoint, read off its classifier shape."""
    from hmkd.models.torchvision_zoo import detector_family

    sd = read_state_dict(weights)
    family = detector_family(cfg.detector)
    if family in ("faster_rcnn", "mask_rcnn"):
        key, per_loc = "roi_heads.box_predictor.cls_score.weight", 1
    elif family == "fcos":
        key, per_loc = "head.classification_head.cls_logits.weight", 1
    elif family == "retinanet":
        key, per_loc = "head.classification_head.cls_logits.weight", 9  # 3 octaves x 3 ratios
    else:
        raise ConfigError(f"unknown detector {cfg.detector!r}")
    if key not in sd:
        raise CheckpointError(f"{weights}: no '{key}'; is it a {cfg.detector} checkpoint?")
    n = sd[key].shape[0]
    if n % per_loc:
        raise CheckpointError(f"{weights}: '{key}' has {n} outputs, not a multiple of {per_loc} anchors")
    return n // per_loc - 1


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


def as_model(spec: ModelSpec, *, num_classes: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode detector on ``device`` from a :data:`ModelSpec`.

    For a config, the class count is ``cfg.num_classes``, else ``num_classes``, else read off the
    weights file; weights given in the pair replace ``cfg.weights`` (``None`` keeps ``cfg.weights``).
    """
    if isinstance(spec, nn.Module):
        return spec.eval().to(device)
    if isinstance(spec, ModelConfig):
        cfg, path = spec, spec.weights
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], ModelConfig):
        cfg, path = spec[0], spec[1] if spec[1] is not None else spec[0].weights
    else:
        raise ConfigError(f"a model must be an nn.Module, a ModelConfig or (ModelConfig, weights), got {type(spec).__name__}")
    n = cfg.num_classes if cfg.num_classes is not None else num_classes
    if n is None and path:
        n = infer_num_classes(cfg, str(path))
    if n is None:
        raise ConfigError("model.num_classes is not set, and no weights file or data set gives it")
    cfg = dataclasses.replace(cfg, weights=str(path) if path else None)
    if cfg.weights:
        cfg = dataclasses.replace(cfg, backbone_weights=None)  # the full weights replace them anyway
    return build_model(cfg, n).eval().to(device)


def specs_from_config(cfg: Config, weights: Sequence[tuple[str, str | None]] | Mapping[str, str | None]) -> list[tuple[str, ModelSpec]]:
    """``[(label, ckpt), ...]`` -> ``[(label, (ModelConfig, ckpt)), ...]``.

    A label starting with ``teacher`` (any case) uses ``cfg.teacher``; any other label (``student``,
    ``hmkd``, ``fgd`` ...) uses ``cfg.model``: distilled students share the student's architecture.
    """
    pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    out: list[tuple[str, ModelSpec]] = []
    for label, path in pairs:
        if label.lower().startswith("teacher"):
            if cfg.teacher is None:
                raise ConfigError(f"--weights {label}=...: the config has no 'teacher' model")
            out.append((label, (cfg.teacher, path)))
        else:
            out.append((label, (cfg.model, path)))
    return out


@contextlib.contextmanager
def _score_threshold(model: nn.Module, thresh: float) -> Iterator[None]:
    """Temporarily lower a torchvision detector's own score threshold to at most ``thresh``."""
    owner = model.roi_heads if hasattr(model, "roi_heads") else model
    old = getattr(owner, "score_thresh", None)
    if old is not None and thresh < old:
        owner.score_thresh = thresh
    try:
        yield
    finally:
        if old is not None:
            owner.score_thresh = old


def run_detector(model: nn.Module, image: torch.Tensor, *, score_thresh: float | None = None) -> dict[str, torch.Tensor]:
    """One image through an eval-mode detector; boxes/scores/labels on the CPU (boxes in image pixels)."""
    device = next(model.parameters()).device
    ctx = _score_threshold(model, score_thresh) if score_thresh is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        out = model([image.to(device)])[0]
    return {k: out[k].detach().cpu() for k in ("boxes", "scores", "labels")}


# --------------------------------------------------------------------------- drawing


def class_colour(label: int) -> tuple[int, int, int]:
    """The colour of class ``label`` (1-based; background 0 never drawn)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _text_wh(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut (with ``..``) to fit ``width`` pixels."""
    if _text_wh(draw, text, font)[0] <= width:
        return text
    while text and _text_wh(draw, text + "..", font)[0] > width:
        text = text[:-1]
    return text + ".."


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names and 1 <= label <= len(class_names):
        return str(class_names[label - 1])
    return f"c{label}"


def _font_size(width: int) -> int:
    return int(max(10, min(18, width // 28)))


def draw_panels(
    image: Image.Image | torch.Tensor,
    results: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    *,
    score_thresh: float = 0.3,
    small_area: float = 32 * 32,
    class_names: Sequence[str] | None = None,
) -> Image.Image:
    """Compose one picture: per ``(title, detections)`` a panel of the image at its own resolution.

    ``detections`` has ``boxes`` (xyxy, pixels of ``image``), ``scores`` and ``labels``. Output size:
    ``(n * W + (n - 1) * 4, H + title bar)``; the title bar is :func:`title_height` pixels high.
    """
    if isinstance(image, torch.Tensor):
        arr = (image.detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        image = Image.fromarray(arr, "RGB")
    image = image.convert("RGB")
    w, h = image.size
    n = max(1, len(results))
    fs = _font_size(w)
    font = _font(fs)
    bar = title_height(w)
    canvas = Image.new("RGB", (n * w + (n - 1) * _SEP, h + bar), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    tag_font = _font(max(9, fs - 3))
    for i, (title, det) in enumerate(results):
        x0 = i * (w + _SEP)
        canvas.paste(image, (x0, bar))
        boxes = torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4)
        scores = torch.as_tensor(det["scores"], dtype=torch.float32).reshape(-1)
        labels = torch.as_tensor(det["labels"]).reshape(-1)
        keep = scores >= score_thresh
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = torch.argsort(scores)  # draw the most confident last, on top
        areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        small = areas < small_area
        for j in order.tolist():
            x1, y1, x2, y2 = boxes[j].tolist()
            x1, x2 = [min(max(v, 0.0), w - 1.0) + x0 for v in (x1, x2)]
            y1, y2 = [min(max(v, 0.0), h - 1.0) + bar for v in (y1, y2)]
            x2, y2 = max(x1, x2), max(y1, y2)
            colour = class_colour(int(labels[j]))
            if small[j]:
                draw.rectangle([x1 - 2, y1 - 2, x2 + 2, y2 + 2], outline=SMALL_COLOUR, width=2)
                draw.rectangle([x1, y1, x2, y2], outline=colour, width=1)
            else:
                draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            tag = f"{_class_name(int(labels[j]), class_names)} {float(scores[j]):.2f}"
            tw, th = _text_wh(draw, tag, tag_font)
            ty = y1 - th - 3 if y1 - th - 3 >= bar else y1
            tx = min(x1, x0 + w - tw - 2)
            draw.rectangle([tx, ty, tx + tw + 2, ty + th + 2], fill=colour)
            draw.text((tx + 1, ty - 1), tag, fill=(255, 255, 255), font=tag_font)
        n_small = int(small.sum())
        draw.text((x0 + 3, 2), _fit(draw, str(title), font, w - 6), fill=(0, 0, 0), font=font)
        line2 = f"{len(scores)} dets, {n_small} small (<{int(small_area ** 0.5)}px^2), score>={score_thresh:.2f}"
        f2 = _font(max(9, fs - 2))
        draw.text((x0 + 3, 4 + fs), _fit(draw, line2, f2, w - 6), fill=SMALL_COLOUR if n_small else (60, 60, 60), font=f2)
    return canvas


def title_height(width: int) -> int:
    """Height in pixels of the title bar above panels of an image ``width`` pixels wide."""
    fs = _font_size(width)
    return 2 * fs + 10


def save_png(image: Image.Image, path: str | os.PathLike) -> str:
    """Save a PNG atomically (temp file + replace); returns the path."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return str(path)


def unique_stems(images: Sequence[str | os.PathLike]) -> list[str]:
    """File stems of ``images``, made unique with ``_2``, ``_3`` ... where two share one."""
    seen: dict[str, int] = {}
    out = []
    for p in images:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def draw_detections(
    models: Sequence[tuple[str, ModelSpec]],
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    score_thresh: float = 0.3,
    small_area: float = 32 * 32,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> list[str]:
    """Run each model on each image and write ``<out_dir>/<image stem>.png`` with one panel per model.

    Args:
        models: ``[(label, spec), ...]`` in panel order, e.g. teacher, student, distilled student
            (see :func:`specs_from_config`).
        images: image files; each is given to the detectors at its own size (they resize internally
            and return boxes in original pixels).
        score_thresh: detections below it are not drawn (the models' own thresholds are lowered to
            it for the run when they are higher).
        small_area: a detection is *small* when its box area in original pixels is below this.
        class_names: names of labels ``1..K`` (default ``c1``, ``c2`` ...).

    Also writes ``detections.json`` (every drawn detection per image and model). Returns the PNG paths.
    """
    out, built = build_panel_models("draw_detections", models, images, out_dir, num_classes=num_classes, device=device)
    paths: list[str] = []
    record: dict[str, Any] = {"score_thresh": score_thresh, "small_area": small_area, "images": {}}
    for img_path, stem in zip(images, unique_stems(images)):
        img = load_image(img_path)
        results = []
        per_model = {}
        for label, model in built:
            det = run_detector(model, img, score_thresh=score_thresh)
            results.append((label, det))
            keep = det["scores"] >= score_thresh
            per_model[label] = {
                "boxes": [[round(v, 2) for v in b] for b in det["boxes"][keep].tolist()],
                "scores": [round(v, 4) for v in det["scores"][keep].tolist()],
                "labels": det["labels"][keep].tolist(),
            }
        picture = draw_panels(img, results, score_thresh=score_thresh, small_area=small_area, class_names=class_names)
        paths.append(save_png(picture, out / f"{stem}.png"))
        record["images"][str(img_path)] = per_model
    write_json(out / "detections.json", record, indent=1)
    return paths
