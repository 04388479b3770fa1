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
* ``cam = ReLU(sum_c w_c A_c)``, ``w_c`` = the spatial mean of ``dy/dA_c`` (Grad-CAM, the default);
  ``method="hirescam"`` takes ``cam = ReLU(sum_c dy/dA_c * A_c)`` element-wise instead (HiResCAM,
  Draelos & Carin 2020). On the small trained FCOS models of our checks, Grad-CAM's map at the
  level the detections come from was negative everywhere (so all blue after the ReLU), while
  HiResCAM's sat on the detected objects: its gradients stay where each detection is read, where
  Grad-CAM's spatial mean mixes the whole map. The map lives on the
  padded, resized input grid: it is upsampled to that grid, cropped to the resized image and resized
  to the original image, then normalised to ``[0, 1]`` per panel (or over all panels of an image with
  ``normalize="shared"``, to compare magnitudes) and blended over the image with the ``jet`` colours.
  A footer under the panels has the colour bar (0 to each panel's maximum, printed in its title, or
  to the shared maximum) and the legend of the boxes (white: the detections the target sums, red:
  the small ones).

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

from hmkd.data.image_files import load_image, unique_stems
from hmkd.errors import ConfigError
from hmkd.utils import write_json
from hmkd.models import name_levels
from hmkd.models.specs import ModelSpec, score_threshold
from hmkd.viz.panels import (
    PANEL_GAP,
    SMALL_COLOUR,
    build_panel_models,
    draw_header,
    draw_legend,
    font_size,
    header_lines,
    legend_lines,
    load_font,
    save_png,
    stroke,
    text_size,
    title_height,
)

TARGETS = ("topk", "small")
METHODS = ("gradcam", "hirescam")
_NAMES = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}

__all__ = ["METHODS", "TARGETS", "gradcam", "gradcam_heatmaps", "overlay"]


def gradcam(
    model: nn.Module,
    image: torch.Tensor,
    level: str = "P3",
    *,
    target: str = "topk",
    topk: int = 10,
    small_area: float = 32 * 32,
    method: str = "gradcam",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Grad-CAM (or, with ``method="hirescam"``, HiResCAM) of one image ``[3, H, W]`` on FPN
    ``level``; returns ``(cam, info)``.

    ``cam`` is an unnormalised ``float32 [H, W]`` map (original image size, >= 0). ``info`` holds
    ``score`` (the target's value), ``boxes``/``scores`` of the detections that made it, ``grid``
    (the level's map size) and ``zero`` (True when the gradient at that level vanished).
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown Grad-CAM target {target!r} (known: {', '.join(TARGETS)})")
    if method not in METHODS:
        raise ConfigError(f"unknown class-activation method {method!r} (known: {', '.join(METHODS)})")
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
        with torch.enable_grad(), score_threshold(inner, 1e-6):
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
        if method == "hirescam":  # element-wise gradient x activation (Draelos & Carin 2020)
            cam = F.relu((grad[0] * a).sum(0))
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


def _colour_bar(width: int, height: int) -> Image.Image:
    """A horizontal ``jet`` gradient ``width`` x ``height`` pixels (0 on the left)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps

    ramp = colormaps["jet"](np.linspace(0.0, 1.0, max(2, width)))[:, :3]
    arr = np.repeat((ramp * 255).round().astype(np.uint8)[None], max(1, height), axis=0)
    return Image.fromarray(arr, "RGB")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-2 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def _footer(canvas_w: int, w: int, normalize: str, shared: float, show_boxes: bool, small_area: float,
            target: str, method: str = "gradcam") -> tuple[list[str], list[str], int]:
    """The footer's text lines above the colour bar, its legend lines and its height."""
    fs = font_size(w)
    lh = fs + 5
    name = _NAMES[method]
    scale = (f"colour: {name}, one scale for every panel, 0 to {_fmt(shared)}" if normalize == "shared"
             else f"colour: {name}, each panel from 0 to its own max (in its title)")
    if shared <= 0:
        scale = f"colour: {name}; every map here is zero"
    above = legend_lines(w, scale, canvas_w)
    legend: list[str] = []
    if show_boxes:
        side = int(round(small_area ** 0.5))
        what = "small detections" if target == "small" else "detections"
        legend = legend_lines(w, f"white: the top-k {what} the map explains; red: small ones (< {side}x{side} px)", canvas_w)
    height = (len(above) + 1 + len(legend)) * lh + 6
    return above, legend, height


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
    method: str = "gradcam",
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
        normalize: ``panel`` (each map scaled to its own maximum, printed in its title) or
            ``shared`` (one scale for every panel of an image, to compare magnitudes).
        method: ``gradcam`` or ``hirescam`` (see :func:`gradcam`).
        show_boxes: outline the detections that make up the target (red when small).
    Returns the PNG paths. Each panel has the original image size, under a title bar; a footer
    under the panels holds the colour bar with its scale and the legend of the box colours. Also
    writes ``gradcam_<level>.json``: per image and model the target's ``score``, the map's ``max``
    and the ``scale`` its colours were divided by.
    """
    if normalize not in ("panel", "shared"):
        raise ConfigError(f"normalize must be 'panel' or 'shared', got {normalize!r}")
    out, built = build_panel_models("gradcam_heatmaps", models, images, out_dir, num_classes=num_classes, device=device)
    paths = []
    record: dict[str, Any] = {"level": level, "target": target, "topk": topk, "normalize": normalize,
                              "method": method, "images": {}}
    for img_path, stem in zip(images, unique_stems(images)):
        img = load_image(img_path)
        h, w = img.shape[-2:]
        runs = [(label, *gradcam(m, img, level, target=target, topk=topk, small_area=small_area, method=method))
                for label, m in built]
        shared = max((float(c.max()) for _, c, _ in runs), default=0.0)
        record["images"][str(img_path)] = {
            label: {"score": info["score"], "max": float(cam.max()), "zero_gradient": info["zero"],
                    "scale": shared if normalize == "shared" else float(cam.max())}
            for label, cam, info in runs
        }
        fs = font_size(w)
        unit = stroke(w)
        headers = []
        for label, cam, info in runs:
            what = "small " if target == "small" else ""
            line2 = f"{_NAMES[method]} {level}, top-{topk} {what}scores sum {info['score']:.2f}"
            if info["zero"]:
                line2 += " (zero gradient at this level)"
            else:
                line2 += f", max {_fmt(float(cam.max()))}" + (" (the map is <= 0 everywhere" + ("; try hirescam)" if method == "gradcam" else ")")
                                                             if cam.max() <= 0 else "")
            headers.append(header_lines(w, str(label), line2))
        bar = title_height(w, max(len(hl) for hl in headers))
        canvas_w = len(runs) * w + (len(runs) - 1) * PANEL_GAP
        above, legend, foot_h = _footer(canvas_w, w, normalize, shared, show_boxes, small_area, target, method)
        canvas = Image.new("RGB", (canvas_w, h + bar + foot_h), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for i, (label, cam, info) in enumerate(runs):
            scale = shared if normalize == "shared" else float(cam.max())
            norm = cam / scale if scale > 0 else cam
            x0 = i * (w + PANEL_GAP)
            canvas.paste(overlay(img, norm, alpha), (x0, bar))
            if show_boxes:
                for b in info["boxes"].tolist():
                    small = (b[2] - b[0]) * (b[3] - b[1]) < small_area
                    x1, x2 = (min(max(v, 0.0), w - 1.0) for v in (b[0], b[2]))
                    y1, y2 = (min(max(v, 0.0), h - 1.0) for v in (b[1], b[3]))
                    draw.rectangle(
                        [x0 + x1, bar + y1, x0 + max(x1, x2), bar + max(y1, y2)],
                        outline=SMALL_COLOUR if small else (255, 255, 255),
                        width=unit,
                    )
            draw_header(draw, x0, w, headers[i])
        # footer: what the colours mean, the colour bar (0 .. max), the legend of the boxes
        lh = fs + 5
        y = h + bar + 2
        draw_legend(draw, y, w, above)
        y += len(above) * lh + 2
        f2 = load_font(max(9, fs - 2))
        lo, hi = "0", ("max" if normalize == "panel" else _fmt(shared))
        lo_w = text_size(draw, lo, f2)[0]
        hi_w = text_size(draw, hi, f2)[0]
        bar_w = max(20, min(canvas_w - lo_w - hi_w - 18, 12 * fs))
        draw.text((3, y + 2), lo, fill=(60, 60, 60), font=f2)
        canvas.paste(_colour_bar(bar_w, fs - 1), (lo_w + 8, y + 3))
        draw.text((lo_w + 8 + bar_w + 5, y + 2), hi, fill=(60, 60, 60), font=f2)
        y += lh
        draw_legend(draw, y, w, legend)
        paths.append(save_png(canvas, out / f"{stem}_gradcam_{level}.png"))
    write_json(out / f"gradcam_{level}.json", record, indent=1)
    return paths
