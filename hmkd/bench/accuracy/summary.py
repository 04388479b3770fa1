"""The benchmark's numbers per table row: mean and sample standard deviation (n - 1) over seeds,
the gain over no-KD (method mean - no-KD mean), the share of the teacher-student gap closed
((method - student) / (teacher - student) per metric, None where the teacher does not lead by more
than 1e-6), seconds per iteration and peak memory, and the cost against no-KD."""

from __future__ import annotations

import math
import statistics
from typing import Any

from hmkd.bench.accuracy.plan import AITOD_METRICS, METRICS, Variant

__all__ = ["summarise"]

_EPS = 1e-6


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def summarise(
    variants: list[Variant], runs: dict[str, dict[str, Any]], teacher_metrics: dict[str, float] | None
) -> dict[str, dict[str, Any]]:
    """Per row: mean/std over seeds, gain over no-KD, share of the teacher-student gap closed, cost."""
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        rs = [r for r in runs.values() if r["key"] == v.key]
        mean, std = {}, {}
        for k in METRICS + AITOD_METRICS:
            mean[k], std[k] = _mean_std([r["bbox"].get(k) for r in rs])
        if all(mean[k] is None for k in AITOD_METRICS):  # runs scored without AI-TOD's buckets
            for k in AITOD_METRICS:
                mean.pop(k), std.pop(k)
        sec, _ = _mean_std([r.get("sec_per_iter") for r in rs])
        mems = [r.get("peak_mem_mb") for r in rs if r.get("peak_mem_mb") is not None]
        iters = [r.get("iterations") for r in rs if r.get("iterations")]
        rows[v.key] = {"label": v.label, "method": v.method, "options": v.options, "seeds": [r["seed"] for r in rs],
                       "n": len(rs), "iterations": max(iters) if iters else None,
                       "mean": mean, "std": std, "sec_per_iter": sec,
                       "peak_mem_mb": max(mems) if mems else None}
    base = rows.get("none")
    for key, row in rows.items():
        gain, closed = {}, {}
        for k in METRICS + AITOD_METRICS:
            if k not in row["mean"]:
                continue
            m, s = row["mean"].get(k), (base["mean"].get(k) if base else None)
            gain[k] = (m - s) if m is not None and s is not None else None
            t = (teacher_metrics or {}).get(k)
            closed[k] = (m - s) / (t - s) if None not in (m, s, t) and t - s > _EPS else None
        row["gain"], row["gap_closed"] = gain, closed
        b_sec = base.get("sec_per_iter") if base else None
        row["cost_vs_none"] = row["sec_per_iter"] / b_sec if row["sec_per_iter"] and b_sec else None
    return rows
