"""Training logs: a JSON-lines file, optional TensorBoard, the loss-curve figure, peak memory.

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
from hmkd.utils import json_safe, save_figure, write_text


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, the process's max RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
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


def plot_loss_curve(records: list[dict[str, Any]], path: str) -> str | None:
    """Plot every logged loss term (and the total) against the iteration into ``path`` (PNG).

    Uses matplotlib's Agg canvas directly, so the global backend is left alone; the file is written
    atomically. Returns the path, or None if there is nothing to plot.
    """
    steps = [r for r in records if "total" in r]
    if not steps:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    terms: list[str] = []
    for r in steps:
        for k in r:
            if k not in _NOT_TERMS and k not in terms and isinstance(r[k], (int, float)):
                terms.append(k)
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k in terms:
        pts = [(r["iteration"], r[k]) for r in steps if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, linewidth=2.0 if k == "total" else 1.0, marker="." if len(xs) < 20 else None)
    positive = all(
        r[k] > 0 for r in steps for k in terms if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
    )
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)
