"""``hmkd bench accuracy``: the teacher once, then every row on every seed, then the tables and the
figure (see :mod:`hmkd.bench.accuracy` for what it does as a whole)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from typing import Any, Sequence

from hmkd.bench.accuracy.plan import ABLATIONS, plan_runs, seed_list
from hmkd.bench.accuracy.plot import plot_results
from hmkd.bench.accuracy.runs import is_rank0, say, train_or_reuse
from hmkd.bench.accuracy.spec import run_config
from hmkd.bench.accuracy.store import bbox_metrics, read_json, run_costs
from hmkd.bench.accuracy.summary import summarise
from hmkd.bench.accuracy.table import format_table, stage_lines
from hmkd.bench.accuracy.teacher import obtain_teacher
from hmkd.config import Config, to_dict
from hmkd.distill import needs_teacher
from hmkd.errors import ConfigError
from hmkd.utils import machine_info, write_json, write_text

logger = logging.getLogger(__name__)

__all__ = ["run_accuracy_bench"]


def run_accuracy_bench(
    cfg: Config,
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] = 2,
    out_dir: str = "runs/bench_accuracy",
    teacher: str | None = None,
    ablation: str | None = None,
    progress: bool = True,
    *,
    teacher_cfg: Config | None = None,
    teacher_iters: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    isolate: bool | None = None,
) -> dict[str, Any]:
    """Train and evaluate the teacher once and every method (or ablation variant) on every seed.

    Args:
        cfg: the student run (model, data, train) with a ``teacher`` section (the teacher's model;
            its ``weights``, when set, must exist and are used as the teacher).
        methods: methods to compare (default ``none fitnet fgd icd hmkd``); ``none`` is always run;
            ``none_init`` adds the no-KD row initialised from the teacher (``distill.init_student``,
            else ``neck_head``), which is also added when the config sets ``distill.init_student``
            to ``neck`` or ``neck_head`` (e.g. the override ``distill.init_student=neck_head``,
            which then applies to every distilled row).
        seeds: how many seeds (``cfg.seed``, ``cfg.seed + 1``, ...) or an explicit list.
        out_dir: everything goes here (``runs/<key>_s<seed>``, ``runs/teacher``, ``results.*``).
        teacher: a trained teacher checkpoint (``--teacher``); overrides ``cfg.teacher.weights``.
        ablation: one of :data:`ABLATIONS`: HMKD variants (plus no-KD) instead of the methods.
        progress: progress bars and one line per run on stderr.
        teacher_cfg: the config to train the teacher with when there is no checkpoint (e.g.
            ``configs/synth/bench_teacher.yaml``; its model must match ``cfg.teacher``); default:
            ``cfg`` with ``model := cfg.teacher`` and ``train.iters := teacher_iters``.
        teacher_iters: the teacher's iterations (default: ``teacher_cfg``'s, else 3 x
            ``cfg.train.iters``, the paper's 3x-vs-1x setting).
        method_options: extra options per method, e.g. ``{"icd": {"hidden": 128}}``.
        isolate: train each run in a child process (default: yes unless under torchrun).

    Returns:
        The content of ``results.json`` (``runs``, ``methods``, ``teacher``, ``machine`` ...) with
        ``table`` (the Markdown of ``results.md``) and ``files``.
    """
    if ablation is not None and ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r} (known: {', '.join(ABLATIONS)})")
    if isolate is None:
        isolate = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    ctx = None
    if not isolate:
        # join the process group once (torchrun): every train() below reuses it instead of creating
        # and destroying one per run, which a second init under torchrun does not survive
        from hmkd.engine import distributed as du

        ctx = du.init_distributed(cfg.device)
    try:
        return _run_bench(cfg, methods, seeds, out_dir, teacher, ablation, progress, teacher_cfg, teacher_iters,
                          method_options, isolate)
    finally:
        if ctx is not None:
            du.cleanup(ctx)


def _pretrain_stage(cfg: Config, train_teacher: bool, progress: bool) -> dict[str, Any]:
    """The pretrained stand-in (``backbone_weights: pretrain``) of the student's backbone and, when the
    benchmark trains the teacher, of the teacher's: made now or found in the cache, with the wall time
    its pretraining took and its detector's metrics on the pretraining set."""
    from hmkd.config import PRETRAIN_BACKBONE
    from hmkd.training import ensure_pretrained

    out: dict[str, Any] = {}
    sections = [("student", cfg.model)] + ([("teacher", cfg.teacher)] if train_teacher else [])
    for name, m in sections:
        if m.backbone_weights != PRETRAIN_BACKBONE:
            continue
        say(progress, f"pretrained stand-in of the {name}'s {m.backbone}")
        path = ensure_pretrained(cfg, m, progress=progress)
        info = read_json(os.path.join(os.path.dirname(path), "pretrain.json")) or {}
        out[name] = {"backbone": m.backbone, "weights": path, "wall_seconds": info.get("wall_seconds"),
                     "iterations": ((info.get("config") or {}).get("train") or {}).get("iters"),
                     "metrics": info.get("metrics")}
    return out


def _run_bench(
    cfg: Config,
    methods: Sequence[str] | None,
    seeds: int | Sequence[int],
    out_dir: str,
    teacher: str | None,
    ablation: str | None,
    progress: bool,
    teacher_cfg: Config | None,
    teacher_iters: int | None,
    method_options: dict[str, dict[str, Any]] | None,
    isolate: bool,
) -> dict[str, Any]:
    seeds_run = seed_list(cfg, seeds)
    variants = plan_runs(cfg, methods, ablation, method_options)
    out_dir = os.path.abspath(out_dir)
    if is_rank0():
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    # decoders fitted on the teacher (decoder_fit: auto) are cached with the benchmark's runs, unless
    # the user points HMKD_CACHE elsewhere; every run of this teacher reuses the one fit
    os.environ.setdefault("HMKD_CACHE", os.path.join(out_dir, "cache"))
    t_start = time.time()
    n_runs = len(variants) * len(seeds_run)
    say(progress, f"{len(variants)} rows x {len(seeds_run)} seeds = {n_runs} student runs -> {out_dir}")

    teacher_needed = any(needs_teacher(v.method) or v.init_student for v in variants)
    train_teacher = cfg.teacher is not None and not (teacher or cfg.teacher.weights)
    pretrained = _pretrain_stage(cfg, train_teacher, progress)
    tinfo = obtain_teacher(cfg, out_dir, teacher, teacher_cfg, teacher_iters, isolate=isolate, progress=progress) if (
        teacher_needed or teacher or teacher_cfg is not None or (cfg.teacher is not None)
    ) else None
    teacher_weights = tinfo["weights"] if tinfo else None

    runs: dict[str, dict[str, Any]] = {}
    i = 0
    for seed in seeds_run:  # seed-major: a stopped benchmark has complete seeds first
        for v in variants:
            i += 1
            name = f"{v.key}_s{seed}"
            run_dir = os.path.join(out_dir, "runs", name)
            rc = run_config(cfg, v, seed, teacher_weights, run_dir)
            metrics, reused = train_or_reuse(rc, run_dir, isolate=isolate, progress=progress,
                                             what=f"[{i}/{n_runs}] {v.label} seed {seed}")
            runs[name] = {"key": v.key, "method": v.method, "label": v.label, "seed": seed, "output_dir": run_dir,
                          "options": v.options, "bbox": bbox_metrics(metrics), "reused": reused,
                          **run_costs(run_dir, metrics)}

    rows = summarise(variants, runs, tinfo["metrics"] if tinfo else None)
    table = format_table(rows, tinfo, seeds_run)
    stem = "results" if ablation is None else f"results_{ablation}"
    files = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    title = ("accuracy benchmark" if ablation is None else f"ablation: {ablation}") + f" ({len(seeds_run)} seed(s))"
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "ablation": ablation,
        "ablation_description": ABLATIONS.get(ablation) if ablation else None,
        "seeds": seeds_run,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "config": to_dict(cfg),
        "teacher": tinfo,
        "pretrained": pretrained,
        "runs": runs,
        "methods": rows,
        "machine": machine_info(),
        "wall_seconds_this_call": time.time() - t_start,
        "table": table,
        "files": files,
    }
    if is_rank0():
        write_json(files["json"], result)
        write_text(files["md"], f"# {title}\n\n{table}\n\n{stage_lines(result)}\n")
        try:
            plot_results(rows, tinfo, files["png"], title)
        except Exception as e:  # a figure is not worth failing a finished benchmark
            logger.warning("could not draw %s: %s", files["png"], e)
    return result
