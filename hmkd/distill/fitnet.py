"""FitNet baseline (Romero et al., ICLR 2015): hint loss on FPN levels, as a distiller.

On each distilled level the student's map goes through a regressor (here the 1x1 conv adapter
all methods share, :func:`~hmkd.distill.adapter.make_adapter`; our choice: identity when the
channel counts agree, since the maps then already align cell by cell) and is pulled towards the
teacher's map by a mean squared error. The teacher's map is a target only: no gradient ever reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmkd.distill.adapter import make_adapter
from hmkd.distill.base import DistillInputs, Distiller
from hmkd.allowed import allowed
from hmkd.distill.options import MethodOptions, levels_option
from hmkd.distill.registry import register

__all__ = ["FitNetDistiller", "FitNetLoss", "FitNetOptions"]


@dataclass
class FitNetOptions(MethodOptions):
    """``levels``: FPN levels to imitate (default: every level both have); ``weight`` on the mean MSE."""

    levels: list[str] | None = levels_option()
    weight: float = allowed(1.0, ge=0)


class FitNetLoss(nn.Module):
    """``weight * mean((adapter(S) - T)^2)`` over all elements of one feature level.

    Args:
        student_channels: channels of the student's map ``S``.
        teacher_channels: channels of the teacher's map ``T``.
        weight: multiplier of the loss.
    """

    def __init__(self, student_channels: int, teacher_channels: int, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.adapter = make_adapter(student_channels, teacher_channels)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Loss for student map ``[B, Cs, H, W]`` and teacher map ``[B, Ct, H, W]``; a scalar."""
        s = self.adapter(student)
        if s.shape != teacher.shape:
            raise ValueError(
                f"FitNetLoss: adapted student shape {tuple(s.shape)} != teacher shape {tuple(teacher.shape)}"
            )
        return self.weight * F.mse_loss(s, teacher.detach().to(s.dtype), reduction="mean")


@register("fitnet", "FitNet: 1x1 adapter + MSE between student and teacher FPN maps")
class FitNetDistiller(Distiller):
    """``distill.fitnet_pN``: a :class:`FitNetLoss` on each distilled level."""

    Options = FitNetOptions
    needs_teacher = True

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: FitNetOptions | None = None) -> None:
        super().__init__(student=student, teacher=teacher, options=options)
        o = self.options
        self.levels = self.resolve_levels(o.levels)
        cs, ct = self.student_channels, self.teacher_channels
        self.losses = nn.ModuleDict({l: FitNetLoss(cs, ct, weight=o.weight) for l in self.levels})

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        s, t = inputs.student.features, inputs.teacher_features
        return {f"distill.fitnet_{l.lower()}": self.losses[l](s[l], t[l]) for l in self.levels}
