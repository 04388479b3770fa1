"""FitNet hint loss (Romero et al., ICLR 2015) on one FPN level.

The student's map goes through a regressor (here a 1x1 conv adapter when the channel counts differ,
identity otherwise, as DESIGN "Baselines" asks) and is pulled towards the teacher's map by a mean
squared error. The teacher's map is a target only: no gradient ever reaches it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FitNetLoss"]


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
        self.adapter: nn.Module
        if student_channels != teacher_channels:
            self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.adapter = nn.Identity()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Loss for student map ``[B, Cs, H, W]`` and teacher map ``[B, Ct, H, W]``; a scalar."""
        s = self.adapter(student)
        if s.shape != teacher.shape:
            raise ValueError(
                f"FitNetLoss: adapted student shape {tuple(s.shape)} != teacher shape {tuple(teacher.shape)}"
            )
        return self.weight * F.mse_loss(s, teacher.detach().to(s.dtype), reduction="mean")
