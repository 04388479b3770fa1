"""Speed and cost of detectors side by side: parameters, GFLOPs, latency/FPS (paper Table 8 / Fig. 5).

:func:`speed_report` measures, for each named model (typically teacher, student and distilled
student), at one input size and batch 1:

* **params**: every parameter of the detector (backbone, FPN, heads), in millions.
* **GFLOPs**: counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one real eval-mode
  forward of one image. It counts a multiply-add as **2 FLOPs** (so these numbers are twice the
  "FLOPs" = MACs that fvcore/mmcv-style tables print). It counts matrix products and convolutions
  only; not counted: NMS, box decoding and other post-processing, RoIAlign (a torchvision op),
  normalisation layers, activations, additions, pooling and resizing. For the R-CNNs the box head's
  cost grows with the number of proposals that reach it, which the report records (``proposals``).
* **latency**: wall time of ``model([image])`` (the detector's own normalise/resize, backbone, heads,
  decoding and NMS; not image decoding) under ``torch.inference_mode``, after ``warmup`` discarded
  iterations, with ``torch.cuda.synchronize()`` around every timed call on a GPU; median and mean
  over ``iters`` calls, FPS = 1000 / ms.
* with ``onnx=True``: the same for the exported ONNX file under onnxruntime (CPU provider, as many
  intra-op threads as torch uses), plus its agreement with PyTorch on the timing image.

By default (``resize_to_input``) each detector's own transform is set to keep ``input_size``
unchanged for the run, so every model sees the same ``H x W`` (padded to a multiple of 32). A
distilled student is a student: same architecture, same parameters and GFLOPs.

Outputs in ``out_dir``: ``speed.json``, ``speed.md`` (Markdown table) and ``gflops_vs_params.png``
(GFLOPs against parameters, one labelled point per model, as Fig. 5).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hmkd.config import Config, ModelConfig
from hmkd.errors import ConfigError
from hmkd.models import count_parameters
from hmkd.utils import machine_info, save_figure, write_json, write_text
from hmkd.data.image_files import load_image
from hmkd.models.specs import ModelSpec, as_model, specs_from_config

FLOPS_NOTE = (
    "FLOPs counted with torch.utils.flop_counter.FlopCounterMode on one eval-mode forward of one image "
    "at batch 1; one multiply-add = 2 FLOPs (GFLOPs = 2 x GMACs; fvcore/mmcv-style tables count MACs, "
    "half these numbers)."
)
NOT_COUNTED = [
    "NMS, box decoding and other post-processing",
    "RoIAlign (torchvision.ops, R-CNN box/mask heads read features with it)",
    "normalisation layers, activations, additions, pooling, resize/upsampling "
    "(FlopCounterMode counts matrix products and convolutions only)",
]
TIMING_NOTE = (
    "latency = wall time of model([image]) at batch 1 under torch.inference_mode (the detector's own "
    "normalise/resize, backbone, heads, decoding, NMS; not image decoding), warm-up iterations "
    "discarded, torch.cuda.synchronize() around each timed call on GPU; FPS = 1000 / latency ms. "
    "Post-processing time depends on how many candidates pass the score threshold, i.e. on the weights."
)

__all__ = [
    "FLOPS_NOTE",
    "NOT_COUNTED",
    "count_flops",
    "measure_latency",
    "models_from_config",
    "plot_gflops_vs_params",
    "speed_report",
]


def models_from_config(cfg: Config, weights: Mapping[str, str | None] | Sequence[tuple[str, str | None]] = ()) -> dict[str, ModelSpec]:
    """Named models for ``hmkd bench speed``: ``teacher`` (if the config has one) and ``student`` with
    their configs' own weights, then every ``NAME=CKPT`` (``teacher*`` names take the teacher's
    architecture, all others the student's; a name already present is replaced)."""
    out: dict[str, ModelSpec] = {}
    if cfg.teacher is not None:
        out["teacher"] = (cfg.teacher, None)
    out["student"] = (cfg.model, None)
    for label, spec in specs_from_config(cfg, weights):
        out[label] = spec
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _input_size_kept(model: nn.Module, size: tuple[int, int] | None) -> Iterator[None]:
    """Temporarily make the detector's transform leave an ``size`` image unresized."""
    tr = getattr(model, "transform", None)
    if size is None or tr is None or not hasattr(tr, "min_size"):
        yield
        return
    old = (tr.min_size, tr.max_size)
    tr.min_size, tr.max_size = (int(min(size)),), int(max(size))
    try:
        yield
    finally:
        tr.min_size, tr.max_size = old


def _arch(spec: ModelSpec, model: nn.Module) -> str:
    """``fcos resnet18 FPN256 P3-P7`` for a config; the module's class names otherwise."""
    cfg = spec if isinstance(spec, ModelConfig) else spec[0] if isinstance(spec, tuple) else None
    levels = getattr(getattr(model, "backbone", None), "levels", None)
    span = f" {levels[0]}-{levels[-1]}" if levels else ""
    if cfg is not None and cfg.detector.startswith("torchvision:"):
        return f"{cfg.detector}{span}"
    if cfg is not None:
        return f"{cfg.detector} {cfg.backbone} FPN{cfg.fpn_channels}{span}"
    body = getattr(getattr(model, "backbone", None), "body", None)
    return f"{type(model).__name__} {type(body).__name__ if body is not None else ''}{span}".strip()


def count_flops(model: nn.Module, image: torch.Tensor) -> dict[str, Any]:
    """FLOPs of one eval-mode forward of ``image`` (``[3, H, W]``), by aten op; see :data:`FLOPS_NOTE`.

    Returns ``{"flops", "gflops", "by_op", "proposals", "network_input"}``: ``proposals`` is the
    number of RoIs that reached an R-CNN box head (None for one-stage detectors) and
    ``network_input`` the padded ``[H, W]`` the backbone saw.
    """
    store: dict[str, Any] = {}
    handles = []
    if hasattr(model, "transform"):
        handles.append(model.transform.register_forward_hook(lambda m, a, o: store.__setitem__("hw", list(o[0].tensors.shape[-2:]))))
    if hasattr(model, "roi_heads"):
        handles.append(model.roi_heads.register_forward_pre_hook(lambda m, a: store.__setitem__("rois", sum(len(p) for p in a[1]))))
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            model([image])
    finally:
        for h in handles:
            h.remove()
    total = int(counter.get_total_flops())
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {
        "flops": total,
        "gflops": total / 1e9,
        "by_op": by_op,
        "proposals": store.get("rois"),
        "network_input": store.get("hw"),
    }


def _stats(times_ms: list[float]) -> dict[str, Any]:
    med, mean = statistics.median(times_ms), statistics.fmean(times_ms)
    return {
        "latency_ms": {
            "median": med,
            "mean": mean,
            "std": statistics.pstdev(times_ms),
            "min": min(times_ms),
            "max": max(times_ms),
            "n": len(times_ms),
        },
        "fps": {"median": 1000.0 / med if med > 0 else None, "mean": 1000.0 / mean if mean > 0 else None},
    }


def measure_latency(model: nn.Module, image: torch.Tensor, *, warmup: int = 5, iters: int = 20) -> dict[str, Any]:
    """Latency/FPS of ``model([image])`` at batch 1 (see :data:`TIMING_NOTE`)."""
    if iters < 1 or warmup < 0:
        raise ConfigError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = image.device
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            _sync(device)
            t0 = time.perf_counter()
            model([image])
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return _stats(times)


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when on the CPU, else a CPU copy (the caller's module stays where it is)."""
    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


def _onnx_latency(model: nn.Module, name: str, image: torch.Tensor, out_dir: Path, warmup: int, iters: int) -> dict[str, Any]:
    from hmkd.export.onnx import ExportError, check_onnx, export_onnx, onnx_session

    h, w = image.shape[-2:]
    path = out_dir / "onnx" / f"{name}.onnx"
    try:
        export_onnx(model, path, input_size=(h, w), sample=image)
    except ExportError as e:
        return {"error": str(e)}
    sess = onnx_session(path)
    feed = {sess.get_inputs()[0].name: image.cpu().numpy()}
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    check = check_onnx(model, path, [image.cpu()], score_thresh=0.05)
    return {
        "path": str(path),
        "provider": "CPUExecutionProvider",
        "threads": torch.get_num_threads(),
        **_stats(times),
        "matches_torch": check["ok"],
        "max_abs_diff_boxes": check["max_abs_diff_boxes"],
    }


def plot_gflops_vs_params(models: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> str:
    """Scatter of GFLOPs against parameters (M), one labelled point per model (models that cost the
    same, e.g. a student and its distilled copy, share one point and one label)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups: dict[tuple[float, float], list[str]] = {}
    for name, r in models.items():
        groups.setdefault((round(r["params_m"], 4), round(r["gflops"], 4)), []).append(name)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, ((p, g), names) in enumerate(sorted(groups.items())):
        ax.scatter([p], [g], s=60, color=plt.cm.tab10(i % 10), zorder=3)
        ax.annotate(" = ".join(names), (p, g), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("GFLOPs (1 multiply-add = 2 FLOPs)")
    ax.set_title(title or "GFLOPs vs parameters", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.25)
    fig.tight_layout()
    try:
        return save_figure(fig, str(path))
    finally:
        plt.close(fig)


def _fmt(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _markdown(report: dict[str, Any]) -> str:
    h, w = report["input_size"]
    onnx = report["onnx"]
    head = ["model", "architecture", "params (M)", "GFLOPs (mult-add = 2)", "latency ms (median / mean)", "FPS (median / mean)"]
    if onnx:
        head += ["ONNX Runtime ms (median / mean)", "ONNX Runtime FPS (median)"]
    lines = [
        f"# Speed and cost at {h}x{w}, batch 1, {report['device']} ({report['device_name']}, {report['threads']} threads)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    for name, r in report["models"].items():
        lat, fps = r["latency_ms"], r["fps"]
        row = [
            name,
            r["arch"],
            _fmt(r["params_m"]),
            _fmt(r["gflops"]),
            f"{_fmt(lat['median'], 1)} / {_fmt(lat['mean'], 1)}",
            f"{_fmt(fps['median'], 1)} / {_fmt(fps['mean'], 1)}",
        ]
        if onnx:
            o = r.get("onnx") or {}
            if "error" in o:
                row += ["export failed", "-"]
            else:
                row += [f"{_fmt(o['latency_ms']['median'], 1)} / {_fmt(o['latency_ms']['mean'], 1)}", _fmt(o["fps"]["median"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"- {FLOPS_NOTE}",
        "- Not counted: " + "; ".join(NOT_COUNTED) + ".",
        f"- {TIMING_NOTE} {report['warmup']} warm-up + {report['iters']} timed iterations.",
    ]
    rcnn = {n: r["proposals"] for n, r in report["models"].items() if r.get("proposals") is not None}
    if rcnn:
        lines.append("- R-CNN box-head proposals at the timed image: " + ", ".join(f"{n} {p}" for n, p in rcnn.items()) + ".")
    for name, r in report["models"].items():
        o = r.get("onnx") or {}
        if "error" in o:
            lines.append(f"- ONNX export of {name} failed: {o['error']}")
    return "\n".join(lines) + "\n"


def speed_report(
    models: Mapping[str, ModelSpec],
    *,
    out_dir: str | os.PathLike,
    input_size: tuple[int, int] = (320, 320),
    device: str | torch.device = "cpu",
    warmup: int = 5,
    iters: int = 20,
    onnx: bool = False,
    num_classes: int | None = None,
    image: str | os.PathLike | None = None,
    resize_to_input: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure every model in ``models`` (``{name: spec}``, e.g. from :func:`models_from_config`).

    Args:
        input_size: ``(H, W)`` of the test image (a fixed random image from ``seed``, or ``image``
            resized to it).
        device: ``cpu`` or ``cuda[:N]`` (latency synchronises CUDA).
        warmup, iters: discarded and timed iterations per model.
        onnx: also export each model to ``out_dir/onnx/<name>.onnx`` and time it in onnxruntime.
        num_classes: for configs that neither set ``num_classes`` nor name a weights file.
        resize_to_input: keep ``input_size`` as the size the network sees (see module docstring).
    Returns the report also written to ``out_dir/speed.json`` (with ``speed.md`` and
    ``gflops_vs_params.png`` beside it).
    """
    if not models:
        raise ConfigError("speed_report: no models given")
    h, w = (int(v) for v in input_size)
    if h < 32 or w < 32:
        raise ConfigError(f"input_size must be at least 32 x 32, got {input_size}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if image is not None:
        img = load_image(image, (h, w))
    else:
        img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    machine = machine_info(dev)
    report: dict[str, Any] = {
        "input_size": [h, w],
        "batch": 1,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine["cpu"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "machine": machine,
        "warmup": warmup,
        "iters": iters,
        "image": str(image) if image is not None else f"random (seed {seed})",
        "resize_to_input": resize_to_input,
        "flops_note": FLOPS_NOTE,
        "flops_per_multiply_add": 2,
        "not_counted": NOT_COUNTED,
        "timing_note": TIMING_NOTE,
        "onnx": bool(onnx),
        "models": {},
    }
    for name, spec in models.items():
        model = as_model(spec, num_classes=num_classes, device=dev)
        x = img.to(dev)
        with _input_size_kept(model, (h, w) if resize_to_input else None):
            flops = count_flops(model, x)
            timing = measure_latency(model, x, warmup=warmup, iters=iters)
            with torch.inference_mode():
                n_det = int(len(model([x])[0]["boxes"]))
            params = count_parameters(model)
            entry: dict[str, Any] = {
                "arch": _arch(spec, model),
                "params": params,
                "params_m": params / 1e6,
                "gflops": flops["gflops"],
                "flops": flops["flops"],
                "flops_by_op": flops["by_op"],
                "proposals": flops["proposals"],
                "network_input": flops["network_input"],
                "detections": n_det,
                **timing,
                "onnx": _onnx_latency(_on_cpu(model), name, img, out, warmup, iters) if onnx else None,
            }
        report["models"][name] = entry
        del model
    write_json(out / "speed.json", report)
    write_text(out / "speed.md", _markdown(report))
    plot_gflops_vs_params(report["models"], out / "gflops_vs_params.png", title=f"GFLOPs vs parameters at {h}x{w}")
    return report
