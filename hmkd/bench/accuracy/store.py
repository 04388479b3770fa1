"""What a benchmark run folder holds, read back: its recorded config, whether it finished, its
box metrics and its costs (from the trainer's ``metrics.json`` and ``log.jsonl``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hmkd.bench.accuracy.plan import AITOD_METRICS, METRICS
from hmkd.engine.logging_utils import read_jsonl

__all__ = ["ERROR_FILE", "SPEC_FILE", "WALL_FILE", "bbox_metrics", "finished_metrics", "read_json", "run_costs"]

#: the config a run folder was started with: ``{"spec": run_spec(cfg), "config": to_dict(cfg)}``
SPEC_FILE = "bench_run.json"
#: a run folder's wall time as the benchmark measured it, every start of the run summed
WALL_FILE = "bench_wall.json"
#: what a child process that failed or was stopped reports (see :mod:`hmkd.bench.accuracy.isolate`)
ERROR_FILE = "bench_error.json"


def read_json(path: str) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def finished_metrics(run_dir: str) -> dict[str, Any] | None:
    """The run's ``metrics.json`` when it says the run finished (with box metrics), else None."""
    m = read_json(os.path.join(run_dir, "metrics.json"))
    if isinstance(m, dict) and m.get("status") == "finished" and isinstance(m.get("bbox"), dict):
        return m
    return None


def run_costs(run_dir: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Seconds per iteration, train/eval seconds, throughput (``metrics["timing"]``) and the peak
    memory (the largest ``peak_mem_mb`` the run logged; a log that is missing or unreadable, none)."""
    timing = metrics.get("timing") or {}
    peak = None
    try:
        records = read_jsonl(os.path.join(run_dir, "log.jsonl"))  # torn lines skipped
    except OSError:
        records = []
    for rec in records:
        v = rec.get("peak_mem_mb")
        if isinstance(v, (int, float)):
            peak = v if peak is None else max(peak, v)
    wall = read_json(os.path.join(run_dir, WALL_FILE)) or {}
    return {
        "wall_seconds": wall.get("wall_seconds"),
        "sec_per_iter": timing.get("sec_per_iter"),
        "train_seconds": timing.get("train_seconds"),
        "eval_seconds": timing.get("eval_seconds"),
        "images_per_sec": timing.get("images_per_sec"),
        "peak_mem_mb": peak,
        "iterations": metrics.get("iteration"),
        "device": timing.get("device"),
    }


def bbox_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The six COCO box metrics and, where the run scored them, AI-TOD's (``aitod_AP``, ``aitod_APvt``
    ...; :data:`AITOD_METRICS`); None where COCOeval has none (e.g. APl without large objects)."""
    b = metrics.get("bbox") or {}
    aitod = b.get("aitod") or {}

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    out: dict[str, float | None] = {k: num(b.get(k)) for k in METRICS}
    if aitod:
        out.update({k: num(aitod.get(k[len("aitod_"):])) for k in AITOD_METRICS})
    return out
