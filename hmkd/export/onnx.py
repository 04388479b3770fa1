"""ONNX export of a detector for deployment, and a check of the exported file against PyTorch.

:func:`export_onnx` writes the whole torchvision detector (its own normalise/resize transform,
backbone, FPN, head, box decoding, NMS and the rescale of boxes to the input image) as one ONNX
graph at a fixed input size, batch 1, eval mode:

* input ``image``: float32 ``[3, H, W]`` RGB in ``[0, 1]`` (the tensor the PyTorch model takes);
* outputs in the model's own order: ``boxes`` ``[N, 4]`` (xyxy, input pixels), ``scores`` ``[N]``,
  ``labels`` ``[N]`` (int64, 1..K) for RetinaNet/FCOS; the R-CNNs order them ``boxes, labels, scores``
  (and Mask R-CNN adds ``masks`` ``[N, 1, H, W]``). ``N`` varies per image; names are what counts.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is the one that
works for torchvision detection models in torch 2.14 (torchvision makes its ops ONNX-friendly while
tracing). The ``torch.export``-based exporter (``dynamo=True``) fails on all four detectors at
``torch.export`` time: the post-processing has data-dependent shapes (top-k over a score-thresholded
candidate count, NMS), "Could not guard on data-dependent expression". ``exporter="dynamo"`` tries
it anyway, for newer torch versions.

The file is written atomically (temp file, ``onnx.checker``, replace). :func:`check_onnx` runs
onnxruntime and PyTorch on the same images and compares the detections above a score threshold.

Metadata (the model's ``metadata_props``, read with ``onnx.load(f).metadata_props`` or
onnxruntime's ``session.get_modelmeta().custom_metadata_map``): ``producer``, ``model``, ``input``
and ``input_size`` (``H,W``), ``resized_to`` (the size the graph's own transform resizes that input
to), ``outputs``, ``labels`` and, when the data set's categories are known, ``label_map``: a JSON
object from each output label to its data set category,
``{"1": {"category_id": 3, "name": "disc"}, ...}`` (:func:`read_label_map` reads it back). Labels
that are no category (torchvision's ten "N/A" COCO outputs) are left out. For a torchvision COCO
checkpoint without a data set the map is COCO's, from torchvision's weight metadata
(:func:`hmkd.cli.inputs.model_inputs`).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hmkd.errors import ConfigError, HMKDError
from hmkd.utils import atomic_open

EXPORTERS = ("legacy", "dynamo")

__all__ = [
    "EXPORTERS",
    "ExportError",
    "check_onnx",
    "export_and_check",
    "export_onnx",
    "export_size",
    "onnx_metadata",
    "onnx_session",
    "output_names",
    "read_label_map",
    "resized_size",
]


class ExportError(HMKDError):
    """A model could not be exported to ONNX (message names the model and the exporter's reason)."""


def output_names(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Keys of the detector's eval-mode output dict, in the order the ONNX graph emits them."""
    with torch.inference_mode():
        out = model([sample])[0]
    return list(out.keys())


def resized_size(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` the detector's own transform resizes an ``input_size`` image to (eval mode)."""
    inner = getattr(model, "module", model)
    was_training = inner.transform.training
    inner.transform.eval()
    try:
        with torch.inference_mode():
            device = next(inner.parameters()).device
            images, _ = inner.transform([torch.zeros(3, *input_size, device=device)])
    finally:
        inner.transform.train(was_training)
    h, w = images.image_sizes[0]
    return int(h), int(w)


def onnx_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights not loaded)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def read_label_map(onnx_path: str | os.PathLike) -> dict[int, dict[str, Any]] | None:
    """``{label: {"category_id", "name"}}`` from an exported file's ``label_map`` (the labels that are
    categories); None without one."""
    raw = onnx_metadata(onnx_path).get("label_map")
    if raw is None:
        return None
    return {int(k): v for k, v in json.loads(raw).items()}


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The reason of an exporter failure in one line (the data-dependent-shape guard when there is one)."""
    chain, cur = [], e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        for line in str(err).splitlines():
            if "data-dependent" in line:
                line = " ".join(line.split())
                return f"{type(err).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    input_size: tuple[int, int] = (320, 320),
    opset: int = 17,
    exporter: str = "legacy",
    sample: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    label_map: Any | None = None,
) -> str:
    """Export ``model`` (eval mode, batch 1, input ``[3, H, W]`` with ``(H, W) = input_size``) to ONNX.

    Args:
        model: a torchvision detection model (hmkd's :func:`~hmkd.models.build_model` or torchvision's).
        out_path: ``.onnx`` file; written atomically.
        opset: ONNX opset (17 default; torchvision's ops need >= 11).
        exporter: ``legacy`` (TorchScript exporter, works) or ``dynamo`` (``torch.export``; fails on
            detection post-processing in torch 2.14, see the module docstring).
        sample: the image traced (default a fixed random one); its detections do not matter.
        metadata: extra ``key: value`` strings stored in the file's ``metadata_props``.
        label_map: a :class:`~hmkd.models.checkpoint_info.LabelMap` of the output labels, stored
            as ``label_map`` (see the module docstring); None stores none.
    Returns the path written. Raises :class:`ExportError` with the exporter's reason on failure.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r} (known: {', '.join(EXPORTERS)})")
    h, w = (int(v) for v in input_size)
    if h < 32 or w < 32:
        raise ConfigError(f"input_size must be at least 32 x 32, got {input_size}")
    inner = getattr(model, "module", model)
    if not (hasattr(inner, "transform") and hasattr(inner, "backbone")):
        raise ExportError(f"cannot export {type(inner).__name__}: not a torchvision detection model")
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    if sample is None:
        g = torch.Generator().manual_seed(0)
        sample = torch.rand(3, h, w, generator=g)
    if tuple(sample.shape) != (3, h, w):
        raise ConfigError(f"sample image must be [3, {h}, {w}], got {list(sample.shape)}")
    sample = sample.to(device)
    names = output_names(inner, sample)
    out = Path(out_path)
    scratch = tempfile.TemporaryDirectory(prefix="hmkd_onnx_")
    tmp = Path(scratch.name) / "model.onnx"  # the exporter writes a path; the final file is written atomically
    what = f"{type(inner).__name__} ({exporter} exporter, opset {opset})"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer warnings about Python scalars are expected here
            kwargs: dict[str, Any] = dict(
                opset_version=opset, input_names=["image"], output_names=names, dynamo=exporter == "dynamo"
            )
            if exporter == "legacy":
                kwargs["do_constant_folding"] = True
            torch.onnx.export(inner, ([sample],), str(tmp), **kwargs)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        rh, rw = resized_size(inner, (h, w))
        meta = {
            "producer": "hmkd",
            "model": type(inner).__name__,
            "input": f"image float32 [3,{h},{w}] RGB in [0,1]",
            "input_size": f"{h},{w}",
            "resized_to": f"{rh},{rw}",
            "outputs": ",".join(names),
            "labels": "1..K (0 is background, never output)"
            + ("; label_map gives each one's category_id and name" if label_map is not None else "; no label map known"),
            **{str(k): str(v) for k, v in (metadata or {}).items()},
        }
        if label_map is not None:
            meta["label_map"] = json.dumps(label_map.by_label())
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        with atomic_open(out, "wb") as f:
            f.write(proto.SerializeToString())
    except HMKDError:
        raise
    except Exception as e:
        raise ExportError(f"cannot export {what}: {_one_line(e)}") from e
    finally:
        scratch.cleanup()
        inner.train(was_training)
    return str(out)


def onnx_session(onnx_path: str | os.PathLike, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session (``threads``: intra-op threads, default torch's thread count)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def _input_hw(session: Any) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    if len(shape) != 3 or not all(isinstance(s, int) for s in shape[1:]):
        raise ConfigError(f"ONNX input has shape {shape}; expected a fixed [3, H, W]")
    return int(shape[1]), int(shape[2])


def _match(tb: torch.Tensor, tl: torch.Tensor, ob: torch.Tensor, ol: torch.Tensor) -> torch.Tensor:
    """For each PyTorch box, the |diff| (L-inf) to the nearest unused ONNX box of the same label."""
    diffs = []
    used = torch.zeros(len(ob), dtype=torch.bool)
    for b, l in zip(tb, tl):
        d = (ob - b).abs().amax(dim=1)
        d[(ol != l) | used] = float("inf")
        j = int(torch.argmin(d)) if len(d) else -1
        if j < 0 or not torch.isfinite(d[j]):
            diffs.append(float("inf"))
            continue
        used[j] = True
        diffs.append(float(d[j]))
    return torch.tensor(diffs)


def check_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    images: Sequence[torch.Tensor | str | os.PathLike],
    *,
    score_thresh: float = 0.05,
    atol: float | None = None,
    score_atol: float = 1e-3,
) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on ``images`` (tensors ``[3, H, W]`` or files, resized to the
    exported size).

    Per image, detections with score >= ``score_thresh`` are compared: the same count (detections
    within ``score_atol`` of the threshold are left out of the count, as rounding may put them on
    either side), boxes matched by rank after sorting by score, and where near-equal scores swap
    ranks (a rank match exceeds ``atol``) by nearest box of the same label instead. ``atol`` defaults
    to ``1e-3 * max(H, W)`` pixels. Returns ``{"ok", "images", "atol", "max_abs_diff_boxes",
    "max_abs_diff_scores", "per_image": [...]}``.
    """
    from hmkd.data.image_files import load_image

    session = onnx_session(onnx_path)
    h, w = _input_hw(session)
    tol = 1e-3 * max(h, w) if atol is None else float(atol)
    inner = getattr(model, "module", model).eval()
    device = next(inner.parameters()).device
    names = [o.name for o in session.get_outputs()]
    for need in ("boxes", "scores", "labels"):
        if need not in names:
            raise ConfigError(f"{onnx_path}: no '{need}' output (outputs: {', '.join(names)})")
    per_image = []
    for k, img in enumerate(images):
        x = load_image(img, (h, w)) if isinstance(img, (str, os.PathLike)) else img.float()
        if tuple(x.shape) != (3, h, w):
            raise ConfigError(f"check image {k} has shape {list(x.shape)}; the ONNX model takes [3, {h}, {w}]")
        with torch.inference_mode():
            ref = inner([x.to(device)])[0]
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})))
        t = {n: ref[n].detach().cpu() for n in ("boxes", "scores", "labels")}
        o = {n: torch.from_numpy(np.asarray(got[n])) for n in ("boxes", "scores", "labels")}
        res: dict[str, Any] = {}
        for side, d in (("torch", t), ("onnx", o)):
            order = torch.argsort(d["scores"], descending=True, stable=True)
            for n in d:
                d[n] = d[n][order]
            keep = d["scores"] >= score_thresh
            res[f"n_{side}"] = int(keep.sum())
            res[f"n_{side}_sure"] = int((d["scores"] >= score_thresh + score_atol).sum())
            res[f"n_{side}_maybe"] = int((d["scores"] >= score_thresh - score_atol).sum())
            for n in d:
                d[n] = d[n][keep]
        n = min(res["n_torch"], res["n_onnx"])
        box_diff = score_diff = 0.0
        matched_by = "rank"
        if n:
            tb, ob = t["boxes"][:n].float(), o["boxes"][:n].float()
            box_diff = float((tb - ob).abs().max())
            score_diff = float((t["scores"][:n] - o["scores"][:n]).abs().max())
            labels_equal = bool((t["labels"][:n] == o["labels"][:n].to(t["labels"].dtype)).all())
            if box_diff > tol or not labels_equal:
                matched_by = "nearest"
                box_diff = float(_match(tb, t["labels"][:n], o["boxes"].float(), o["labels"].to(t["labels"].dtype)).max())
        counts_ok = res["n_torch_sure"] <= res["n_onnx"] <= res["n_torch_maybe"] and (
            res["n_onnx_sure"] <= res["n_torch"] <= res["n_onnx_maybe"]
        )
        res.update(
            max_abs_diff_boxes=box_diff,
            max_abs_diff_scores=score_diff,
            matched_by=matched_by,
            ok=bool(counts_ok and box_diff <= tol and score_diff <= score_atol),
        )
        per_image.append(res)
    return {
        "ok": all(r["ok"] for r in per_image),
        "images": len(per_image),
        "input_size": [h, w],
        "score_thresh": score_thresh,
        "atol": tol,
        "max_abs_diff_boxes": max((r["max_abs_diff_boxes"] for r in per_image), default=0.0),
        "max_abs_diff_scores": max((r["max_abs_diff_scores"] for r in per_image), default=0.0),
        "per_image": per_image,
    }


def export_size(text: str | None, model_cfg: Any) -> tuple[int, int]:
    """``--size S`` or ``HxW``; default the square the detector evaluates at (``model.min_size``,
    its last entry when a list, capped by ``model.max_size``)."""
    if text is None:
        ms = model_cfg.min_size[-1] if isinstance(model_cfg.min_size, list) else model_cfg.min_size
        s = int(min(ms, model_cfg.max_size))
        return s, s
    parts = text.lower().split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) not in (1, 2):
        raise ConfigError(f"--size {text!r}: give S or HxW in pixels, e.g. 640 or 480x640")
    return (hw[0], hw[0]) if len(hw) == 1 else (hw[0], hw[1])


def export_and_check(
    model: nn.Module,
    model_cfg: Any,
    out_path: str | os.PathLike,
    *,
    size: tuple[int, int],
    opset: int = 17,
    weights: str | os.PathLike,
    label_map: Any | None = None,
    label_map_source: str = "none",
    check_images: Sequence[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """``hmkd export onnx`` once its model is built: :func:`export_onnx` at ``size`` (metadata: the
    architecture of ``model_cfg`` and the ``weights`` file's name), then :func:`check_onnx` on
    ``check_images`` (files), else on two random images (seed 0), at ``model_cfg.score_thresh``.

    Returns the summary the command prints: ``{"onnx", "ok", "input", "resized_inside_to",
    "max_abs_diff_boxes", "max_abs_diff_scores", "label_map", "label_map_from"}`` (``label_map``:
    a :class:`~hmkd.models.checkpoint_info.LabelMap` or None, ``label_map_source`` where it came from).
    """
    path = export_onnx(model, out_path, input_size=size, opset=opset, label_map=label_map,
                       metadata={"architecture": f"{model_cfg.detector}/{model_cfg.backbone}",
                                 "weights": os.path.basename(weights)})
    if check_images:
        from hmkd.data.image_files import load_image

        images = [load_image(p, size) for p in check_images]
    else:
        g = torch.Generator().manual_seed(0)
        images = [torch.rand(3, *size, generator=g) for _ in range(2)]
    report = check_onnx(model, path, images, score_thresh=model_cfg.score_thresh)
    return {
        "onnx": path,
        "ok": report["ok"],
        "input": f"image float32 [3, {size[0]}, {size[1]}], RGB in [0, 1], batch 1",
        "resized_inside_to": "{}x{}".format(*resized_size(model, size)),
        "max_abs_diff_boxes": report["max_abs_diff_boxes"],
        "max_abs_diff_scores": report["max_abs_diff_scores"],
        "label_map": {k: f"{v['name']} (category {v['category_id']})" for k, v in label_map.by_label().items()}
        if label_map else None,
        "label_map_from": label_map_source,
    }
