"""FGD baseline (Yang et al., CVPR 2022) as a distiller: focal + global distillation per FPN level."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hmkd.distill.base import Distiller, DistillInputs
from hmkd.distill.common import detector_kind, resolve_levels, stride_of
from hmkd.distill.fgd import FGDLoss
from hmkd.distill.registry import register
from hmkd.models.detectors import fpn_channels_of


@dataclass
class FGDOptions:
    """FGD's published preset for the student's detector family; any value set here overrides it.

    ``scale`` multiplies all four weights (FGD's weights assume COCO-sized maps with sum reduction;
    see the README on loss scale).
    """

    levels: list[str] | None = None
    temperature: float | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    lambda_: float | None = None
    scale: float = 1.0
    overlap: str = "max"


@register("fgd", "FGD: focal (fg/bg, attention-weighted) + global (GcBlock) distillation")
class FGDDistiller(Distiller):
    Options = FGDOptions
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, options: FGDOptions) -> None:
        super().__init__(student, teacher, options)
        assert self.teacher is not None
        self.levels = resolve_levels(options.levels, student, self.teacher, "levels")
        cs, ct = fpn_channels_of(student), fpn_channels_of(self.teacher)
        over = {k: getattr(options, k) for k in ("temperature", "alpha", "beta", "gamma", "lambda_")}
        over = {k: v for k, v in over.items() if v is not None}
        kind = detector_kind(student)
        self.losses = nn.ModuleDict(
            {l: FGDLoss.for_detector(kind, cs, ct, overlap=options.overlap, **over) for l in self.levels}
        )
        if options.scale != 1.0:
            for m in self.losses.values():
                for k in ("alpha", "beta", "gamma", "lambda_"):
                    setattr(m, k, getattr(m, k) * options.scale)

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        s, t = inputs.student.features, inputs.teacher_features
        out: dict[str, torch.Tensor] = {}
        for l in self.levels:
            for k, v in self.losses[l](s[l], t[l], inputs.boxes, stride_of(l)).items():
                out[f"distill.fgd_{k}_{l.lower()}"] = v
        return out
