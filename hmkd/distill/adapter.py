"""The student-to-teacher adapter every method puts on the student's FPN maps."""

from __future__ import annotations

from torch import nn

__all__ = ["make_adapter"]


def make_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """A 1x1 conv from the student's channel count to the teacher's (PyTorch's default init), or
    ``nn.Identity()`` when they are equal, so that the student's map can be compared with the
    teacher's cell by cell. Its parameters are trained with the student."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
