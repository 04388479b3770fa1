"""The matching decoder's own optimiser and learning-rate schedule (a decoder method's
``make_extra_optimizers`` / ``make_extra_schedulers``), from its :class:`~hmkd.distill.matching.options.DecoderOptions`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hmkd.distill.matching.options import DecoderOptions

__all__ = ["decoder_optimizers", "decoder_schedulers"]


def decoder_optimizers(
    groups: dict[str, nn.Module | Sequence[nn.Module]], options: DecoderOptions
) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
    """``(name, AdamW, clip)``: one optimiser per entry of ``groups``, over all its modules' parameters
    (clipped jointly at ``decoder_clip``); what a decoder method returns from ``make_extra_optimizers``."""
    o = options
    out = []
    for name, mods in groups.items():
        mods = [mods] if isinstance(mods, nn.Module) else list(mods)
        params = [p for m in mods for p in m.parameters()]
        out.append((name, torch.optim.AdamW(params, lr=o.decoder_lr, weight_decay=o.decoder_weight_decay), o.decoder_clip))
    return out


def decoder_schedulers(
    optimizers: Sequence[tuple[str, torch.optim.Optimizer, float | None]], options: DecoderOptions, total_iters: int
) -> list[tuple[str, torch.optim.lr_scheduler.LRScheduler]]:
    """``(name, LambdaLR)`` per decoder optimiser: ``decoder_schedule`` over ``total_iters``
    (``cosine``: ``0.5 (1 + cos(pi i / total_iters))``, no warm-up, as ICD's ``WarmupCosineLR``
    with its 10 warm-up iterations at factor 1; ``constant``: 1); stepped once per iteration."""
    from hmkd.engine.optim import WarmupSchedule  # the trainer's own multiplier (picklable)

    return [
        (name, torch.optim.lr_scheduler.LambdaLR(opt, WarmupSchedule(total_iters, schedule=options.decoder_schedule)))
        for name, opt, _ in optimizers
    ]
