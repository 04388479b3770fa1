"""Detection pictures: the detections of several models on one image, side by side (paper Fig. 4).

For each image, :func:`draw_detections` writes one PNG with one panel per model, and, when the
image's annotations are known, a ground-truth panel first. Every panel has the image's original
resolution (or an integer multiple of it, ``upscale``, for small images) under a title bar; boxes
are coloured by class with ``name score`` tags (names from the label map, ``c1``, ``c2`` ...
without one), and *small* boxes (area below ``small_area``, 32 x 32 px by default, measured in the
original image, as COCO's APs does) get a red outer outline, as the paper highlights small objects
in red, and a count in the panel title.

Sizes follow the image: the font is about 1/45 of the image width (at least 10 px), line widths
grow past 640 px, and a title that does not fit is wrapped onto more lines (the bar grows; every
panel of a picture gets the same bar). Tags are placed so that they do not cover each other: each
tag (most confident first) takes the first free spot above, inside or below its box, then further
up or down with a leader line; a tag that finds no free spot is left out (the box stays, the title
counts the hidden tags, and ``detections.json`` has every detection).

``show="found"`` draws what each model finds instead of its detections (:mod:`hmkd.viz.found`).

The models come as :data:`hmkd.models.specs.ModelSpec` (built by :func:`hmkd.models.specs.as_model`);
:func:`hmkd.viz.panels.build_panel_models` is the checks and model building every side-by-side picture
shares, :mod:`hmkd.viz.panels` the fonts, title bar and legend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from hmkd.data.image_files import load_image, unique_stems
from hmkd.errors import ConfigError
from hmkd.models.specs import ModelSpec, run_detector
from hmkd.utils import write_json
from hmkd.viz.found import MATCH_IOU, draw_found, found_line, found_status, match_to_truth
from hmkd.viz.panels import (
    PANEL_GAP,
    SMALL_COLOUR,
    build_panel_models,
    draw_header,
    draw_legend,
    font_size,
    header_lines,
    legend_height,
    legend_lines,
    load_font,
    save_png,
    scratch_draw,
    stroke,
    text_size,
    title_height,
)

SHOW_MODES = ("all", "found")
"""What a picture draws: every detection, or what each model finds (:mod:`hmkd.viz.found`)."""

# tab10-like class colours without pure red, which marks small detections
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (255, 187, 120),
    (152, 223, 138), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (174, 199, 232), (0, 90, 50), (90, 0, 120), (120, 90, 0),
]

__all__ = [
    "PALETTE",
    "SHOW_MODES",
    "class_colour",
    "draw_detections",
    "draw_panels",
    "ground_truth_of",
    "place_tags",
]


# --------------------------------------------------------------------------- drawing


def class_colour(label: int) -> tuple[int, int, int]:
    """The colour of class ``label`` (1-based; background 0 never drawn)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names and 1 <= label <= len(class_names):
        return str(class_names[label - 1])
    return f"c{label}"


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def place_tags(
    boxes: Sequence[Sequence[float]],
    sizes: Sequence[tuple[int, int]],
    bounds: tuple[float, float, float, float],
    *,
    max_cover: float = 0.25,
) -> list[tuple[float, float, bool] | None]:
    """Greedy tag placement: for each box (in the given order, most important first) and its tag
    size ``(w, h)``, the top-left corner ``(x, y, adjacent)`` of a spot inside ``bounds`` that
    overlaps no tag placed before, or None when there is none or the tags placed so far already
    cover ``max_cover`` of ``bounds`` (so that tags never hide the picture).

    Candidates, in order: above the box's top-left corner, inside it (only in a box at least twice
    the tag's height and as wide: a tag inside a smaller box would hide the object), below it, the
    same at the right edge, then 2 and 3 tag heights further up or down (``adjacent`` False: draw a
    leader).
    """
    bx0, by0, bx1, by1 = bounds
    budget = max_cover * max(1.0, (bx1 - bx0) * (by1 - by0))
    used = 0.0
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float, bool] | None] = []
    for (x1, y1, x2, y2), (tw, th) in zip(boxes, sizes):
        if used + tw * th > budget:
            out.append(None)
            continue
        cands = []
        roomy = (y2 - y1) >= 2 * th and (x2 - x1) >= tw  # a tag inside a smaller box would hide the object
        for x in (x1, x2 - tw):
            cands += [(x, y1 - th, True), *([(x, y1, True)] if roomy else []), (x, y2, True)]
        for k in (1, 2):
            cands += [(x1, y1 - th * (k + 1), False), (x1, y2 + th * k, False)]
        spot = None
        for x, y, adj in cands:
            x = min(max(x, bx0), bx1 - tw)
            y = min(max(y, by0), by1 - th)
            rect = (x, y, x + tw, y + th)
            if not any(_overlap(rect, r) > 0 for r in placed):
                spot = (x, y, adj)
                placed.append(rect)
                used += tw * th
                break
        out.append(spot)
    return out


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones."""
    return (0, 0, 0) if 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] > 150 else (255, 255, 255)


def _as_image(image: Image.Image | torch.Tensor) -> Image.Image:
    if isinstance(image, torch.Tensor):
        arr = (image.detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        image = Image.fromarray(arr, "RGB")
    return image.convert("RGB")


def _panel_info(det: Mapping[str, Any], score_thresh: float, small_area: float, w: int, h: int) -> dict[str, Any]:
    """Boxes of one panel above the threshold, clipped to the image, with their flags."""
    boxes = torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(det["labels"]).reshape(-1)
    truth = "scores" not in det
    scores = torch.ones(len(boxes)) if truth else torch.as_tensor(det["scores"], dtype=torch.float32).reshape(-1)
    crowd = torch.as_tensor(det.get("iscrowd", torch.zeros(len(boxes))), dtype=torch.bool).reshape(-1)
    keep = scores >= (0.0 if truth else score_thresh)
    boxes, scores, labels, crowd = boxes[keep], scores[keep], labels[keep], crowd[keep]
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    small = (areas < small_area) & ~crowd
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, w - 1)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, h - 1)
    return {"boxes": clipped, "scores": scores, "labels": labels, "small": small, "crowd": crowd, "truth": truth}


def _info_line(p: Mapping[str, Any], score_thresh: float, hidden: int) -> str:
    n_crowd = int(p["crowd"].sum())
    n = len(p["scores"]) - n_crowd
    if p["truth"]:
        text = f"{n} objects, {int(p['small'].sum())} small"
        if n_crowd:
            text += f", {n_crowd} crowd"
    else:
        text = f"{n} dets >= {score_thresh:.2f}, {int(p['small'].sum())} small"
    if hidden:
        text += f", {hidden} tags hidden"
    return text


def check_show(show: Any, text_px: Any = None) -> None:
    """``show`` must be one of :data:`SHOW_MODES`, ``text_px`` None or an integer >= 6."""
    if show not in SHOW_MODES:
        raise ConfigError(f"show must be one of {', '.join(SHOW_MODES)}, got {show!r}")
    if text_px is not None and (not isinstance(text_px, int) or text_px < 6):
        raise ConfigError(f"font size must be an integer >= 6 pixels, got {text_px!r}")


def check_upscale(upscale: Any) -> None:
    """``upscale`` (how many times a panel's image is enlarged) must be an integer >= 1."""
    if not isinstance(upscale, int) or upscale < 1:
        raise ConfigError(f"upscale must be an integer >= 1, got {upscale!r}")


def draw_panels(
    image: Image.Image | torch.Tensor,
    results: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    *,
    score_thresh: float = 0.3,
    small_area: float = 32 * 32,
    class_names: Sequence[str] | None = None,
    upscale: int = 1,
    show: str = "all",
    text_px: int | None = None,
) -> Image.Image:
    """Compose one picture: per ``(title, detections)`` a panel of the image at its own resolution
    (``upscale`` times it, nearest neighbour, for small images; boxes and ``small_area`` stay in
    the image's own pixels).

    ``detections`` has ``boxes`` (xyxy, pixels of ``image``), ``scores`` and ``labels``; an entry
    without ``scores`` is ground truth (every box drawn, tags without scores; an optional
    ``iscrowd`` flags crowd regions, drawn grey without tags). ``class_names`` names labels
    ``1..K``. Output: ``n * W + (n - 1) * 4`` wide; the panels sit under a title bar
    (:func:`title_height` ``(W, lines)``, ``lines`` the most any panel's title needs: 2 unless the
    panel is too narrow for its counts) and over a legend (what red and the tags mean,
    :func:`legend_height`). ``picture.info`` holds ``title_height`` and ``legend_height``.

    ``show="found"`` (:mod:`hmkd.viz.found`) needs a ground-truth entry; every panel then
    draws the ground-truth objects, the model panels coloured by what their model finds, and no
    tags; ``picture.info["found"]`` holds each panel's counts (None for the ground truth).
    ``text_px`` sets the title font's size in pixels (default: about 1/45 of a panel's width);
    tags and legend follow it.
    """
    check_upscale(upscale)
    check_show(show, text_px)
    image = _as_image(image)
    w, h = image.size
    panels = [_panel_info(det, score_thresh, small_area, w, h) for _, det in results]
    found = found_status(results, panels, score_thresh) if show == "found" else None
    truth_panel = next((p for p in panels if p["truth"]), None)
    if upscale > 1:
        image = image.resize((w * upscale, h * upscale), Image.NEAREST)
        w, h = image.size
        for p in panels:
            p["boxes"] = p["boxes"] * upscale
    n = max(1, len(results))
    fs = font_size(w, text_px)
    unit = stroke(w)
    tag_font = load_font(max(9, round(fs * 0.8)))
    scratch = scratch_draw()
    # tags and their spots first (the counts in the title need the number of hidden tags)
    layouts = []
    for p in panels:
        if found is not None:  # found mode: no tags
            layouts.append(([], {}, [], []))
            continue
        order = torch.argsort(p["scores"], descending=True, stable=True).tolist()
        order = [j for j in order if not p["crowd"][j]]
        texts = {
            j: _class_name(int(p["labels"][j]), class_names) + ("" if p["truth"] else f" {float(p['scores'][j]):.2f}")
            for j in order
        }
        sizes = [tuple(v + 2 for v in text_size(scratch, texts[j], tag_font)) for j in order]
        spots = place_tags([p["boxes"][j].tolist() for j in order], sizes, (0, 0, w, h))
        layouts.append((order, texts, sizes, spots))
    hidden = [sum(s is None for s in lay[3]) for lay in layouts]
    headers = [
        header_lines(w, str(title), _info_line(p, score_thresh, k) if found is None or found[i] is None
                     else found_line(found[i], score_thresh), text_px=text_px)
        for i, ((title, _), p, k) in enumerate(zip(results, panels, hidden))
    ]
    side = int(round(small_area ** 0.5))
    legend = f"red outline: small (area < {side}x{side} px); tags: class" + (
        " and score" if any(not p["truth"] for p in panels) else "")
    if found is not None:
        versus = next((f["versus"] for f in found if f is not None and "versus" in f), None)
        legend = (f"boxes: the ground-truth objects; green: found (a detection of its class with IoU >= {MATCH_IOU} "
                  f"and score >= {score_thresh:.2f}), red: missed"
                  + (f", yellow: found, but missed by {versus}" if versus else "")
                  + f"; other dets (finding no object) not drawn; small: area < {side}x{side} px")
    if any(hidden):
        legend += ", most confident first, left out where they would cover another tag"
    if any(bool(p["crowd"].any()) for p in panels):
        legend += "; grey: crowd regions"
    width = n * w + (n - 1) * PANEL_GAP
    foot = legend_lines(w, legend, width, text_px=text_px)
    bar = title_height(w, max((len(hl) for hl in headers), default=2), text_px=text_px)
    canvas = Image.new("RGB", (width, h + bar + legend_height(w, len(foot), text_px=text_px)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (p, (order, texts, sizes, spots)) in enumerate(zip(panels, layouts)):
        x0 = i * (w + PANEL_GAP)
        canvas.paste(image, (x0, bar))
        if found is not None:
            draw_found(draw, truth_panel, found[i], x0, bar, unit)
            draw_header(draw, x0, w, headers[i], text_px=text_px)
            continue
        # boxes, least confident first (the best on top), then every tag over every box
        for j in reversed(order):
            x1, y1, x2, y2 = p["boxes"][j].tolist()
            x1, x2, y1, y2 = x1 + x0, max(x1, x2) + x0, y1 + bar, max(y1, y2) + bar
            colour = class_colour(int(p["labels"][j]))
            if p["small"][j]:
                o = 2 * unit
                draw.rectangle([x1 - o, y1 - o, x2 + o, y2 + o], outline=SMALL_COLOUR, width=2 * unit)
                draw.rectangle([x1, y1, x2, y2], outline=colour, width=unit)
            else:
                draw.rectangle([x1, y1, x2, y2], outline=colour, width=2 * unit)
        for j in torch.nonzero(p["crowd"]).flatten().tolist():
            x1, y1, x2, y2 = p["boxes"][j].tolist()
            draw.rectangle([x1 + x0, y1 + bar, max(x1, x2) + x0, max(y1, y2) + bar], outline=(150, 150, 150), width=unit)
        for j, (tw, th), spot in zip(order, sizes, spots):
            if spot is None:
                continue
            tx, ty, adjacent = spot
            tx, ty = tx + x0, ty + bar
            colour = class_colour(int(p["labels"][j]))
            if not adjacent:  # a leader from the tag to the box's nearer top/bottom corner
                x1, y1, _, y2 = p["boxes"][j].tolist()
                corner = (x1 + x0, (y1 if ty < y1 + bar else y2) + bar)
                draw.line([(tx + 1, ty + th / 2), corner], fill=colour, width=unit)
            draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
            draw.text((tx + 1, ty + 1), texts[j], fill=_text_colour(colour), font=tag_font, anchor="lt")
        draw_header(draw, x0, w, headers[i], SMALL_COLOUR if int(p["small"].sum()) else (60, 60, 60), text_px=text_px)
    draw_legend(draw, h + bar, w, foot, text_px=text_px)
    canvas.info.update(title_height=bar, legend_height=canvas.height - h - bar)  # for callers that crop
    if found is not None:
        canvas.info["found"] = [None if f is None else {k: v for k, v in f.items() if k != "status"} for f in found]
    return canvas


def ground_truth_of(dataset: Any, images: Sequence[str | os.PathLike]) -> dict[str, dict[str, torch.Tensor]]:
    """The annotations of those ``images`` that are in ``dataset`` (an hmkd COCO-format data set),
    matched by file: the same resolved path, else the same trailing path (the image's
    ``file_name``); ``{image as given: {"boxes" (xyxy), "labels" (1..K), "iscrowd"}}``."""
    coco = dataset.coco
    root = Path(dataset.images_dir)
    by_path: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    for img_id, rec in coco.imgs.items():
        fn = str(rec.get("file_name", ""))
        by_path[str((root / fn).resolve())] = img_id
        by_name.setdefault(Path(fn).name, []).append(img_id)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for img in images:
        p = Path(img)
        img_id = by_path.get(str(p.resolve()))
        if img_id is None:
            hits = [i for i in by_name.get(p.name, []) if p.as_posix().endswith(str(coco.imgs[i]["file_name"]))]
            img_id = hits[0] if len(hits) == 1 else None
        if img_id is None:
            continue
        anns = coco.imgToAnns.get(img_id, [])
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        out[str(img)] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([dataset.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        }
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
    ground_truth: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    upscale: int = 1,
    show: str = "all",
    text_px: int | None = None,
) -> list[str]:
    """Run each model on each image and write ``<out_dir>/<image stem>.png`` with one panel per model.

    Args:
        models: ``[(label, spec), ...]`` in panel order, e.g. teacher, student, distilled student
            (see :func:`hmkd.models.specs.specs_from_config`).
        images: image files; each is given to the detectors at its own size (they resize internally
            and return boxes in original pixels).
        score_thresh: detections below it are not drawn (the models' own thresholds are lowered to
            it for the run when they are higher).
        small_area: a detection is *small* when its box area in original pixels is below this.
        class_names: names of labels ``1..K`` (default ``c1``, ``c2`` ...).
        ground_truth: ``{image (as given in images): {"boxes" xyxy, "labels" 1..K[, "iscrowd"]}}``
            (:func:`ground_truth_of`); an image found there gets a ground-truth panel first.
        upscale: draw the panels at this many times the image's resolution (nearest neighbour;
            boxes scale with it, ``small_area`` still counts original pixels), so that a small
            image's tags are readable.
        show: ``"all"`` draws every detection at or above ``score_thresh`` with its tag;
            ``"found"`` marks each ground-truth object as found or missed by each model
            (:mod:`hmkd.viz.found`): every image needs its ground truth.
        text_px: title font size in pixels (default: about 1/45 of the image's drawn width).

    Also writes ``detections.json`` (every detection at or above ``score_thresh`` per image and
    model; with ``show="found"`` also ``found``: for each ground-truth object the index of the
    detection that finds it, -1 where none, and the panel's counts). Returns the PNG paths.
    """
    check_upscale(upscale)  # before any work
    check_show(show, text_px)
    if show == "found":
        lacking = [str(p) for p in images if str(p) not in (ground_truth or {})]
        if lacking:
            raise ConfigError(f"show='found': {lacking[0]} has no ground truth to match detections with "
                              "(only images of the data set have)")
    out, built = build_panel_models("draw_detections", models, images, out_dir, num_classes=num_classes, device=device)
    paths: list[str] = []
    record: dict[str, Any] = {"score_thresh": score_thresh, "small_area": small_area, "show": show, "images": {}}
    if class_names:
        record["class_names"] = list(class_names)
    for img_path, stem in zip(images, unique_stems(images)):
        img = load_image(img_path)
        results: list[tuple[str, Mapping[str, torch.Tensor]]] = []
        truth = (ground_truth or {}).get(str(img_path))
        if truth is not None:
            results.append(("ground truth", {k: v for k, v in truth.items() if k != "scores"}))
        per_model = {}
        for label, model in built:
            det = run_detector(model, img, score_thresh=score_thresh)
            results.append((label, det))
            keep = det["scores"] >= score_thresh
            kept = {k: det[k][keep] for k in ("boxes", "scores", "labels")}
            per_model[label] = {
                "boxes": [[round(v, 2) for v in b] for b in kept["boxes"].tolist()],
                "scores": [round(v, 4) for v in kept["scores"].tolist()],
                "labels": kept["labels"].tolist(),
            }
            if show == "found":
                per_model[label]["found"] = match_to_truth(kept, truth).tolist()
        picture = draw_panels(img, results, score_thresh=score_thresh, small_area=small_area, class_names=class_names,
                              upscale=upscale, show=show, text_px=text_px)
        for (label, _), counts in zip(results[1:], (picture.info.get("found") or [None])[1:]):
            if counts is not None:
                per_model[label]["counts"] = counts
        paths.append(save_png(picture, out / f"{stem}.png"))
        record["images"][str(img_path)] = per_model
    write_json(out / "detections.json", record, indent=1)
    return paths
