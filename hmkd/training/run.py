"""A training run from a config: :func:`train`, and the pretrained stand-ins it makes on first use.

:func:`train` checks the config and the data (:meth:`Trainer.prepare`), turns every
``backbone_weights: pretrain`` into the stand-in's file (:func:`resolve_pretrained`; made now by a
training run of its own when the cache does not hold it, :func:`ensure_pretrained`), builds the run
(:meth:`Trainer.build`) and trains it (:meth:`Trainer.run`). The stand-in's settings, cache key and
folder are :mod:`hmkd.training.pretrain`'s; making it is a training run, so it lives here, beside
:func:`train`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any

import torch

from hmkd.config import Config, ModelConfig, check_config, to_dict
from hmkd.engine import distributed as du
from hmkd.errors import ConfigError
from hmkd.models.weights import read_state_dict
from hmkd.training.pretrain import PRETRAIN, cache_dir, pretrain_config, pretrain_key
from hmkd.training.trainer import Trainer, resolve_output_dir
from hmkd.utils import atomic_open, preserved_random_state, write_json

__all__ = ["ensure_pretrained", "resolve_pretrained", "train"]

logger = logging.getLogger(__name__)


def train(
    cfg: Config, *, output_dir: str | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train ``cfg.model`` with ``cfg.distill.method`` for ``cfg.train.iters`` iterations.

    Args:
        cfg: the run's config (teacher built from ``cfg.teacher``; its ``weights`` are required
            when the method needs a teacher or ``distill.init_student`` copies from it).
        output_dir: where everything is written (default ``cfg.output_dir`` or ``runs/<cfg.name>``).
        resume: continue from ``output_dir/last_checkpoint.pth`` (a :class:`CheckpointError` naming
            the path when there is none: a mistyped folder must not start from scratch unnoticed).
        progress: report progress (rank 0): a tqdm bar when stderr is a terminal, and in any case
            a log line every ``train.log_period`` iterations.

    Returns:
        The final metrics (also ``metrics.json``): ``{"bbox": {...}, ["segm": {...},] "best": {...},
        "timing": {...}, "iteration": N, "status": "finished", "output_dir": ...}``.

    Raises:
        ConfigError, DataError, CheckpointError: bad inputs (one-line messages).
        NonFiniteLossError: a loss term became NaN/inf (the last checkpoint is left intact).
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    check_config(cfg)
    ctx = du.init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, ctx, resolve_output_dir(cfg, output_dir), resume, progress)
        trainer.prepare()
        # backbone_weights: pretrain -> the stand-in's file (pretrained now if not cached; a resumed
        # student's weights come from its checkpoint)
        trainer.build(resolve_pretrained(cfg, student=not trainer.resuming, teacher=trainer.builds_teacher,
                                         progress=trainer.progress))
        return trainer.run()
    finally:
        du.cleanup(ctx)


def ensure_pretrained(cfg: Config, model: ModelConfig, *, progress: bool = True) -> str:
    """The stand-in's ``backbone.pth`` for ``model``'s backbone: from the cache, else trained now
    (resuming a stopped pretraining). Returns its path."""
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
