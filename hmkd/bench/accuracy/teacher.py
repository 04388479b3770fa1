"""The benchmark's teacher: a given checkpoint (evaluated once, the evaluation cached in
``out_dir/teacher_eval``) or one trained by the benchmark into ``out_dir/runs/teacher``."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from hmkd.bench.accuracy.runs import is_rank0, say, train_or_reuse
from hmkd.bench.accuracy.spec import run_spec, teacher_config
from hmkd.bench.accuracy.store import bbox_metrics, read_json, run_costs
from hmkd.config import Config, DistillConfig, to_dict
from hmkd.errors import CheckpointError, ConfigError
from hmkd.utils import json_safe, write_json

__all__ = ["obtain_teacher"]


def obtain_teacher(
    cfg: Config,
    out_dir: str,
    teacher: str | None,
    teacher_cfg: Config | None,
    teacher_iters: int | None,
    *,
    isolate: bool,
    progress: bool,
) -> dict[str, Any]:
    """Weights and metrics of the teacher: a given checkpoint (evaluated once) or one trained here."""
    from hmkd.engine.evaluation import evaluate

    weights = teacher or (cfg.teacher.weights if cfg.teacher is not None else None)
    if weights:
        src = "--teacher" if teacher else "teacher.weights"
        if not os.path.isfile(weights):
            raise ConfigError(f"{src} {weights}: file not found (train it first, or drop teacher.weights to let the benchmark train one)")
        if cfg.teacher is None:
            raise ConfigError("a teacher checkpoint needs the config's 'teacher' section (its model) to be built")
        ecfg = copy.deepcopy(cfg)
        ecfg.model = dataclasses.replace(cfg.teacher, weights=None)
        ecfg.teacher = None
        ecfg.distill = DistillConfig()
        st = os.stat(weights)
        source = {"weights": os.path.abspath(weights), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "model": run_spec(ecfg)["model"], "data": run_spec(ecfg)["data"]}
        eval_dir = os.path.join(out_dir, "teacher_eval")
        cached = read_json(os.path.join(eval_dir, "source.json"))
        metrics = read_json(os.path.join(eval_dir, "metrics.json")) if cached == json_safe(source) else None
        if metrics is None:
            say(progress, f"teacher: evaluating {weights}")
            metrics = evaluate(ecfg, weights=weights, out_dir=eval_dir, progress=progress)
            if is_rank0():
                write_json(os.path.join(eval_dir, "source.json"), source)
        else:
            say(progress, f"teacher: reusing the evaluation of {weights}")
        return {"source": "checkpoint", "weights": os.path.abspath(weights), "metrics": bbox_metrics(metrics),
                "config": to_dict(ecfg), "sec_per_iter": None, "peak_mem_mb": None, "iterations": None}
    tcfg = teacher_config(cfg, teacher_cfg, teacher_iters)
    run_dir = os.path.join(out_dir, "runs", "teacher")
    tcfg.output_dir = run_dir
    metrics, reused = train_or_reuse(tcfg, run_dir, isolate=isolate, progress=progress, what="teacher")
    final = os.path.join(run_dir, "model_final.pth")
    if not os.path.isfile(final):
        raise CheckpointError(f"{final}: the teacher run finished but its weights are missing")
    costs = run_costs(run_dir, metrics)
    return {"source": "trained", "weights": os.path.abspath(final), "metrics": bbox_metrics(metrics), "config": to_dict(tcfg),
            "reused": reused, "output_dir": run_dir, **costs}
