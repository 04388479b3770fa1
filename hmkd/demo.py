"""``hmkd demo``: the paper-regime benchmark's story at demo size, on CPU.

synthetic set (the ``aitod`` preset: objects from very tiny to medium) -> pretrained stand-ins of
both backbones (the ImageNet stand-in, :mod:`hmkd.training.pretrain`) -> ResNet-34 teacher (3x) ->
plain ResNet-18 student (1x) -> HMKD ResNet-18 student (1x, its matching decoder first fitted on
the teacher) -> COCO and AI-TOD evaluation of all three -> a table with the gain, set against the
seed spread the committed paper-regime benchmark measured -> a side-by-side picture of what the
two students find on the validation images with the most small objects: each ground-truth object
green where a student finds it, red where it misses it, yellow where HMKD finds what the plain
student misses (``show="found"`` of :func:`hmkd.viz.detections.draw_detections`).

The numbers move between machines: the floating-point order of oneDNN's and ATen's CPU kernels
depends on the instruction set they pick and on the thread count, and a difference in the last
bits of the first step grows over training. ``results.json`` records what explains it
(:func:`machine_facts`).

``--quick`` does the same with tiny settings (a smoke run of every stage, not a measurement).
Everything goes under ``out_dir`` except the stand-ins, which go to hmkd's cache (``$HMKD_CACHE``,
default ``~/.cache/hmkd``) like every run's, so a second demo reuses them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hmkd.config import Config, from_dict, merge
from hmkd.utils import machine_info, write_json, write_text

METRICS = ("mAP", "AP50", "APvt", "APt", "APs", "APm")
"""The table's columns: COCO's mAP and AP50, then AI-TOD's size buckets (very tiny < 8^2 px^2,
tiny 8^2-16^2, small 16^2-32^2, medium >= 32^2)."""

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "synth_paper" / "results.json"
"""The committed paper-regime benchmark (a source checkout has it; an installed package may not)."""

PICTURE_IMAGES = 3
PICTURE_UPSCALE = 4
"""The pictures are drawn at 4x the demo's 128 px images, so that their objects are visible."""
PICTURE_TEXT_PX = 22
"""Title and legend font size: readable where a README shows the 3-panel picture about 880 px wide."""
PICTURE_SCORE_THRESH = 0.3
"""A detection counts as finding an object at this score or above (the students score most near 0.4)."""

NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
"""Environment variables that change which CPU kernels torch runs, and so the demo's numbers."""
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
"""The instruction sets that decide oneDNN's and ATen's kernels on x86."""


def demo_settings(out_dir: str, quick: bool) -> dict[str, dict[str, Any]]:
    """The three runs' configs (as dicts): configs/synth/paper.yaml at demo size."""
    if quick:
        size, n_train, n_val, iters, fpn, convs = 96, 16, 8, 8, 32, 1
        pretrain = {"synth": {"n_train": 16, "n_val": 4, "size": 96, "seed": 1000, "preset": "pretrain"},
                    "iters": 8, "batch_size": 2, "lr": 1e-3, "seed": 1000}
        batch, hmkd_opts = 2, {"hidden": 32, "heads": 4, "fit_iters": 4}
    else:
        size, n_train, n_val, iters, fpn, convs = 128, 200, 60, 200, 128, 2
        # budget: stand-ins 150 iterations each (pretrained inside the run's 128 px detector), decoder fit 300 steps
        pretrain = {"synth": {"n_train": 300, "n_val": 40, "size": 128, "seed": 1000, "preset": "pretrain"},
                    "iters": 150, "batch_size": 4, "lr": 1e-3, "seed": 1000}
        batch, hmkd_opts = 4, {"fit_iters": 300}
    data = {"kind": "synthetic", "root": os.path.join(out_dir, "data"), "batch_size": batch, "eval_batch_size": 8,
            "synth": {"n_train": n_train, "n_val": n_val, "size": size, "seed": 0, "preset": "aitod"}}
    model = {"detector": "fcos", "backbone": "resnet18", "fpn_channels": fpn, "levels": ["P2", "P3", "P4", "P5", "P6"],
             "norm": "gn", "min_size": size, "max_size": size, "head_convs": convs, "backbone_weights": "pretrain"}
    train = {"iters": iters, "lr": 1e-3, "warmup_iters": max(2, iters // 10), "ckpt_period": 100,
             "log_period": max(1, iters // 20)}
    teacher_model = merge(model, {"backbone": "resnet34"})
    base = {"seed": 0, "device": "cpu", "data": data, "model": model, "train": train, "pretrain": pretrain,
            "eval": {"aitod": True}}
    teacher_ckpt = os.path.join(out_dir, "teacher", "model_final.pth")
    return {
        "teacher": merge(base, {"name": "demo_teacher", "model": teacher_model, "train": {"iters": 3 * iters}}),
        "student": merge(base, {"name": "demo_student"}),
        "hmkd": merge(base, {
            "name": "demo_hmkd",
            "teacher": merge(teacher_model, {"weights": teacher_ckpt}),
            "distill": {"method": "hmkd", "options": hmkd_opts},
        }),
    }


def table_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The table's numbers from a run's metrics (COCO's under ``bbox``, AI-TOD's under ``bbox.aitod``)."""
    bbox = metrics.get("bbox", metrics)
    aitod = bbox.get("aitod") or {}
    source = {"mAP": bbox.get("mAP"), "AP50": bbox.get("AP50"), **{k: aitod.get(k) for k in ("APvt", "APt", "APs", "APm")}}
    return {k: float("nan") if source.get(k) is None else float(source[k]) for k in METRICS}


def format_table(results: dict[str, dict[str, float]], teacher: str = "teacher", base: str = "student") -> str:
    """Markdown table: one row per model, gain over the plain student in brackets."""
    head = {"APvt": "APvt (<8²)", "APt": "APt (8²-16²)", "APs": "APs (16²-32²)", "APm": "APm (>=32²)"}
    lines = ["| model | " + " | ".join(head.get(k, k) for k in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in results.items():
        cells = []
        for k in METRICS:
            v = m.get(k, float("nan"))
            if v != v:  # nan: nothing of that size to score
                cells.append("-")
                continue
            cell = f"{v:.1f}"
            if name not in (teacher, base) and base in results:
                cell += f" ({v - results[base].get(k, 0.0):+.1f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark_spread(path: str | os.PathLike = BENCHMARK) -> dict[str, Any] | None:
    """The paper-regime benchmark's HMKD gain in mAP and its seed spread (the larger standard
    deviation over seeds of the no-KD and HMKD rows), or None when the file or the rows are missing."""
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        none, hmkd = res["methods"]["none"], res["methods"]["hmkd"]
        return {
            "file": str(path),
            "seeds": int(min(none["n"], hmkd["n"])),
            "gain": float(hmkd["mean"]["mAP"] - none["mean"]["mAP"]),
            "spread": float(max(none["std"]["mAP"], hmkd["std"]["mAP"])),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verdict(gain: float, bench: dict[str, Any] | None) -> str:
    """One sentence: is the demo's HMKD gain larger than the seed spread the benchmark measured?"""
    if bench is None:
        return (f"HMKD gain over the plain student: {gain:+.1f} mAP (one seed); no paper-regime benchmark "
                f"results found at {BENCHMARK} to set it against.")
    if bench["seeds"] < 2:
        return (f"HMKD gain over the plain student: {gain:+.1f} mAP (one seed); the benchmark has "
                f"{bench['seeds']} seed, so no seed spread to set it against.")
    larger = abs(gain) > bench["spread"]
    return (
        f"HMKD gain over the plain student: {gain:+.1f} mAP (one seed); the paper-regime benchmark "
        f"measured {bench['gain']:+.1f} mAP with a seed spread (std over {bench['seeds']} seeds) of "
        f"{bench['spread']:.1f}, so this gain is {'larger than' if larger else 'within'} the seed spread"
        + ("." if larger else ": it may be noise.")
    )


def small_object_images(dataset: Any, k: int, small_area: float = 32 * 32) -> list[str]:
    """Paths of the ``k`` validation images with the most small objects (area < ``small_area``)."""
    coco = dataset.coco
    counts = []
    for img_id, rec in coco.imgs.items():
        n = sum(1 for a in coco.imgToAnns.get(img_id, []) if a["bbox"][2] * a["bbox"][3] < small_area)
        counts.append((-n, img_id, os.path.join(dataset.images_dir, rec["file_name"])))
    return [p for _, _, p in sorted(counts)[:k]]


def onednn_isa() -> str | None:
    """The instruction set oneDNN dispatches its kernels to on this machine (its verbose header,
    e.g. "Intel AVX-512 with Intel DL Boost and bfloat16 support"), read from a child process
    that runs one convolution; None where it cannot tell."""
    code = ("import torch; x = torch.rand(2, 64, 32, 32); w = torch.rand(64, 64, 3, 3, requires_grad=True); "
            "torch.nn.functional.conv2d(x, w).sum().backward()")
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"onednn_verbose,.*?,cpu,isa:(.*)", out)
    return m.group(1).strip() if m else None


def machine_facts() -> dict[str, Any]:
    """What decides the demo's numbers on this machine besides the code: CPU, threads, versions
    (:func:`hmkd.utils.machine_info`), the CPU's instruction sets of :data:`CPU_FLAGS`, the
    kernels torch dispatches to (ATen's capability, oneDNN's ISA) and the variables of
    :data:`NUMERIC_ENV` that are set."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    info = machine_info()
    return {
        "cpu": info["cpu"],
        "cpus_usable": info["cpus_usable"],
        "torch_threads": info["torch_threads"],
        "torch": info["torch"],
        "torchvision": info["torchvision"],
        "python": info["python"],
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": onednn_isa(),
        "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ},
    }


def machine_line(facts: dict[str, Any]) -> str:
    """One line of :func:`machine_facts` for the printed results."""
    env = " ".join(f"{k}={v}" for k, v in facts["env"].items())
    return (f"machine: {facts['cpu']}, {facts['torch_threads']} threads, torch {facts['torch']}, "
            f"ATen {facts['aten_cpu_capability']}, oneDNN {facts['onednn_isa'] or 'unknown'}"
            + (f", {env}" if env else ""))


def draw_students(cfg: Config, weights: dict[str, str], out_dir: str) -> list[str]:
    """What the plain and HMKD students find, side by side after the ground truth, on the
    validation images with the most small objects: each object green where the panel's student
    finds it, red where it misses it, yellow where the HMKD student finds what the plain one
    misses (the first entry of ``weights`` is the plain student); counts in the titles."""
    from hmkd.data import build_data
    from hmkd.models.checkpoint_info import LabelMap
    from hmkd.models.specs import specs_from_config
    from hmkd.viz.detections import draw_detections, ground_truth_of

    dataset = build_data(cfg, train=False)
    images = small_object_images(dataset, PICTURE_IMAGES)
    n = int(dataset.num_classes)
    return draw_detections(
        specs_from_config(cfg, weights, num_classes=n), images, out_dir, num_classes=n,
        class_names=LabelMap.from_dataset(dataset).names, ground_truth=ground_truth_of(dataset, images),
        upscale=PICTURE_UPSCALE, score_thresh=PICTURE_SCORE_THRESH, show="found", text_px=PICTURE_TEXT_PX,
    )


def run_demo(out_dir: str = "runs/demo", quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the demo; writes ``out_dir/results.json``, ``out_dir/results.md`` and
    ``out_dir/detections/*.png`` and returns the results."""
    from hmkd.training import ensure_pretrained
    from hmkd.training import train

    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    settings = demo_settings(out_dir, quick)
    configs = {name: from_dict(Config, s, src=f"demo:{name}") for name, s in settings.items()}
    timings: dict[str, float] = {}
    for name in ("student", "teacher"):  # the stand-ins first, each timed on its own
        m = configs[name].model
        t0 = time.time()
        ensure_pretrained(configs[name], m, progress=progress)
        timings[f"stand-in {m.backbone}"] = round(time.time() - t0, 1)
    results: dict[str, dict[str, float]] = {}
    for name in ("teacher", "student", "hmkd"):
        t0 = time.time()
        metrics = train(configs[name], output_dir=os.path.join(out_dir, name), resume=False, progress=progress)
        timings[name] = round(time.time() - t0, 1)
        results[name] = table_metrics(metrics)
    t0 = time.time()
    weights = {name: os.path.join(out_dir, name, "model_final.pth") for name in ("student", "hmkd")}
    pictures = draw_students(configs["hmkd"], {"student (no-KD)": weights["student"], "student (HMKD)": weights["hmkd"]},
                             os.path.join(out_dir, "detections"))
    timings["picture"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - t_start, 1)
    table = format_table(results)
    gain = {k: results["hmkd"][k] - results["student"][k] for k in METRICS}
    bench = None if quick else benchmark_spread()
    summary = "--quick: a smoke run of every stage at tiny settings, not a measurement." if quick else verdict(
        gain["mAP"], bench)
    machine = machine_facts()
    out = {"quick": quick, "models": results, "hmkd_gain_over_student": gain, "benchmark": bench,
           "verdict": summary, "seconds": timings, "pictures": pictures, "table": table, "machine": machine}
    write_json(os.path.join(out_dir, "results.json"), out)
    write_text(os.path.join(out_dir, "results.md"), f"{table}\n\n{summary}\n\n{machine_line(machine)}\n")
    return out
