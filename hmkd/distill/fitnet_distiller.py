"""FitNet baseline (Romero et al. 2015) as a distiller: adapter + MSE on FPN maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hmkd.distill.base import Distiller, DistillInputs
from hmkd.distill.common import resolve_levels
from hmkd.distill.fitnet import FitNetLoss
from hmkd.distill.registry import register
from hmkd.models.detectors import fpn_channels_of


@dataclass
class FitNetOptions:
    """``levels``: FPN levels to imitate (default: every level both have); ``weight`` on the mean MSE."""

    levels: list[str] | None = None
    weight: float = 1.0


@register("fitnet", "FitNet: 1x1 adapter + MSE between student and teacher FPN maps")
class FitNetDistiller(Distiller):
    Options = FitNetOptions
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, options: FitNetOptions) -> None:
        super().__init__(student, teacher, options)
        assert self.teacher is not None
        self.levels = resolve_levels(options.levels, student, self.teacher, "levels")
        cs, ct = fpn_channels_of(student), fpn_channels_of(self.teacher)
        self.losses = nn.ModuleDict({l: FitNetLoss(cs, ct, weight=options.weight) for l in self.levels})

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        s, t = inputs.student.features, inputs.teacher_features
        return {f"distill.fitnet_{l.lower()}": self.losses[l](s[l], t[l]) for l in self.levels}
