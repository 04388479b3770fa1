"""Loading weights from local files only: torchvision-format state dicts or hmkd checkpoints."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from hmkd.errors import CheckpointError


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model state dict inside ``path`` (an hmkd checkpoint's ``model`` entry, or a bare state dict)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected a dict of tensors or an hmkd checkpoint)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _fmt(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: nn.Module, path: str, *, prefix: str = "", strict: bool = True) -> None:
    """Load ``path`` into ``model`` (or its sub-module at ``prefix``), naming the keys that differ.

    A mismatch (another architecture, another class count) raises :class:`CheckpointError` with the
    missing, unexpected and wrongly-shaped keys. ``strict=False`` ignores unexpected keys only
    (e.g. the ``fc`` layer of an ImageNet classifier loaded into a backbone body).
    """
    target = model.get_submodule(prefix) if prefix else model
    sd = read_state_dict(path)
    own = target.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_fmt(shapes, 3)}")
    if problems:
        where = f" into {prefix}" if prefix else ""
        raise CheckpointError(f"{path}: does not fit {type(target).__name__}{where}; " + "; ".join(problems))
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
