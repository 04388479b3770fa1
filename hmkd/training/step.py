"""One training step: what :func:`hmkd.training.train` runs per iteration, and what
``hmkd bench cost`` times, so the benchmark measures exactly what training does.

    losses = distiller(images, targets, iteration)    # under fp16 autocast with amp (CUDA)
    total = sum(losses.values())                       # every term (but metric.*) and the total read back once
    a non-finite value stops here (all ranks together), before any parameter is touched
    zero the gradients, total.backward()               # scaled with a GradScaler
    all-reduce the gradients of sync_params            # the distiller's own, outside DDP
    unscale, clip, step the main optimiser and the extra optimisers that got a gradient, update the scaler

The learning-rate schedule is not stepped here (the trainer does it after the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from hmkd.distill.base import total_loss
from hmkd.engine import distributed as du
from hmkd.engine.optim import clip_and_step, optimizer_params
from hmkd.errors import ConfigError, NonFiniteLossError

__all__ = ["train_step"]


def _autocast(amp: bool, images: Sequence[torch.Tensor]) -> Any:
    if amp:
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    device_type = images[0].device.type if len(images) else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def _has_grad(opt: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for p in optimizer_params(opt))


def train_step(
    distiller: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    iteration: int,
    *,
    main_params: Sequence[torch.Tensor],
    clip_grad: float | None,
    extra_optimizers: Iterable[tuple[str, torch.optim.Optimizer, float | None]] = (),
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    ctx: du.DistContext | None = None,
    sync_params: Iterable[torch.Tensor] = (),
    clock: Callable[[str], Any] | None = None,
) -> dict[str, float]:
    """Run one optimisation step of ``distiller`` on a batch; returns the loss values.

    Args:
        distiller: called as ``distiller(images, targets, iteration)``; returns a flat dict of
            scalar loss tensors (the student's detection losses and the method's terms).
        optimizer: the main optimiser (over ``main_params``).
        images, targets: the batch, already on the device.
        iteration: the 0-based iteration (errors name it 1-based, as the logs count).
        main_params: the main optimiser's parameters, clipped together at ``clip_grad``
            (None or <= 0: no clipping).
        extra_optimizers: ``(name, optimiser, clip)`` of each of the method's own optimisers
            (``distiller.extra_optimizers()``); one whose parameters got no gradient this step is
            not unscaled, clipped or stepped (``GradScaler.step`` refuses an optimiser it saw no
            gradient of).
        scaler: a ``GradScaler`` (mixed precision): backward of the scaled total, unscale before
            clipping, ``scaler.step`` and ``scaler.update()``.
        amp: run the forward under ``torch.autocast("cuda", torch.float16)``.
        ctx: the process group; when distributed, a non-finite loss on any rank stops every rank
            and ``sync_params``' gradients are averaged over ranks. ``None``: a single process.
        sync_params: parameters outside DDP whose gradients are all-reduced after backward.
        clock: called as ``clock("forward")`` once the loss values are read back,
            ``clock("backward")`` after backward and the gradient all-reduce, and
            ``clock("optimizer")`` after the optimiser steps and ``scaler.update()``.

    Returns:
        ``{term: value, ..., "total": value}`` as Python floats, in the distiller's term order.

    Raises:
        ConfigError: the distiller returned no loss.
        NonFiniteLossError: a term (or the total) is NaN/inf here or on another rank; raised
            before any gradient or parameter is touched.
    """
    with _autocast(amp, images):
        losses = distiller(images, targets, iteration)
    if not losses:
        method = getattr(distiller, "name", type(distiller).__name__)
        raise ConfigError(f"method {method!r} returned no loss at iteration {iteration + 1}")
    names = [*losses, "total"]
    total = total_loss(losses)
    values = torch.stack([v.detach().float().reshape(()) for v in [*losses.values(), total]]).tolist()
    if clock is not None:
        clock("forward")
    bad = [(k, v) for k, v in zip(names, values) if not math.isfinite(v)]
    (nonfinite,) = du.all_reduce_flags(ctx, bool(bad)) if ctx is not None else (bool(bad),)
    if nonfinite:  # every rank stops together
        where = ", ".join(f"{k}={v}" for k, v in bad) or "a term on another rank"
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration + 1}: {where}; stopped before the update")

    extras = list(extra_optimizers)
    optimizer.zero_grad(set_to_none=True)
    for _, opt, _ in extras:
        opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
    else:
        total.backward()
    if ctx is not None:
        du.allreduce_gradients(ctx, sync_params)
    if clock is not None:
        clock("backward")

    stepped = [(opt, optimizer_params(opt), clip) for _, opt, clip in extras if _has_grad(opt)]
    clip_and_step([(optimizer, main_params, clip_grad), *stepped], scaler)  # unscale, clip, step, update
    if clock is not None:
        clock("optimizer")
    return dict(zip(names, values))
