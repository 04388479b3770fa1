"""Checkpoint files: atomic writes, one-line errors on unreadable files, RNG state capture.

A training checkpoint is a dict (see :func:`hmkd.training.train`)::

    {"model": student state dict,            # a plain detector checkpoint: build_model(weights=path)
     "distiller": the method's own modules,   # adapters, GcBlocks, decoder ... (no student keys)
     "optimizer": ..., "extra_optimizers": {name: state}, "scheduler": ..., "extra_schedulers": {name: state},
     "scaler": ... | None,
     "iteration": int, "rng": [per-rank RNG states], "config": dict, "trainer": {...},
     "label_map": {"category_ids": [...], "names": [...]}}  # of labels 1..K; absent in older files

Files are written atomically (:func:`hmkd.utils.atomic_open` with ``durable=True``): the object is
saved to a temporary file ``.NAME.XXXX.tmp`` in the same directory, flushed and ``os.fsync``-ed,
then moved over the destination with ``os.replace`` (atomic on POSIX and Windows), and the
directory entry is synced where the OS allows it. A crash or a full disk mid-write leaves the
previous file untouched and no partial file under the final name; a process killed mid-write
leaves its temporary file, which :func:`partial_writes` finds (the trainer removes them on start).
Finished files get the mode an ordinary ``open()`` gives (``0o666`` less the umask).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from hmkd.errors import CheckpointError
from hmkd.models.weights import read_torch_file
from hmkd.utils import atomic_open

LAST = "last_checkpoint.pth"
BEST = "model_best.pth"
FINAL = "model_final.pth"


def save_checkpoint(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to ``path`` atomically and durably (:func:`hmkd.utils.atomic_open`: a
    temporary ``.NAME.XXXX.tmp`` beside it, flushed, fsync-ed, moved over ``path``)."""
    path = os.fspath(path)
    with atomic_open(path, "wb", durable=True) as f:
        torch.save(obj, f)
    return path


def partial_writes(directory: str, names: Iterable[str] = (LAST, BEST, FINAL)) -> list[str]:
    """Temporary files of writes of ``names`` (checkpoints by default) that never finished in
    ``directory``: ``.NAME.XXXX.tmp``, as :func:`hmkd.utils.atomic_open` names them, left by a
    process killed mid-write. Never complete, each as large as a checkpoint."""
    names = set(names)
    out = []
    for entry in os.scandir(directory):
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        base = entry.name[1:].rsplit(".", 2)[0]
        if base in names and entry.is_file():
            out.append(entry.path)
    return sorted(out)


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` if unreadable."""
    path = os.fspath(path)
    obj = read_torch_file(path, kind="checkpoint", map_location=map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an hmkd checkpoint (holds a {type(obj).__name__}, expected a dict)")
    return obj


def load_training_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Like :func:`load_checkpoint`, and check the entries ``resume`` needs are there."""
    ckpt = load_checkpoint(path, map_location)
    missing = [k for k in ("model", "optimizer", "scheduler", "iteration") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint (missing {', '.join(missing)}); a weights-only file cannot be resumed"
        )
    return ckpt


# -- random number generators -------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (when initialised) every CUDA generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when both sides have CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
