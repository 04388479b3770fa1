"""Training logs: a JSON-lines file, optional TensorBoard, the loss-curve figure, peak memory, and
the console's step line and end-of-run summary.

``log.jsonl`` holds one JSON object per logged step::

    {"iteration": 20, "lr": 0.00099, "total": 3.1, "student.loss_classifier": 1.2, ...,
     "sec_per_iter": 0.41, "data_sec": 0.02, "peak_mem_mb": 812.5}

and evaluation records ``{"iteration": 200, "eval": {"bbox": {"mAP": ...}}}``. On resume the
records past the checkpoint's iteration (written by the interrupted run after its last checkpoint)
are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Any

import torch

from hmkd.errors import ConfigError
from hmkd.utils import json_safe, proc_status_kb, save_figure, write_text


LOSS_GROUPS: tuple[tuple[str, str], ...] = (
    ("student.", "detection"),
    ("distill.", "distillation"),
    ("aux.", "auxiliary"),
)
"""Prefixes of a step's loss terms and the name of their group (``metric.*`` are measurements)."""


def bar_wanted(progress: bool, stream: Any = None) -> bool:
    """Whether to draw a tqdm bar: asked for, and the stream (stderr) is a terminal. A redirected
    run gets plain log lines instead of one ``\r``-separated line."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(progress) and stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def format_duration(seconds: float | None) -> str:
    """``3725.2`` -> ``1:02:05``; ``None``/non-finite -> ``-``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def step_line(rec: dict[str, Any], *, total_iters: int, eta_sec: float | None) -> str:
    """One console line per logged step (detectron2's shape)::

        eta: 0:01:52  iter: 20/300  total: 3.121  detection: 2.903  distillation: 0.196  auxiliary: 0.022
        lr: 1.00e-03  time: 0.412  data_time: 0.020  max_mem: 812M

    ``rec`` is the ``log.jsonl`` record (window means of each term)."""
    parts = [f"eta: {format_duration(eta_sec)}", f"iter: {rec['iteration']}/{total_iters}"]
    total = rec.get("total")
    parts.append(f"total: {total:.4g}" if isinstance(total, (int, float)) else "total: -")
    for prefix, name in LOSS_GROUPS:
        vals = [v for k, v in rec.items() if k.startswith(prefix) and isinstance(v, (int, float))]
        if vals:
            parts.append(f"{name}: {sum(vals):.4g}")
    parts.append(f"lr: {rec['lr']:.3g}")
    parts.append(f"time: {rec['sec_per_iter']:.3f}")
    parts.append(f"data_time: {rec['data_sec']:.3f}")
    mem = rec.get("peak_mem_mb")
    if isinstance(mem, (int, float)) and math.isfinite(mem):
        parts.append(f"max_mem: {mem:.0f}M")
    return "  ".join(parts)


def config_changes(old: dict[str, Any], new: dict[str, Any], *, ignore: tuple[str, ...] = (),
                   prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value)]`` where two config dicts differ (missing = None)."""
    out = []
    for k in list(old) + [k for k in new if k not in old]:
        key = f"{prefix}{k}"
        if key in ignore:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and not key.endswith("options"):
            out.extend(config_changes(a, b, ignore=ignore, prefix=f"{key}."))
        elif isinstance(a, dict) and isinstance(b, dict):  # distill.options: name each option
            out.extend((f"{key}.{o}", a.get(o), b.get(o)) for o in list(a) + [o for o in b if o not in a]
                       if a.get(o) != b.get(o))
        elif a != b:
            out.append((key, a, b))
    return out


def _num(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def format_summary(result: dict[str, Any]) -> str:
    """The end-of-run summary :func:`hmkd.training.train` results print as (``hmkd train``):
    a table of the final metrics (``-`` where COCO has nothing to score), the best periodic
    evaluation, the time, and the output files."""
    keys = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
    t = result.get("timing") or {}
    n = result.get("iteration")
    method = result.get("method")
    lines = [
        f"finished: {n} iterations ({'no distillation' if method in (None, 'none') else method}) in "
        f"{format_duration(t.get('train_seconds'))} ({_num(t.get('sec_per_iter'), 3)} s/iter, "
        f"{_num(t.get('images_per_sec'))} images/s), evaluation {format_duration(t.get('eval_seconds'))}, "
        f"on {t.get('device', '?')}" + (f" x{t['world_size']}" if (t.get("world_size") or 1) > 1 else ""),
        "",
        "| | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for iou in ("bbox", "segm"):
        if isinstance(result.get(iou), dict):
            lines.append(f"| {iou} | " + " | ".join(_num(result[iou].get(k)) for k in keys) + " |")
    best = result.get("best") or {}
    outputs = result.get("outputs") or {}
    if best.get("iteration") is not None and "best" in outputs:
        lines += ["", f"best: bbox mAP {_num(best.get('mAP'))} at iteration {best['iteration']} ({outputs['best']})"]
    if outputs:
        lines += ["", f"outputs in {result.get('output_dir')}:"]
        for name in ("final", "best", "last", "metrics", "log", "loss_curve", "eval"):
            if name in outputs:
                lines.append(f"  {os.path.relpath(outputs[name], result.get('output_dir') or '.')}")
    return "\n".join(lines)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far (MiB): CUDA allocator peak on GPU; on CPU the process's resident-set
    high-water mark (``VmHWM``), or ``ru_maxrss`` where there is no /proc.

    Not ``ru_maxrss`` on Linux: a process started by another (a benchmark's child run) inherits
    its parent's peak RSS there, so every run of a 1.4 GB benchmark read at least 1.4 GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class JsonlLogger:
    """Appends records to ``path`` (flushed per record); ``truncate_after(it)`` on resume."""

    def __init__(self, path: str) -> None:
        self.path = path

    def truncate_after(self, iteration: int) -> None:
        """Drop records with ``iteration`` > ``iteration`` (left by a run that died after its checkpoint)."""
        if not os.path.isfile(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if int(rec.get("iteration", 0)) <= iteration:
                    keep.append(json.dumps(rec))
        write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
            f.flush()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a ``log.jsonl`` (torn lines skipped)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class TensorBoardLogger:
    """Scalars to TensorBoard; imported only when enabled, with a clear error if missing."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.tensorboard is true but the 'tensorboard' package is not installed "
                "(pip install tensorboard, or set train.tensorboard=false)"
            ) from None
        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, iteration: int, scalars: dict[str, float], prefix: str = "train/") -> None:
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(prefix + k, v, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_NOT_TERMS = {"iteration", "lr", "sec_per_iter", "data_sec", "peak_mem_mb", "eval", "eta_sec"}


def _panels(records: list[dict[str, Any]]) -> list[tuple[str, str, list[tuple[str, list, list]]]]:
    """``[(title, y label, [(label, xs, ys)])]`` of the loss-curve figure, empty panels left out."""
    steps = [r for r in records if "total" in r]

    def series(key: str, rows: list[dict[str, Any]] | None = None, get=None) -> tuple[list, list]:
        pts = []
        for r in rows if rows is not None else steps:
            v = get(r) if get else r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                pts.append((r["iteration"], v))
        return ([p[0] for p in pts], [p[1] for p in pts])

    terms: list[str] = []
    for r in steps:
        for k in r:
            if k not in _NOT_TERMS and k not in terms and isinstance(r[k], (int, float)):
                terms.append(k)
    panels = []
    present = [(p, name) for p, name in LOSS_GROUPS if any(t.startswith(p) for t in terms)]
    total = [("total", *series("total"))]
    if len(present) > 1:  # the total and each group's sum
        lines = total + [
            (name, *series("", get=lambda r, p=p: sum(v for k, v in r.items() if k.startswith(p)
                                                     and isinstance(v, (int, float)) and math.isfinite(v))
                          if any(k.startswith(p) for k in r) else None))
            for p, name in present
        ]
        panels.append(("total and its groups", "loss", lines))
    for p, name in present:
        lines = [(t[len(p):], *series(t)) for t in terms if t.startswith(p)]
        if len(present) == 1:
            lines = total + lines
        panels.append((f"{name} terms ({p}*)", "loss", lines))
    other = [t for t in terms if t != "total" and not any(t.startswith(p) for p, _ in LOSS_GROUPS)]
    if other:
        panels.append(("measurements", "value", [(t, *series(t)) for t in other]))
    panels.append(("learning rate", "lr", [("lr", *series("lr"))]))
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    if evals:
        lines = []
        for iou in ("bbox", "segm"):
            for k in ("mAP", "APs"):
                xs, ys = series("", evals, get=lambda r, iou=iou, k=k: (r["eval"].get(iou) or {}).get(k))
                if xs:
                    lines.append((f"{iou} {k}", xs, ys))
        if lines:
            panels.append(("evaluation", "AP (%)", lines))
    return [(t, y, [l for l in lines if l[1]]) for t, y, lines in panels if any(l[1] for l in lines)]


def plot_loss_curve(records: list[dict[str, Any]], path: str) -> str | None:
    """Plot the logged terms into ``path`` (PNG), one panel per group: the total and each group's
    sum (when there is more than one group), the detection terms (``student.*``), the
    distillation terms (``distill.*``), the auxiliary terms (``aux.*``), other measurements
    (``metric.*``), the learning rate, and the evaluations' mAP / APs when there are any. Each
    panel has its own legend beside it; a loss or lr panel spanning more than 20x is drawn on a
    log scale.

    Uses matplotlib's Agg canvas directly, so the global backend is left alone; the file is written
    atomically. Returns the path, or None if there is nothing to plot.
    """
    if not any("total" in r for r in records):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(records)
    fig = Figure(figsize=(10, 2.4 * len(panels) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    styles = ("-", "--", ":", "-.")
    for ax, (title, ylabel, lines) in zip(axes, panels):
        for i, (label, xs, ys) in enumerate(lines):
            ax.plot(xs, ys, label=label, color=f"C{i % 10}", linestyle=styles[(i // 10) % len(styles)],
                    linewidth=2.0 if label == "total" else 1.2, marker="." if len(xs) < 20 else None)
        values = [y for _, _, ys in lines for y in ys]
        if ylabel in ("loss", "lr") and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")  # terms of very different sizes, or a decaying lr
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    axes[-1].set_xlabel("iteration", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
