"""FGD baseline: Focal and Global Knowledge Distillation (Yang et al., CVPR 2022), as a distiller.

:class:`FGDLoss` is FGD on one FPN level; :class:`FGDDistiller` applies it to each distilled level
with FGD's published weights for the student's detector family (:data:`FGD_PRESETS`).

For teacher map ``T`` and (adapted) student map ``S`` of shape ``[B, C, H, W]``:

* attention (temperature ``t``), from a map ``F``::

      A_S(F) = H*W * softmax_{hw}( mean_c |F| / t )        # [B, H, W]
      A_C(F) = C   * softmax_c  ( mean_hw |F| / t )        # [B, C]

* focal (feature) loss, with the binary foreground mask ``M`` and the scale mask ``K`` of
  :func:`hmkd.distill.masks.fg_bg_masks` (``K = 1/(H_g W_g)`` on objects, ``1/N_bg`` on background)::

      fg = alpha * sum( M     * K * A_S(T) * A_C(T) * (T - S)^2 ) / B
      bg = beta  * sum( (1-M) * K * A_S(T) * A_C(T) * (T - S)^2 ) / B

* attention loss (L1 between teacher and student attentions)::

      attention = gamma * ( sum|A_S(T) - A_S(S)| + sum|A_C(T) - A_C(S)| ) / B

* global loss, with two separate GcBlocks ``f'_s`` (student side) and ``f'_t`` (teacher side)::

      global = lambda * sum( (f'_s(S) - f'_t(T))^2 ) / B

Sums run over every element; ``/B`` is FGD's division by the batch size. The teacher map never
receives a gradient (it is detached); the adapter, the student map and both GcBlocks do.

Defaults are FGD's official two-stage configuration (``configs/distillers/fgd/
fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py`` in yzd-v/FGD, also used for
its Mask R-CNN config): ``temp=0.5, alpha_fgd=5e-5, beta_fgd=2.5e-5, gamma_fgd=5e-5,
lambda_fgd=5e-7``. :data:`FGD_PRESETS` also holds its RetinaNet and FCOS configurations.

Choices where FGD's paper and code leave room:

* Boxes are projected with :func:`hmkd.distill.masks.project_boxes` (cells overlapped, stride based,
  centre cell for sub-cell boxes); FGD's code scales by the unpadded image size and takes
  ``floor..ceil`` inclusive, one cell wider.
* Overlapping boxes: FGD keeps the *smallest* box's ``1/(H_g W_g)`` (``overlap="max"``, default
  here); HMKD's paper keeps the minimum (``overlap="min"``). The option switches between them.
* GcBlock init follows FGD (``gc_init="fgd"``): the context 1x1 conv Kaiming-normal (fan_in), the
  last conv of the transform zero, so each block starts as the identity; ``"default"`` keeps
  PyTorch's init (as :class:`~hmkd.distill.gcblock.GcBlock` builds it, and as HMKD uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hmkd.distill.adapter import make_adapter
from hmkd.distill.base import DistillInputs, Distiller
from hmkd.distill.common import detector_kind, stride_of
from hmkd.distill.gcblock import GcBlock
from hmkd.distill.masks import fg_bg_masks
from hmkd.distill.options import MethodOptions
from hmkd.distill.registry import register

__all__ = ["FGDDistiller", "FGDLoss", "FGDOptions", "FGD_PRESETS", "fgd_attention"]

#: FGD's published hyper-parameters per detector family (yzd-v/FGD configs/distillers/fgd/*.py).
FGD_PRESETS: dict[str, dict[str, float]] = {
    # faster_rcnn_r101 -> r50 and mask_rcnn_r101 -> r50 configs
    "two_stage": {"temperature": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda_": 5e-7},
    # retina_r101 -> r50 config
    "retinanet": {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6},
    # fcos_r101 -> r50 config
    "fcos": {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda_": 8e-6},
}
_DETECTOR_PRESET = {
    "faster_rcnn": "two_stage",
    "mask_rcnn": "two_stage",
    "two_stage": "two_stage",
    "retinanet": "retinanet",
    "fcos": "fcos",
}


def fgd_attention(feat: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of a map ``feat`` ``[B, C, H, W]``.

    Returns:
        ``(A_S, A_C)``: ``A_S = H*W*softmax_hw(mean_c|F|/t)`` as ``[B, H, W]`` and
        ``A_C = C*softmax_c(mean_hw|F|/t)`` as ``[B, C]``.
    """
    b, c, h, w = feat.shape
    value = feat.abs()
    spatial = (value.mean(dim=1).reshape(b, h * w) / temperature).softmax(dim=1)
    channel = (value.mean(dim=(2, 3)) / temperature).softmax(dim=1)
    return (h * w) * spatial.reshape(b, h, w), c * channel


@dataclass
class FGDOptions(MethodOptions):
    """FGD's published preset for the student's detector family; any value set here overrides it.

    ``scale`` multiplies all four weights (FGD's weights assume COCO-sized maps with sum reduction;
    see the README on loss scale). ``overlap``: ``max`` (FGD) or ``min`` (HMKD's rule).
    """

    levels: list[str] | None = None
    temperature: float | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    lambda_: float | None = None
    scale: float = 1.0
    overlap: str = "max"

    def check(self) -> None:
        super().check()
        self._levels("levels")
        self._positive("temperature")
        self._nonnegative("alpha", "beta", "gamma", "lambda_", "scale")
        self._choice("overlap", ("max", "min"))


class FGDLoss(nn.Module):
    """FGD on one FPN level: focal (fg / bg), attention and global losses, each already weighted.

    Args:
        student_channels: channels of the student's map (a 1x1 conv adapter maps them to the
            teacher's when they differ; identity otherwise).
        teacher_channels: channels of the teacher's map.
        temperature: FGD ``temp`` of the attention softmax (official two-stage config: 0.5).
        alpha: weight of the foreground feature loss (``alpha_fgd``, two-stage config: 5e-5).
        beta: weight of the background feature loss (``beta_fgd``, two-stage config: 2.5e-5).
        gamma: weight of the attention loss (``gamma_fgd``, two-stage config: 5e-5).
        lambda_: weight of the global loss (``lambda_fgd``, two-stage config: 5e-7).
        gc_ratio: bottleneck ratio of the two GcBlocks (FGD: C -> C/2).
        overlap: scale-mask rule where boxes overlap: ``"max"`` (FGD: smallest box wins, default)
            or ``"min"`` (HMKD paper Sec. 3.2.1); see :func:`hmkd.distill.masks.fg_bg_masks`.
        gc_init: ``"fgd"`` (FGD's init: context conv Kaiming-normal fan_in with zero bias, last
            transform conv zero) or ``"default"`` (PyTorch's / GcBlock's own init).

    Use :meth:`for_detector` for the published preset of another detector family.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        temperature: float = 0.5,
        alpha: float = 5e-5,
        beta: float = 2.5e-5,
        gamma: float = 5e-5,
        lambda_: float = 5e-7,
        gc_ratio: float = 0.5,
        overlap: Literal["min", "max"] = "max",
        gc_init: Literal["fgd", "default"] = "fgd",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"FGDLoss: temperature must be > 0, got {temperature}")
        if overlap not in ("min", "max"):
            raise ValueError(f"FGDLoss: overlap must be 'min' or 'max', got {overlap!r}")
        if gc_init not in ("fgd", "default"):
            raise ValueError(f"FGDLoss: gc_init must be 'fgd' or 'default', got {gc_init!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)
        self.overlap = overlap
        self.adapter = make_adapter(student_channels, teacher_channels)
        self.gc_student = GcBlock(teacher_channels, ratio=gc_ratio)
        self.gc_teacher = GcBlock(teacher_channels, ratio=gc_ratio)
        if gc_init == "fgd":
            # FGD's code: the context conv Kaiming-normal, the last conv zero, so that each block
            # starts as the identity and the global loss as the plain squared difference
            for block in (self.gc_student, self.gc_teacher):
                nn.init.kaiming_normal_(block.conv_mask.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(block.conv_mask.bias)
                nn.init.zeros_(block.conv_v2.weight)
                nn.init.zeros_(block.conv_v2.bias)

    @classmethod
    def for_detector(
        cls, detector: str, student_channels: int, teacher_channels: int, **overrides: object
    ) -> FGDLoss:
        """Build with FGD's published preset for ``detector``.

        ``detector`` is one of ``faster_rcnn``, ``mask_rcnn``, ``two_stage``, ``retinanet``,
        ``fcos``; ``overrides`` replace single keyword arguments.
        """
        key = _DETECTOR_PRESET.get(detector)
        if key is None:
            raise ValueError(
                f"FGDLoss.for_detector: unknown detector {detector!r}; "
                f"expected one of {sorted(_DETECTOR_PRESET)}"
            )
        kwargs: dict[str, object] = dict(FGD_PRESETS[key])
        kwargs.update(overrides)
        return cls(student_channels, teacher_channels, **kwargs)  # type: ignore[arg-type]

    def forward(
        self, student: Tensor, teacher: Tensor, boxes: Sequence[Tensor], stride: int
    ) -> dict[str, Tensor]:
        """FGD losses for one level.

        Args:
            student: student map ``[B, Cs, H, W]``.
            teacher: teacher map ``[B, Ct, H, W]`` (detached here; it never gets a gradient).
            boxes: per image ``[N_b, 4]`` xyxy boxes in input-frame pixels (``N_b`` may be 0).
            stride: the level's stride in pixels.

        Returns:
            ``{"fg", "bg", "attention", "global"}``: scalar tensors, already multiplied by
            alpha, beta, gamma and lambda respectively.
        """
        s = self.adapter(student)
        t = teacher.detach().to(s.dtype)
        if s.shape != t.shape:
            raise ValueError(
                f"FGDLoss: adapted student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}"
            )
        if len(boxes) != s.shape[0]:
            raise ValueError(f"FGDLoss: {len(boxes)} box tensors for a batch of {s.shape[0]} maps")
        n, _, h, w = s.shape
        boxes = [b.to(s.device) for b in boxes]
        m, k = fg_bg_masks(boxes, (h, w), stride, overlap=self.overlap)
        m = m.to(s.dtype)
        k = k.to(s.dtype)

        sa_t, ca_t = fgd_attention(t, self.temperature)
        sa_s, ca_s = fgd_attention(s, self.temperature)

        # [B, C, H, W] weight A_S^T * A_C^T times the squared difference
        sq = (t - s).pow(2) * sa_t[:, None] * ca_t[:, :, None, None]
        per_pixel = sq.sum(dim=1)  # [B, H, W]
        fg = self.alpha * (m * k * per_pixel).sum() / n
        bg = self.beta * ((1 - m) * k * per_pixel).sum() / n

        att = self.gamma * ((sa_t - sa_s).abs().sum() + (ca_t - ca_s).abs().sum()) / n

        glob = self.lambda_ * (self.gc_student(s) - self.gc_teacher(t)).pow(2).sum() / n
        return {"fg": fg, "bg": bg, "attention": att, "global": glob}


@register("fgd", "FGD: focal (fg/bg, attention-weighted) + global (GcBlock) distillation")
class FGDDistiller(Distiller):
    """``distill.fgd_{fg,bg,attention,global}_pN``: an :class:`FGDLoss` on each distilled level."""

    Options = FGDOptions
    needs_teacher = True

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: FGDOptions | None = None) -> None:
        super().__init__(student=student, teacher=teacher, options=options)
        o = self.options
        self.levels = self.resolve_levels(o.levels)
        cs, ct = self.student_channels, self.teacher_channels
        over = {k: getattr(o, k) for k in ("temperature", "alpha", "beta", "gamma", "lambda_")}
        over = {k: v for k, v in over.items() if v is not None}
        kind = detector_kind(student)
        self.losses = nn.ModuleDict(
            {l: FGDLoss.for_detector(kind, cs, ct, overlap=o.overlap, **over) for l in self.levels}
        )
        if o.scale != 1.0:
            for m in self.losses.values():
                for k in ("alpha", "beta", "gamma", "lambda_"):
                    setattr(m, k, getattr(m, k) * o.scale)

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        s, t = inputs.student.features, inputs.teacher_features
        out: dict[str, torch.Tensor] = {}
        for l in self.levels:
            for k, v in self.losses[l](s[l], t[l], inputs.boxes, stride_of(l)).items():
                out[f"distill.fgd_{k}_{l.lower()}"] = v
        return out
