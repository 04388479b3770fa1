"""Optimisers, the iteration-based learning-rate schedule, and clipping and stepping optimisers
(:func:`clip_and_step`).

The schedule is a multiplier of the base learning rate, a pure function of the iteration ``i``
(0-based: the step about to be taken), as in detectron2's ``WarmupParamScheduler``:

    lr(i) = base_lr * warmup(i) * decay(i)

- ``warmup(i)`` rises linearly from ``warmup_factor`` at ``i = 0`` to 1 at ``i = warmup_iters``
  (torchvision's ``LinearLR`` reading: ``f + (1 - f) * i / warmup_iters``), 1 afterwards;
- ``decay(i)``: ``cosine`` = ``0.5 * (1 + cos(pi * i / iters))``; ``step`` = ``gamma ** k`` with
  ``k`` the number of ``steps`` milestones ``<= i``; ``constant`` = 1.

It is wrapped in a :class:`torch.optim.lr_scheduler.LambdaLR`, stepped once per iteration, so its
state (``last_epoch``) goes into checkpoints like any scheduler's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from hmkd.config import TrainConfig
from hmkd.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")


class WarmupSchedule:
    """The learning-rate multiplier ``warmup(i) * decay(i)`` (a picklable callable for ``LambdaLR``)."""

    def __init__(
        self,
        iters: int,
        schedule: str = "cosine",
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        steps: Iterable[int] = (),
        gamma: float = 0.1,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if iters < 0:
            raise ConfigError(f"train.iters must be >= 0, got {iters}")
        if warmup_iters < 0:
            raise ConfigError(f"train.warmup_iters must be >= 0, got {warmup_iters}")
        if not 0.0 <= warmup_factor <= 1.0:
            raise ConfigError(f"train.warmup_factor must be in [0, 1], got {warmup_factor}")
        steps = sorted(int(s) for s in steps)
        if schedule == "step" and not steps:
            raise ConfigError("train.steps must list at least one iteration when train.schedule is 'step'")
        if any(s <= 0 for s in steps):
            raise ConfigError(f"train.steps must be positive iterations, got {steps}")
        self.iters = int(iters)
        self.schedule = schedule
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.steps = steps
        self.gamma = float(gamma)

    def warmup(self, i: int) -> float:
        if i >= self.warmup_iters:
            return 1.0
        a = i / self.warmup_iters
        return self.warmup_factor * (1.0 - a) + a

    def decay(self, i: int) -> float:
        if self.schedule == "cosine":
            t = min(i, self.iters) / max(self.iters, 1)
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.schedule == "step":
            return self.gamma ** sum(1 for s in self.steps if s <= i)
        return 1.0

    def __call__(self, i: int) -> float:
        return self.warmup(i) * self.decay(i)


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW over ``params`` with ``cfg.lr``.

    The multi-tensor (``foreach``) implementations are used on every device: on CPU they take
    about two thirds of the time of the per-parameter loop that torch picks there by default.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters")
    if cfg.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {cfg.weight_decay}")
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")


def build_schedule(cfg: TrainConfig) -> WarmupSchedule:
    """The multiplier function a :class:`TrainConfig` describes."""
    return WarmupSchedule(
        cfg.iters,
        schedule=cfg.schedule,
        warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor,
        steps=cfg.steps,
        gamma=cfg.gamma,
    )


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` applying :func:`build_schedule` to ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, build_schedule(cfg))


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm to ``max_norm`` (None or <= 0: no clipping); returns the norm
    before clipping as a tensor (no device sync)."""
    params = [p for p in params if p.grad is not None]
    if not max_norm or max_norm <= 0 or not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter of ``optimizer``'s parameter groups, in order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def clip_and_step(
    steps: Iterable[tuple[torch.optim.Optimizer, Iterable[torch.Tensor], float | None]],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Step optimisers on the gradients they hold: ``steps`` are ``(optimizer, params, max_norm)``.

    With a ``GradScaler``, every optimiser's gradients are unscaled first; then each ``params``'
    gradients are clipped at its ``max_norm`` (:func:`clip_gradients`: None or <= 0, no clipping),
    all of them before any optimiser steps; then each optimiser steps, in order (``scaler.step``,
    then one ``scaler.update()``). Zeroing the gradients is the caller's, before backward or after
    this. The one clip-and-step of a training step (:func:`hmkd.training.step.train_step`), of the
    matching decoder's fit and of :meth:`hmkd.distill.base.Distiller.step_extra_optimizers`.
    """
    steps = list(steps)
    if scaler is not None:
        for opt, _, _ in steps:
            scaler.unscale_(opt)
    for _, params, max_norm in steps:
        clip_gradients(params, max_norm)
    if scaler is not None:
        for opt, _, _ in steps:
            scaler.step(opt)
        scaler.update()
    else:
        for opt, _, _ in steps:
            opt.step()
