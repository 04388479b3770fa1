"""The stand-in for ImageNet pretraining: a backbone trained once on another synthetic task.

The paper's students and teachers start from ImageNet-pretrained backbones; no such weights can be
downloaded here. ``model.backbone_weights: pretrain`` (or ``teacher.backbone_weights: pretrain``)
asks for the stand-in instead: the backbone is trained, as part of a detector of the run's own shape
(detector, FPN, levels, norm, input size), on a synthetic set with its own seed and six other classes
(the ``pretrain`` preset: hexagon, star, pentagon, crescent, hourglass, chevron; the evaluation sets
use disc, square, triangle, ring, cross, diamond), for ``pretrain.iters`` iterations. Only the
backbone body is kept, as ImageNet weights would be; the FPN and heads start fresh.

Deterministic (the run's seed is ``pretrain.seed``; the caller's random streams are left as they
were, so a run that makes the stand-in and one that finds it cached end with the same weights) and
cached once per setting:
``$HMKD_CACHE/backbones/<backbone>-<key>/`` holds ``backbone.pth`` (the body's state dict),
``pretrain.json`` (the settings, the pretraining detector's metrics on its own val split, the wall
time) and ``run/`` (the training run: a stopped pretraining resumes there). ``key`` hashes the
pretraining run's config without the keys that do not change its result (names, folders, device,
workers, logging). ``hmkd pretrain CONFIG`` does it ahead of time; ``hmkd train``/``distill`` and
``hmkd bench accuracy`` do it on first use.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any


from hmkd.config import PRETRAIN_BACKBONE as PRETRAIN
from hmkd.config import Config, DataConfig, DistillConfig, EvalConfig, ModelConfig, TrainConfig, to_dict
from hmkd.utils import cache_root

__all__ = ["PRETRAIN", "cache_dir", "pretrain_config", "pretrain_key"]

logger = logging.getLogger(__name__)

def cache_dir() -> str:
    """``$HMKD_CACHE/backbones`` (default ``~/.cache/hmkd/backbones``)."""
    return os.path.join(cache_root(), "backbones")


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:n]


def pretrain_config(cfg: Config, model: ModelConfig) -> Config:
    """The detector run that pretrains ``model.backbone``: ``model``'s shape, ``cfg.pretrain``'s data
    and schedule (AdamW with warm-up and cosine decay, flips), no distillation, no AI-TOD scoring."""
    p = cfg.pretrain
    synth = dataclasses.replace(p.synth)
    data_root = os.path.join(cache_root(), "pretrain_data", _digest(to_dict(synth)))
    return Config(
        name=f"pretrain-{model.backbone}",
        seed=p.seed,
        device=cfg.device,
        model=dataclasses.replace(model, weights=None, backbone_weights=None, num_classes=None),
        teacher=None,
        data=DataConfig(kind="synthetic", root=data_root, batch_size=p.batch_size,
                        eval_batch_size=cfg.data.eval_batch_size, workers=cfg.data.workers, hflip=True, synth=synth),
        train=TrainConfig(iters=p.iters, optimizer="adamw", lr=p.lr, weight_decay=1e-4,
                          warmup_iters=min(100, max(1, p.iters // 10)), schedule="cosine", clip_grad=10.0,
                          eval_period=0, ckpt_period=max(1, p.iters // 5), log_period=cfg.train.log_period),
        distill=DistillConfig(method="none"),
        eval=EvalConfig(aitod=False),
        pretrain=copy.deepcopy(p),
    )


def _non_default(d: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that differ from ``default`` (nested sections compared key by key)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            sub = _non_default(v, default[k])
            if sub:
                out[k] = sub
        elif k not in default or v != default[k]:
            out[k] = v
    return out


def pretrain_key(pcfg: Config) -> str:
    """The cache key of a pretraining run: its config without what does not change the result, and
    only where it differs from the config's defaults (so that a key added to the config later, at
    its default, keeps the key of a stand-in made before)."""
    d = to_dict(pcfg)
    for k in ("name", "output_dir", "device"):
        d.pop(k, None)
    for k in ("root", "workers", "eval_batch_size"):
        d["data"].pop(k, None)
    for k in ("log_period", "ckpt_period", "tensorboard"):
        d["train"].pop(k, None)
    return _digest(_non_default(d, to_dict(Config(teacher=ModelConfig()))))
