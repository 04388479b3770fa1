"""Where the matching decoder looks: each head's attention of a few small objects over the finer
teacher map, a fitted decoder beside an untrained one (the idea of the paper's Fig. 3).

For each validation image and each matching decoder of the config's method (HMKD: one per starting
level ``l``, over the keys of level ``l-1``; ICD: one over all its levels), :func:`viz_attention`
writes one PNG ``<stem>_attention_<key level>.png``:

* on top, the image with every annotated box in thin grey and the ``objects`` chosen objects
  numbered: the smallest objects (by box area in the original image) among those that make
  inquiries in the distillation (HMKD: the small ones, below ``small_area``; with ``inquiries:
  all`` and for ICD every object);
* per chosen object two rows, one panel per head: the attention ``m_ij`` of that object's inquiry
  (at its own box, exactly as the distillation builds it, see
  :meth:`~hmkd.distill.matching.method.DecoderDistiller.distillation_attention`) over the key map's
  cells that hold the image, with its own colour bar and the object's box outlined in red. The
  first row is the *fitted* decoder (the ``--decoder`` file), the second the *untrained* one: the
  decoder state a freshly built distiller of the same options has (initialised under the config's
  seed), the state the distillation would start from with ``decoder_fit: none``.

Each panel's title gives the attention mass inside the box: the sum of ``m_ij`` over the key cells
whose centres lie in the box, plus the cell holding the box's centre
(:func:`~hmkd.distill.matching.task.cells_in_boxes`, the measure ``metric.in_box_*`` and ``hmkd
fit-decoder``'s report use). Each row's label gives what a uniform attention would put there (box
cells / image cells). Maps are drawn in the original image's pixel frame (the axes are image
pixels), cropped to the image. A decoder over several key maps (ICD) is drawn on its finest map:
each coarser cell's mass is spread evenly over the finest cells it covers, so the map still sums to
the attention's total; the in-box masses are always the exact ones over all its cells.

Every number drawn also goes to ``<out>/attention.json``; the function returns them.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hmkd.data.image_files import resolve_images, unique_stems
from hmkd.errors import ConfigError
from hmkd.utils import json_safe, save_figure, write_json

__all__ = ["decoder_key_levels", "figure_inches", "viz_attention"]

logger = logging.getLogger(__name__)

#: Width of one head's panel (map plus its colour bar), inches.
PANEL_W = 2.0
#: Height of a panel's two-line title, inches.
TITLE_H = 0.5
#: Room for the row labels on the left and the figure's title on top, inches.
LEFT_W, TOP_H = 1.0, 0.8
#: Height of the image on top, at most, inches.
IMAGE_H = 3.2
#: The box outline on the maps, and the chosen objects' outlines on the image.
BOX_COLOUR = "red"


def figure_inches(heads: int, objects: int, aspect: float) -> tuple[float, float]:
    """The figure's (width, height) in inches: ``heads`` columns, two rows per object (fitted,
    untrained) under the image; ``aspect`` is the image's height / width. Saved at ``dpi``, the PNG
    is exactly ``round(width * dpi) x round(height * dpi)`` pixels."""
    width = LEFT_W + heads * PANEL_W
    map_h = 0.78 * PANEL_W * aspect  # the map's share of the panel's width is about 0.78 (the rest: colour bar)
    image_h = min(IMAGE_H, width * aspect)
    return width, TOP_H + image_h + 2 * max(objects, 0) * (map_h + TITLE_H)


# --------------------------------------------------------------------------- computing


def decoder_key_levels(distiller: Any) -> dict[str, str]:
    """Each matching decoder's name (as :meth:`distillation_attention` keys it) -> the level(s) its
    keys come from: HMKD's decoder ``P4`` attends over ``P3``; ICD's one decoder (``""``) over all
    its levels (``P3-P7``)."""
    from hmkd.distill.common import finer_level

    decoders = getattr(distiller, "decoders", None)
    if decoders is not None:
        return {name: finer_level(name) for name in decoders}
    levels = list(getattr(distiller, "levels", []))
    return {"": levels[0] if len(levels) == 1 else f"{levels[0]}-{levels[-1]}"}


def _inquiring(distiller: Any, boxes: torch.Tensor, labels: torch.Tensor, small: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The objects of one image that make inquiries, in the order the decoder gets them."""
    pick = getattr(distiller, "inquiry_objects", None)
    if pick is None:  # ICD: every object
        return boxes, labels
    b, lab = pick([boxes], [labels], [small])
    return b[0], lab[0]


def _drawn_map(grid: Sequence[tuple[int, int, float]], image_hw: tuple[int, int]) -> tuple[int, int, int, float]:
    """The key map a figure draws on (the finest): its index in ``grid``, the rows and columns of its
    cells that hold the (resized) image, and its stride."""
    base = max(range(len(grid)), key=lambda i: grid[i][0] * grid[i][1])
    h, w, stride = grid[base]
    return base, min(h, math.ceil(image_hw[0] / stride)), min(w, math.ceil(image_hw[1] / stride)), stride


def _attention_maps(m: torch.Tensor, grid: Sequence[tuple[int, int, float]], image_hw: tuple[int, int]) -> torch.Tensor:
    """Attention rows ``m [K, U]`` as maps ``[K, rows, cols]`` over the image's cells of the finest
    key map (:func:`_drawn_map`); a coarser map's mass is spread evenly over the finest cells each
    of its cells covers, so a map sums to what its row puts on the image."""
    base, rows, cols, _ = _drawn_map(grid, image_hw)
    hb, wb, _ = grid[base]
    total = torch.zeros(m.shape[0], hb, wb, dtype=torch.float32)
    start = 0
    for h, w, _ in grid:
        part = m[:, start:start + h * w].float().cpu().reshape(-1, 1, h, w)
        start += h * w
        if (h, w) != (hb, wb):
            part = F.interpolate(part, size=(hb, wb), mode="nearest") * (h * w) / (hb * wb)
        total += part[:, 0]
    return total[:, :rows, :cols]


def _image_record(distiller: Any, dataset: Any, idx: int, device: torch.device, states: dict[str, dict],
                  n_objects: int, drawn: dict[str, str]) -> dict[str, Any]:
    """Run one image under each decoder state; per decoder of ``drawn`` (name -> key level) the
    chosen objects, their maps and in-box masses."""
    from hmkd.distill.base import small_flags
    from hmkd.distill.matching.task import cells_in_boxes
    from hmkd.distill.masks import pad_boxes
    from hmkd.distill.matching.fit import transformed_batch

    image, target = dataset[idx]
    h0, w0 = (int(v) for v in image.shape[-2:])
    target = {k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}
    feats, resized, sizes, padded = transformed_batch(distiller, [image.to(device)], [target])
    small = small_flags([target], distiller.small_area)
    boxes, labels = [resized[0]["boxes"]], [resized[0]["labels"]]
    orig_boxes, orig_labels = _inquiring(distiller, target["boxes"], target["labels"], small[0])
    hr, wr = sizes[0]
    per_state: dict[str, dict[str, Any]] = {}
    for label, state in states.items():
        distiller.load_decoder_state(state, f"{label} decoder")
        per_state[label] = distiller.distillation_attention(feats, boxes, labels, small, sizes, padded)
    decoders: dict[str, Any] = {}
    for name, key_label in drawn.items():
        _, _, keep, kv = per_state["fitted"][name]
        inq = keep[0]
        if inq.shape[0] != orig_boxes.shape[0]:  # pragma: no cover - the same selection, in two frames
            raise RuntimeError(f"viz attention: {inq.shape[0]} inquiries but {orig_boxes.shape[0]} objects")
        area = ((orig_boxes[:, 2] - orig_boxes[:, 0]) * (orig_boxes[:, 3] - orig_boxes[:, 1])).cpu()
        chosen = torch.argsort(area, stable=True)[:n_objects].tolist()
        inside = cells_in_boxes(pad_boxes([inq.float()])[0], kv.grid)[0].cpu()  # [N, U]
        valid_u = ~kv.pad[0].cpu() if kv.pad is not None else torch.ones(inside.shape[-1], dtype=torch.bool)
        objects = []
        for j in chosen:
            rec: dict[str, Any] = {
                "box": [round(float(v), 2) for v in orig_boxes[j].tolist()],
                "label": int(orig_labels[j]),
                "area": float(area[j]),
                "cells_in_box": int(inside[j].sum()),
                "uniform": float((inside[j] & valid_u).sum()) / max(1, int(valid_u.sum())),
                "in_box": {},
                "maps": {},
            }
            for label in states:
                m = per_state[label][name][0][0, :, j].float().cpu()  # [heads, U]
                rec["in_box"][label] = (m * inside[j].float()).sum(-1).tolist()
                rec["maps"][label] = _attention_maps(m, kv.grid, (hr, wr)).numpy()
            objects.append(rec)
        _, rows, cols, stride = _drawn_map(kv.grid, (hr, wr))
        decoders[name] = {
            "key_level": key_label,
            "stride": float(kv.grid[0][2]) if len(kv.grid) == 1 else [float(s) for _, _, s in kv.grid],
            "heads": int(per_state["fitted"][name][0].shape[1]),
            "inquiring": int(inq.shape[0]),
            "map_extent": [cols * stride * w0 / wr, rows * stride * h0 / hr],
            "objects": objects,
        }
    return {"image": image, "all_boxes": target["boxes"].cpu(), "size": (h0, w0), "decoders": decoders}


# --------------------------------------------------------------------------- drawing


def _draw(record: dict[str, Any], name: str, *, title: str, class_names: Sequence[str] | None,
          states: Sequence[str], dpi: int, path: str | os.PathLike) -> str:
    """One decoder's figure of one image (see the module docstring); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    dec = record["decoders"][name]
    h0, w0 = record["size"]
    heads, objects = dec["heads"], dec["objects"]
    fig = Figure(figsize=figure_inches(heads, len(objects), h0 / w0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    width, _ = figure_inches(heads, len(objects), h0 / w0)
    image_h = min(IMAGE_H, width * h0 / w0)
    row_h = 0.78 * PANEL_W * h0 / w0 + TITLE_H
    grid = fig.add_gridspec(1 + 2 * len(objects), heads, height_ratios=[image_h] + [row_h] * 2 * len(objects))
    chars = int(width * 13)  # about 13 characters an inch at 9 pt
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in title.split("\n")), fontsize=9)

    def name_of(label: int) -> str:
        if class_names and 1 <= label < len(class_names):
            return str(class_names[label])
        return f"c{label}"

    ax = fig.add_subplot(grid[0, :])
    ax.imshow(record["image"].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    for b in record["all_boxes"].tolist():
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="0.85", linewidth=0.6))
    for k, obj in enumerate(objects):
        x1, y1, x2, y2 = obj["box"]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5))
        ax.text(x2 + 1, y1, str(k + 1), color=BOX_COLOUR, fontsize=9, fontweight="bold", va="top",
                bbox=dict(facecolor="white", alpha=0.7, pad=0.5, linewidth=0))
    if dec["inquiring"]:
        ax.set_title(f"red, numbered: the {len(objects)} smallest of the {dec['inquiring']} objects that make inquiries; "
                     "grey: every annotated box", fontsize=8)
    else:
        ax.set_title("no object of this image makes an inquiry (none is small): nothing to draw", fontsize=8)
    ax.set_axis_off()

    ext_w, ext_h = dec["map_extent"]
    for k, obj in enumerate(objects):
        x1, y1, x2, y2 = obj["box"]
        for r, state in enumerate(states):
            row = 1 + 2 * k + r
            for hd in range(heads):
                ax = fig.add_subplot(grid[row, hd])
                amap = obj["maps"][state][hd]
                im = ax.imshow(amap, cmap="viridis", extent=(0, ext_w, ext_h, 0), interpolation="nearest", vmin=0.0)
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=BOX_COLOUR, linewidth=1.2))
                ax.set_xlim(0, w0)
                ax.set_ylim(h0, 0)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{state}, head {hd + 1}\nin box {obj['in_box'][state][hd]:.3f}", fontsize=7)
                cb = fig.colorbar(im, ax=ax, fraction=0.06, pad=0.02, format="%.2g")
                cb.ax.tick_params(labelsize=5)
                if hd == 0:
                    ax.set_ylabel(f"#{k + 1} {name_of(obj['label'])}, {x2 - x1:.0f}x{y2 - y1:.0f} px\n"
                                  f"{state}; uniform {obj['uniform']:.3f}", fontsize=7)
    return save_figure(fig, path, dpi=dpi)


# --------------------------------------------------------------------------- the command


def viz_attention(
    cfg: Any,
    *,
    decoder: str,
    images: Sequence[int | str],
    out_dir: str | os.PathLike,
    weights: str | None = None,
    objects: int = 4,
    levels: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dpi: int = 150,
) -> dict[str, Any]:
    """Draw the attention figures of ``images`` (see the module docstring) into ``out_dir``.

    Args:
        cfg: a config whose ``distill.method`` has a matching decoder (``hmkd``, ``icd``) and whose
            ``teacher`` is the teacher the decoder was fitted on.
        decoder: the fitted decoder file (``hmkd fit-decoder``); it must be of this teacher.
        images: validation-set indices or file names (:func:`hmkd.data.image_files.resolve_images`).
        weights: the teacher checkpoint (replaces ``teacher.weights``).
        objects: objects drawn per image (the smallest inquiring ones).
        levels: the decoders to draw, by key level (``P3``) or by name (HMKD's starting level,
            ``P4`` for keys at ``P3``); default every decoder.
        device: where the teacher and the decoders run (default ``cfg.device``).
        dpi: the PNGs' resolution; a figure is :func:`figure_inches` at this dpi.

    Returns:
        ``{"paths": [PNG, ...], "images": [{"index", "file_name", "figures": {decoder name:
        {"path", "key_level", "stride", "heads", "objects": [{"box" (original px), "label",
        "area", "cells_in_box", "uniform", "in_box": {"fitted": [per head], "untrained": [per
        head]}}]}}}]}``, also written to ``<out_dir>/attention.json``.
    """
    from hmkd.data import build_data
    from hmkd.distill.matching.fit import check_fitted_teacher, load_fitted
    from hmkd.distill.matching.report import build_decoder_method

    if objects < 1:
        raise ConfigError(f"viz attention: --objects must be >= 1, got {objects}")
    cfg = copy.deepcopy(cfg)
    if cfg.teacher is None:
        raise ConfigError("viz attention: the config has no 'teacher' model (the decoder attends over its maps)")
    if weights is not None:
        cfg.teacher.weights = str(weights)
    if not cfg.teacher.weights:
        raise ConfigError("viz attention: the teacher's checkpoint is needed: give --weights (or set teacher.weights)")
    from hmkd.models.checkpoint_info import check_fits, read_checkpoint_info

    check_fits(read_checkpoint_info(cfg.teacher.weights), cfg.teacher, section="teacher")  # names both architectures
    # the student provides only its input transform: never read its weights
    cfg.model.weights = None
    cfg.model.backbone_weights = None
    cfg.teacher.backbone_weights = None
    dev = torch.device(device if device is not None else cfg.device)
    val_set = build_data(cfg, train=False)
    indices = resolve_images(val_set, images)
    fitted = load_fitted(decoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        distiller = build_decoder_method(cfg, val_set, dev)
    named = decoder_key_levels(distiller)
    if not named or len(distiller.decoder_modules().state_dict()) == 0:
        raise ConfigError(f"viz attention: the config's {distiller.name} has no matching decoder "
                          "(distill.options.attention_term is false)")
    drawn = dict(named)
    if levels:
        for lv in levels:
            if lv not in named and lv not in named.values():
                raise ConfigError(f"viz attention: --level {lv}: no decoder attends over that level (decoders: "
                                  f"{', '.join(f'{n or distiller.name} over {k}' for n, k in named.items())})")
        drawn = {n: k for n, k in named.items() if n in levels or k in levels}
    check_fitted_teacher(fitted, decoder, cfg.teacher.weights)
    spec, own = json_safe(fitted.get("spec") or {}), json_safe(distiller.fit_spec())
    differ = sorted(k for k in set(spec) | set(own) if spec.get(k) != own.get(k))
    if differ:
        logger.warning("%s was fitted with other settings than this config's (%s): the untrained decoder is this "
                       "config's", decoder, ", ".join(differ))
    states = {"fitted": {k: v.clone() for k, v in fitted["state_dict"].items()},
              "untrained": distiller.decoder_state()}
    distiller.load_decoder_state(states["fitted"], decoder)  # its shapes must match before anything is drawn
    distiller.eval()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file_names = [str(val_set.coco.imgs[val_set.ids[i]]["file_name"]) for i in indices]
    class_names = getattr(val_set, "label_names", None) or getattr(val_set, "class_names", None)
    method = distiller.name.upper()
    paths: list[str] = []
    records: list[dict[str, Any]] = []
    for idx, file_name, stem in zip(indices, file_names, unique_stems(file_names)):
        rec = _image_record(distiller, val_set, idx, dev, states, objects, drawn)
        figures = {}
        for name, dec in rec["decoders"].items():
            key = dec["key_level"]
            stride = dec["stride"]
            where = f"{key} (stride {stride:g})" if isinstance(stride, float) else f"{key} (drawn on the finest map)"
            title = (f"{file_name}: {method} matching decoder{f' {name}' if name else ''}, attention over the teacher's "
                     f"{where}\nper object: the fitted decoder ({os.path.basename(decoder)}) above, the untrained one "
                     f"(fresh, seed {cfg.seed}) below; red: the object's box")
            path = _draw(rec, name, title=title, class_names=class_names, states=list(states), dpi=dpi,
                         path=out / f"{stem}_attention_{key}.png")
            paths.append(path)
            figures[name] = {"path": path, **{k: v for k, v in dec.items() if k not in ("objects", "map_extent")},
                             "objects": [{k: v for k, v in o.items() if k != "maps"} for o in dec["objects"]]}
        records.append({"index": idx, "file_name": file_name, "figures": figures})
    result = {"decoder": os.path.abspath(decoder), "teacher": os.path.abspath(cfg.teacher.weights),
              "method": distiller.name, "paths": paths, "images": records}
    write_json(out / "attention.json", result)
    return result
