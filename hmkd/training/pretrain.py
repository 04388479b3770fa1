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
import time
from typing import Any

import torch

from hmkd.config import PRETRAIN_BACKBONE as PRETRAIN
from hmkd.config import Config, DataConfig, DistillConfig, EvalConfig, ModelConfig, TrainConfig, to_dict
from hmkd.errors import ConfigError
from hmkd.models.weights import read_state_dict
from hmkd.utils import atomic_open, cache_root, preserved_random_state, write_json

__all__ = ["PRETRAIN", "cache_dir", "ensure_pretrained", "pretrain_config", "pretrain_key", "resolve_pretrained"]

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


def ensure_pretrained(cfg: Config, model: ModelConfig, *, progress: bool = True) -> str:
    """The stand-in's ``backbone.pth`` for ``model``'s backbone: from the cache, else trained now
    (resuming a stopped pretraining). Returns its path."""
    from hmkd.engine import distributed as du
    from hmkd.training.trainer import train

    pcfg = pretrain_config(cfg, model)
    folder = os.path.join(cache_dir(), f"{model.backbone}-{pretrain_key(pcfg)}")
    weights = os.path.join(folder, "backbone.pth")
    if os.path.isfile(weights):
        return weights
    if du.env_world_size() > 1:
        raise ConfigError(
            f"{model.backbone}: the pretrained stand-in (backbone_weights: {PRETRAIN}) is not in {cache_dir()}; "
            "make it once without torchrun first: hmkd pretrain CONFIG"
        )
    run_dir = os.path.join(folder, "run")
    logger.info("pretraining the %s stand-in (%d iterations on the %r synthetic set, seed %d) -> %s",
                model.backbone, pcfg.train.iters, pcfg.data.synth.preset, pcfg.seed, folder)
    t0 = time.time()
    # the pretraining seeds itself (pcfg.seed): it is the same whoever asks for it, and it leaves the
    # caller's random streams as they were, so a run that makes the stand-in goes on exactly as one
    # that found it in the cache
    with preserved_random_state():
        metrics = train(pcfg, output_dir=run_dir, resume=os.path.isfile(os.path.join(run_dir, "last_checkpoint.pth")),
                        progress=progress)
    sd = read_state_dict(os.path.join(run_dir, "model_final.pth"))
    body = {k[len("backbone.body."):]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    if not body:
        raise RuntimeError(f"{run_dir}/model_final.pth holds no backbone.body weights")
    with atomic_open(weights, "wb") as f:
        torch.save(body, f)
    bbox = metrics.get("bbox") or {}
    write_json(os.path.join(folder, "pretrain.json"), {
        "backbone": model.backbone, "config": to_dict(pcfg),
        "metrics": {k: v for k, v in bbox.items() if k != "per_class"},
        "wall_seconds": time.time() - t0, "timing": metrics.get("timing"),
    })
    logger.info("%s stand-in: mAP %.1f on its own val split; %s", model.backbone, bbox.get("mAP", float("nan")), weights)
    return weights


def resolve_pretrained(cfg: Config, *, student: bool = True, teacher: bool = True, progress: bool = True) -> Config:
    """A copy of ``cfg`` whose ``backbone_weights: pretrain`` are the stand-in's files (made now if
    not cached), or None where they would be replaced anyway: the student's with ``student=False``
    (e.g. on resume), the teacher's when it has ``weights`` of its own or ``teacher=False``."""
    out = copy.deepcopy(cfg)
    if out.model.backbone_weights == PRETRAIN:
        path = ensure_pretrained(cfg, cfg.model, progress=progress) if student else None
        out.model = dataclasses.replace(out.model, backbone_weights=path)
    if out.teacher is not None and out.teacher.backbone_weights == PRETRAIN:
        path = ensure_pretrained(cfg, cfg.teacher, progress=progress) if teacher and not out.teacher.weights else None
        out.teacher = dataclasses.replace(out.teacher, backbone_weights=path)
    return out
