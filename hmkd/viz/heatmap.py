"""Grad-CAM heat maps on one FPN level of a detector, several models side by side (paper Fig. 1).

What is computed (Selvaraju et al. 2017, applied to a detector):

* Activations ``A`` = the chosen FPN map (``P2`` .. ``P7``, named by stride as everywhere in hmkd) of
  one image, taken by a forward hook on ``model.backbone`` during an ordinary eval-mode forward.
* Scalar target ``y`` = the sum of the ``topk`` highest detection scores the detector outputs
  (after its own post-processing and NMS; its score threshold is lowered to 1e-6 for the pass so
  that there are ``topk`` of them). ``target="small"`` sums the ``topk`` best *small* detections instead
  (box area below ``small_area`` original pixels), which shows where the model finds small objects.
  Scores are differentiable functions of the head outputs (sigmoid / softmax and indexing), so
  ``dy/dA`` exists; gradients reach ``A`` only through the head outputs at that level (and, for the
  R-CNNs, the RoIAlign that reads it), so a level none of the top detections come from gives an
  all-zero map (the picture says so).
* ``cam = ReLU(sum_c w_c A_c)``, ``w_c`` = the spatial mean of ``dy/dA_c``. The map lives on the
  padded, resized input grid: it is upsampled to that grid, cropped to the resized image and resized
  to the original image, then normalised to ``[0, 1]`` per panel (or over all panels of an image with
  ``normalize="shared"``, to compare magnitudes) and blended over the image with the ``jet`` colours.

Torch hooks are used rather than the ``pytorch_grad_cam`` package: its target-layer hooks need a
module whose output is a tensor, while the FPN returns a dict (P6 from max-pooling has no module at
all), and it rescales maps to the *input* tensor, not to the detector's resized and padded frame.
Gradients are taken with ``torch.autograd.grad`` on the feature map only: no parameter ``.grad`` is
touched, and the backbone below the level is run without building a graph.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from hmkd.errors import ConfigError
from hmkd.models import name_levels
from hmkd.viz.detections import (
    SMALL_COLOUR,
    ModelSpec,
    _fit,
    _font,
    _font_size,
    _score_threshold,
    build_panel_models,
    load_image,
    save_png,
    title_height,
    unique_stems,
)

TARGETS = ("topk", "small")

__all__ = ["TARGETS", "gradcam", "gradcam_heatmaps", "overlay"]


def gradcam(
    model: nn.Module,
    image: torch.Tensor,
    level: str = "P3",
    *,
    target: str = "topk",
    topk: int = 10,
    small_area: float = 32 * 32,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Grad-CAM of one image ``[3, H, W]`` on FPN ``level``; returns ``(cam, info)``.

    ``cam`` is an unnormalised ``float32 [H, W]`` map (original image size, >= 0). ``info`` holds
    ``score`` (the target's value), ``boxes``/``scores`` of the detections that made it, ``grid``
    (the level's map size) and ``zero`` (True when the gradient at that level vanished).
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown Grad-CAM target {target!r} (known: {', '.join(TARGETS)})")
    if topk < 1:
        raise ConfigError(f"Grad-CAM topk must be >= 1, got {topk}")
    inner = getattr(model, "module", model)
    for attr in ("transform", "backbone"):
        if not hasattr(inner, attr):
            raise ConfigError(f"{type(inner).__name__} has no '{attr}': a torchvision FPN detector is needed")
    store: dict[str, Any] = {}

    def on_transform(mod: nn.Module, args: Any, out: Any) -> None:
        store["image_list"] = out[0]

    def on_backbone(mod: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            raise ConfigError(f"{type(inner).__name__}'s backbone returns one map, not FPN levels")
        level_keys = getattr(mod, "level_keys", None)
        if level_keys:
            keys = {v: k for k, v in level_keys.items() if k in out}
        else:
            keys = dict(zip(name_levels(out, tuple(args[0].shape[-2:])).keys(), out.keys()))
        if level not in keys:
            raise ConfigError(f"FPN level {level!r} is not produced by this model (it has {', '.join(keys)})")
        key = keys[level]
        feat = out[key].detach().requires_grad_(True)
        out[key] = feat
        store["feat"] = feat
        return out

    def on_head(mod: nn.Module, args: Any, out: Any) -> Any:
        # One-stage heads: keep every class probability above zero. FCOS scores locations by
        # sqrt(sigmoid(cls) * sigmoid(ctr)); a logit below about -104 underflows sigmoid to 0 in
        # float32, and sqrt(0)'s backward is 0/0 = NaN, which would spread to every location
        # through the shared centre-ness. hmkd's own heads already pin the background logit to
        # -30 at inference (hmkd.models.detectors); this clamp covers any other head (e.g.
        # torchvision's) the same way. sigmoid(-30) ~ 1e-13 stays below the pass's threshold.
        if isinstance(out, dict) and "cls_logits" in out:
            return {**out, "cls_logits": out["cls_logits"].clamp(min=-30.0)}
        return out

    device = next(inner.parameters()).device
    was_training = inner.training
    flags = [p.requires_grad for p in inner.parameters()]
    handles = [inner.transform.register_forward_hook(on_transform), inner.backbone.register_forward_hook(on_backbone)]
    if isinstance(getattr(inner, "head", None), nn.Module):
        handles.append(inner.head.register_forward_hook(on_head))
    try:
        inner.eval()
        for p in inner.parameters():
            p.requires_grad_(False)
        with torch.enable_grad(), _score_threshold(inner, 1e-6):
            det = inner([image.to(device)])[0]
        feat = store["feat"]
        boxes, scores, labels = det["boxes"].detach(), det["scores"], det["labels"]
        valid = labels > 0
        if target == "small":
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            valid &= area < small_area
        idx = torch.nonzero(valid).flatten()
        if len(idx):
            top = scores[idx].topk(min(topk, len(idx))).indices
            idx = idx[top]
        y = scores[idx].sum()
        grad = None
        if len(idx) and y.requires_grad:
            (grad,) = torch.autograd.grad(y, feat, allow_unused=True)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                raise FloatingPointError(f"Grad-CAM: non-finite gradient at {level} ({type(inner).__name__})")
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(inner.parameters(), flags):
            p.requires_grad_(f)
        inner.train(was_training)

    h0, w0 = image.shape[-2:]
    il = store["image_list"]
    hr, wr = il.image_sizes[0]
    hp, wp = il.tensors.shape[-2:]
    a = feat.detach()[0]
    zero = grad is None or not bool(grad.abs().sum() > 0)
    if zero:
        cam = torch.zeros(h0, w0)
    else:
        w = grad[0].mean(dim=(1, 2))
        cam = F.relu((w[:, None, None] * a).sum(0))
        cam = F.interpolate(cam[None, None], size=(hp, wp), mode="bilinear", align_corners=False)
        cam = cam[..., :hr, :wr]
        cam = F.interpolate(cam, size=(h0, w0), mode="bilinear", align_corners=False)[0, 0].clamp(min=0)
    info = {
        "score": float(y.detach()),
        "boxes": boxes[idx].cpu(),
        "scores": scores[idx].detach().cpu(),
        "grid": (int(a.shape[-2]), int(a.shape[-1])),
        "zero": zero,
    }
    return cam.detach().cpu().float().numpy(), info


def overlay(image: torch.Tensor, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a ``[0, 1]`` map over a ``[3, H, W]`` image with the ``jet`` colour map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps

    rgb = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    mix = (1 - alpha) * rgb + alpha * heat
    return Image.fromarray((mix * 255).round().astype(np.uint8), "RGB")


def gradcam_heatmaps(
    models: Sequence[tuple[str, ModelSpec]],
    images: Sequence[str | os.PathLike],
    level: str = "P3",
    out_dir: str | os.PathLike = "gradcam",
    *,
    target: str = "topk",
    topk: int = 10,
    small_area: float = 32 * 32,
    normalize: str = "panel",
    alpha: float = 0.5,
    show_boxes: bool = True,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> list[str]:
    """Write ``<out_dir>/<stem>_gradcam_<level>.png`` per image: one Grad-CAM panel per model.

    Args:
        models: ``[(label, spec), ...]`` in panel order, e.g. teacher, student, distilled student.
        images: image files (each given to the detectors at its own size).
        level: FPN level whose activations the map explains (``P2`` .. ``P7``).
        target: ``topk`` (sum of the best ``topk`` detection scores) or ``small`` (the same over
            small detections only); see the module docstring.
        normalize: ``panel`` (each map scaled to its own maximum) or ``shared`` (one scale per image).
        show_boxes: outline the detections that make up the target (red when small).
    Returns the PNG paths. Each panel has the original image size, under a title bar.
    """
    if normalize not in ("panel", "shared"):
        raise ConfigError(f"normalize must be 'panel' or 'shared', got {normalize!r}")
    out, built = build_panel_models("gradcam_heatmaps", models, images, out_dir, num_classes=num_classes, device=device)
    paths = []
    for img_path, stem in zip(images, unique_stems(images)):
        img = load_image(img_path)
        h, w = img.shape[-2:]
        runs = [(label, *gradcam(m, img, level, target=target, topk=topk, small_area=small_area)) for label, m in built]
        shared = max((float(c.max()) for _, c, _ in runs), default=0.0)
        bar = title_height(w)
        fs = _font_size(w)
        canvas = Image.new("RGB", (len(runs) * w + (len(runs) - 1) * 4, h + bar), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for i, (label, cam, info) in enumerate(runs):
            scale = shared if normalize == "shared" else float(cam.max())
            norm = cam / scale if scale > 0 else cam
            x0 = i * (w + 4)
            canvas.paste(overlay(img, norm, alpha), (x0, bar))
            if show_boxes:
                for b in info["boxes"].tolist():
                    small = (b[2] - b[0]) * (b[3] - b[1]) < small_area
                    x1, x2 = (min(max(v, 0.0), w - 1.0) for v in (b[0], b[2]))
                    y1, y2 = (min(max(v, 0.0), h - 1.0) for v in (b[1], b[3]))
                    draw.rectangle(
                        [x0 + x1, bar + y1, x0 + max(x1, x2), bar + max(y1, y2)],
                        outline=SMALL_COLOUR if small else (255, 255, 255),
                        width=1,
                    )
            draw.text((x0 + 3, 2), _fit(draw, str(label), _font(fs), w - 6), fill=(0, 0, 0), font=_font(fs))
            what = "small " if target == "small" else ""
            line2 = f"Grad-CAM {level}, top-{topk} {what}scores sum {info['score']:.2f}"
            if info["zero"]:
                line2 += " (zero gradient at this level)"
            f2 = _font(max(9, fs - 2))
            draw.text((x0 + 3, 4 + fs), _fit(draw, line2, f2, w - 6), fill=(60, 60, 60), font=f2)
        paths.append(save_png(canvas, out / f"{stem}_gradcam_{level}.png"))
    return paths
