"""Train a benchmark run, or reuse it: a finished run of the same config is reused, a started one
(``last_checkpoint.pth``) continues, a run folder holding another config is an error (naming the
keys that differ), never silently reused or overwritten."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from hmkd.bench.accuracy.isolate import train_isolated
from hmkd.bench.accuracy.spec import run_spec, spec_diff, with_defaults
from hmkd.bench.accuracy.store import SPEC_FILE, WALL_FILE, finished_metrics, read_json
from hmkd.config import Config, to_dict
from hmkd.errors import ConfigError
from hmkd.utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["is_rank0", "say", "train_or_reuse"]


def is_rank0() -> bool:
    """Rank 0 of a torchrun launch, or the only process: the one that writes the files."""
    return int(os.environ.get("RANK", "0")) == 0


def say(progress: bool, msg: str) -> None:
    """One progress line on stderr (rank 0, with ``progress``), else a log record."""
    if progress and is_rank0():
        print(f"[bench] {msg}", file=sys.stderr, flush=True)
    else:
        logger.info(msg)


def train_or_reuse(
    cfg: Config, run_dir: str, *, isolate: bool, progress: bool, what: str
) -> tuple[dict[str, Any], bool]:
    """Train ``cfg`` into ``run_dir`` unless a finished run of the same config is there."""
    from hmkd.training import train

    spec_path = os.path.join(run_dir, SPEC_FILE)
    new_spec = run_spec(cfg)
    old = read_json(spec_path)
    done = finished_metrics(run_dir)
    started = os.path.isfile(os.path.join(run_dir, "last_checkpoint.pth"))
    if old is not None and (done or started):
        diff = spec_diff(with_defaults(old.get("spec")), new_spec)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run of another config ({'; '.join(diff[:3])}); "
                "use another --out or delete that folder"
            )
    if done:
        if old is None:
            logger.warning("%s: finished run without %s; reused as it is", run_dir, SPEC_FILE)
        say(progress, f"{what}: reusing {run_dir}")
        return done, True
    say(progress, f"{what}: {'resuming' if started else 'training'} -> {run_dir}")
    if is_rank0():
        os.makedirs(run_dir, exist_ok=True)
        write_json(spec_path, {"spec": new_spec, "config": to_dict(cfg)})
    t0 = time.time()
    try:
        if isolate:
            train_isolated(cfg, run_dir, started, progress)
            metrics = finished_metrics(run_dir)
            if metrics is None:
                raise RuntimeError(f"{run_dir}: training ended without a finished metrics.json")
        else:
            metrics = train(cfg, output_dir=run_dir, resume=started, progress=progress)
    finally:  # the wall time of every start of the run (process start, decoder fit, training, evaluation)
        if is_rank0():
            wall = read_json(os.path.join(run_dir, WALL_FILE)) or {"starts": []}
            wall["starts"].append({"began": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                                   "seconds": round(time.time() - t0, 1)})
            wall["wall_seconds"] = round(sum(s["seconds"] for s in wall["starts"]), 1)
            write_json(os.path.join(run_dir, WALL_FILE), wall)
    return metrics, False
