"""``hmkd demo``: the whole story on the embedded default, on CPU.

synthetic data set -> ResNet-50 teacher -> plain ResNet-18 student -> HMKD ResNet-18 student ->
COCO evaluation of all three -> a table with APs and the gain. ``--quick`` does the same with tiny
settings (a smoke run of every stage, not a measurement). Everything goes under ``out_dir``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hmkd.config import Config, from_dict, merge
from hmkd.utils import write_json, write_text

METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


def demo_settings(out_dir: str, quick: bool) -> dict[str, dict[str, Any]]:
    """The three runs' configs (as dicts). Mirrors configs/synth/*.yaml at demo size."""
    if quick:
        data = {"kind": "synthetic", "root": os.path.join(out_dir, "data"), "batch_size": 2, "eval_batch_size": 4,
                "synth": {"n_train": 24, "n_val": 12, "size": 128, "seed": 0, "preset": "default"}}
        model = {"detector": "fcos", "backbone": "resnet18", "fpn_channels": 32, "levels": ["P2", "P3", "P4", "P5", "P6"],
                 "min_size": 128, "max_size": 128, "head_convs": 1}
        train = {"iters": 12, "lr": 1e-3, "warmup_iters": 2, "ckpt_period": 100, "log_period": 4}
        teacher_model = {"backbone": "resnet34", "fpn_channels": 64}
        teacher_iters = 24
        hmkd_opts: dict[str, Any] = {"hidden": 32, "heads": 4, "fit_iters": 6}
    else:
        data = {"kind": "synthetic", "root": os.path.join(out_dir, "data"), "batch_size": 4, "eval_batch_size": 8,
                "synth": {"n_train": 600, "n_val": 100, "size": 256, "seed": 0, "preset": "default"}}
        model = {"detector": "fcos", "backbone": "resnet18", "fpn_channels": 128, "levels": ["P2", "P3", "P4", "P5", "P6"],
                 "min_size": 256, "max_size": 256, "head_convs": 2}
        train = {"iters": 200, "lr": 1e-3, "warmup_iters": 30, "ckpt_period": 100, "log_period": 10}
        teacher_model = {"backbone": "resnet50"}
        teacher_iters = 450
        hmkd_opts = {"hidden": 128, "heads": 8, "fit_iters": 300}
    base = {"seed": 0, "device": "cpu", "data": data, "model": model, "train": train}
    teacher_dir = os.path.join(out_dir, "teacher")
    return {
        "teacher": merge(base, {"name": "demo_teacher", "model": teacher_model, "train": {"iters": teacher_iters}}),
        "student": merge(base, {"name": "demo_student"}),
        "hmkd": merge(base, {
            "name": "demo_hmkd",
            "teacher": merge(model, {**teacher_model, "weights": os.path.join(teacher_dir, "model_final.pth")}),
            "distill": {"method": "hmkd", "options": hmkd_opts},
        }),
    }


def format_table(results: dict[str, dict[str, float]], teacher: str = "teacher", base: str = "student") -> str:
    """Markdown table: one row per model, gain over the plain student in brackets."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
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


def run_demo(out_dir: str = "runs/demo", quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the demo; writes ``out_dir/results.json`` and ``out_dir/results.md`` and returns them."""
    from hmkd.engine.trainer import train

    os.makedirs(out_dir, exist_ok=True)
    settings = demo_settings(out_dir, quick)
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for name in ("teacher", "student", "hmkd"):
        cfg = from_dict(Config, settings[name], src=f"demo:{name}")
        t0 = time.time()
        metrics = train(cfg, output_dir=os.path.join(out_dir, name), resume=False, progress=progress)
        timings[name] = round(time.time() - t0, 1)
        bbox = metrics.get("bbox", metrics)
        results[name] = {k: float("nan") if bbox[k] is None else float(bbox[k]) for k in METRICS}
    table = format_table(results)
    gain = {k: results["hmkd"][k] - results["student"][k] for k in METRICS}
    out = {"quick": quick, "models": results, "hmkd_gain_over_student": gain, "seconds": timings, "table": table}
    write_json(os.path.join(out_dir, "results.json"), out)
    write_text(os.path.join(out_dir, "results.md"), table + "\n")
    return out
