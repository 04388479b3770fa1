"""Training one benchmark run in a child process (``python -c ...``).

Why: ``peak_mem_mb`` on CPU is the process's peak RSS, which never decreases within a process, so
each run gets its own process to make the number its own (and no run inherits another's memory;
the child reads ``VmHWM``, not ``ru_maxrss``, which on Linux starts at the parent's peak).
The child reads the run's config from ``run_dir/bench_run.json`` and trains it with
:func:`hmkd.training.train`. It runs in its own session, so that a terminal's Ctrl-C reaches
only the benchmark, which passes it on as one SIGTERM: the child finishes its iteration, saves a
checkpoint and stops (a second signal is passed on as SIGINT). The child's error (type, message,
traceback) comes back through ``run_dir/bench_error.json`` and is raised again in the parent, as
the same class for hmkd's own errors.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import hmkd
from hmkd.bench.accuracy.store import ERROR_FILE, SPEC_FILE, read_json
from hmkd.config import Config, from_dict
from hmkd.errors import HMKDError
from hmkd.utils import write_json

__all__ = ["child_main", "train_isolated"]

_CHILD = (
    "import sys; from hmkd.bench.accuracy.isolate import child_main; "
    "sys.exit(child_main(sys.argv[1], sys.argv[2] == '1', sys.argv[3] == '1'))"
)


def child_main(run_dir: str, resume: bool, progress: bool) -> int:
    """Entry point of a child process: train the run described by ``run_dir/bench_run.json``."""
    import traceback

    try:  # die with the benchmark (Linux): the parent's death sends us SIGTERM (checkpoint, then stop)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from hmkd.training import TrainingInterrupted, train

    spec = read_json(os.path.join(run_dir, SPEC_FILE)) or {}
    try:
        cfg = from_dict(Config, spec["config"], src=os.path.join(run_dir, SPEC_FILE))
        train(cfg, output_dir=run_dir, resume=resume, progress=progress)
        return 0
    except TrainingInterrupted as e:
        write_json(os.path.join(run_dir, ERROR_FILE), {"type": "TrainingInterrupted", "message": str(e),
                                                          "iteration": e.iteration, "checkpoint": e.checkpoint})
        return 130
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        write_json(os.path.join(run_dir, ERROR_FILE), {
            "type": type(e).__name__, "module": type(e).__module__, "message": str(e),
            "traceback": traceback.format_exc(),
        })
        return 1


def train_isolated(cfg: Config, run_dir: str, resume: bool, progress: bool) -> None:
    """Train in a child process; re-raise its error here (same type for hmkd's own errors)."""
    from hmkd.training import TrainingInterrupted

    err_path = os.path.join(run_dir, ERROR_FILE)
    if os.path.exists(err_path):
        os.remove(err_path)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(hmkd.__file__)))  # the folder holding this hmkd
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", _CHILD, run_dir, "1" if resume else "0", "1" if progress else "0"]
    # own session: a terminal's Ctrl-C reaches only us, and we pass it on exactly once
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    signals_seen = []

    def forward(signum: int, frame: Any) -> None:
        signals_seen.append(signum)
        try:
            proc.send_signal(signal.SIGTERM if len(signals_seen) == 1 else signal.SIGINT)
        except ProcessLookupError:  # pragma: no cover - already gone
            pass

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, forward)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0:
        return
    err = read_json(err_path) or {}
    kind, msg = err.get("type"), err.get("message") or f"training exited with status {rc}"
    if kind == "TrainingInterrupted" or (signals_seen and not kind):
        it = int(err.get("iteration") or 0)
        stop = TrainingInterrupted(it, err.get("checkpoint"), run_dir)
        stop.args = (f"benchmark stopped: {run_dir} at iteration {it} (checkpoint saved); "
                     "run the same command again to continue",)
        raise stop
    import hmkd.errors as errors

    cls = getattr(errors, kind or "", None)
    if isinstance(cls, type) and issubclass(cls, HMKDError):
        raise cls(msg)
    detail = f"{kind}: {msg}" if kind else msg
    raise RuntimeError(f"{run_dir}: training failed ({detail}); see {err_path}" if kind else f"{run_dir}: {detail}")
