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

Defaults as FGD's authors run it (yzd-v/FGD, ``configs/distillers/fgd/*.py`` and
``mmdet/distillation``), each an option:

* ``box_rule="fgd"``: boxes go to cells by FGD's code (:func:`hmkd.distill.masks.fgd_box_cells`:
  scaled by the map size over the *unpadded* image size, so stretched on padded batches as in FGD;
  ``floor..ceil`` inclusive, one cell wider than the box; the area of the unclamped range).
  ``box_rule="overlap"`` is our rule (:func:`hmkd.distill.masks.project_boxes`: the cells a box
  overlaps, by the stride; the centre cell for a box smaller than a cell), the one HMKD uses.
* ``levels``: the levels of FGD's configs, P2-P5 for two-stage detectors (``neck.fpn_convs.0-3``:
  mmdet's max-pooled P6 is never distilled) and P3-P7 for RetinaNet and FCOS, each kept only where
  both detectors produce it (a P2-P6 FCOS gets P3-P6).
* ``clip_grad=35``: every FGD config clips the global L2 norm of the student + FGD modules at 35
  (``optimizer_config.grad_clip``); the trainer uses it instead of ``train.clip_grad``
  (:attr:`Distiller.main_clip_grad`); ``None`` leaves ``train.clip_grad`` in charge.
* the student starts from the teacher's FPN and heads (``init_student=True`` in FGD's configs):
  ``distill.init_student`` defaults to ``neck_head`` for FGD (:attr:`Distiller.default_init_student`).

Other choices where FGD's paper and code leave room:

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

from hmkd.allowed import allowed
from hmkd.distill.adapter import make_adapter
from hmkd.distill.base import DistillInputs, Distiller
from hmkd.distill.common import detector_kind, stride_of
from hmkd.distill.gcblock import GcBlock
from hmkd.distill.masks import BOX_RULES, fg_bg_masks
from hmkd.distill.options import MethodOptions, levels_option
from hmkd.distill.registry import register
from hmkd.errors import ConfigError

__all__ = ["FGDDistiller", "FGDLoss", "FGDOptions", "FGD_CLIP_GRAD", "FGD_LEVELS", "FGD_PRESETS", "fgd_attention"]

#: FGD's published hyper-parameters per detector family (yzd-v/FGD configs/distillers/fgd/*.py).
FGD_PRESETS: dict[str, dict[str, float]] = {
    # faster_rcnn_r101 -> r50 and mask_rcnn_r101 -> r50 configs
    "two_stage": {"temperature": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda_": 5e-7},
    # retina_r101 -> r50 config
    "retinanet": {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6},
    # fcos_r101 -> r50 config
    "fcos": {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda_": 8e-6},
}
#: FGD's distilled FPN levels per detector family: the ``neck.fpn_convs.N`` hooks of its configs
#: (faster/mask R-CNN: fpn_convs.0-3 = P2-P5; retina/fcos/gfl: fpn_convs.0-4 = P3-P7).
FGD_LEVELS: dict[str, list[str]] = {
    "two_stage": ["P2", "P3", "P4", "P5"],
    "retinanet": ["P3", "P4", "P5", "P6", "P7"],
    "fcos": ["P3", "P4", "P5", "P6", "P7"],
}
#: The global L2-norm gradient clip of every FGD config (``grad_clip=dict(max_norm=35, norm_type=2)``).
FGD_CLIP_GRAD = 35.0
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

    ``levels``: None = FGD's levels for the family (:data:`FGD_LEVELS`) that both detectors have.
    ``scale`` multiplies all four weights (FGD's weights assume COCO-sized maps with sum reduction;
    see the README on loss scale). ``overlap``: ``max`` (FGD) or ``min`` (HMKD's rule).
    ``box_rule``: ``fgd`` (FGD's code) or ``overlap`` (ours; :mod:`hmkd.distill.masks`).
    ``clip_grad``: the main parameters' gradient clip (global L2 norm) while FGD trains, in place of
    ``train.clip_grad`` (FGD's configs: 35); None = ``train.clip_grad``.
    """

    levels: list[str] | None = levels_option()
    temperature: float | None = allowed(None, gt=0)
    alpha: float | None = allowed(None, ge=0)
    beta: float | None = allowed(None, ge=0)
    gamma: float | None = allowed(None, ge=0)
    lambda_: float | None = allowed(None, ge=0)
    scale: float = allowed(1.0, ge=0)
    overlap: str = allowed("max", one_of=("max", "min"))
    box_rule: str = allowed("fgd", one_of=BOX_RULES)
    clip_grad: float | None = allowed(FGD_CLIP_GRAD, gt=0)


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
        box_rule: box-to-cell rule of the masks: ``"fgd"`` (FGD's code, default: scaled by the
            unpadded image size, ``floor..ceil`` inclusive) or ``"overlap"`` (ours: the cells
            overlapped, by the stride); see :func:`hmkd.distill.masks.fg_bg_masks`.
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
        box_rule: Literal["fgd", "overlap"] = "fgd",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"FGDLoss: temperature must be > 0, got {temperature}")
        if overlap not in ("min", "max"):
            raise ValueError(f"FGDLoss: overlap must be 'min' or 'max', got {overlap!r}")
        if gc_init not in ("fgd", "default"):
            raise ValueError(f"FGDLoss: gc_init must be 'fgd' or 'default', got {gc_init!r}")
        if box_rule not in BOX_RULES:
            raise ValueError(f"FGDLoss: box_rule must be one of {', '.join(BOX_RULES)}, got {box_rule!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)
        self.overlap = overlap
        self.box_rule = box_rule
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
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        stride: int,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, Tensor]:
        """FGD losses for one level.

        Args:
            student: student map ``[B, Cs, H, W]``.
            teacher: teacher map ``[B, Ct, H, W]`` (detached here; it never gets a gradient).
            boxes: per image ``[N_b, 4]`` xyxy boxes in input-frame pixels (``N_b`` may be 0).
            stride: the level's stride in pixels.
            image_sizes: per image, the unpadded resized size ``(h, w)`` (``box_rule="fgd"``
                scales boxes by it); None: the map covers each image exactly (no padding).

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
        m, k = fg_bg_masks(
            boxes, (h, w), stride, overlap=self.overlap, box_rule=self.box_rule, image_sizes=image_sizes
        )
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
    """``distill.fgd_{fg,bg,attention,global}_pN``: an :class:`FGDLoss` on each distilled level.

    As FGD's authors run it by default: their levels for the student's family, their box-to-cell
    rule, the main parameters clipped at 35, the student initialised from the teacher's FPN and
    heads (see the module docstring).
    """

    Options = FGDOptions
    needs_teacher = True
    default_init_student = "neck_head"  # init_student=True in every FGD config with a same-family teacher

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: FGDOptions | None = None) -> None:
        super().__init__(student=student, teacher=teacher, options=options)
        o = self.options
        kind = detector_kind(student)
        self.levels = self.resolve_levels(o.levels) if o.levels is not None else self._fgd_levels(kind)
        self.main_clip_grad = o.clip_grad
        cs, ct = self.student_channels, self.teacher_channels
        over = {k: getattr(o, k) for k in ("temperature", "alpha", "beta", "gamma", "lambda_")}
        over = {k: v for k, v in over.items() if v is not None}
        self.losses = nn.ModuleDict(
            {l: FGDLoss.for_detector(kind, cs, ct, overlap=o.overlap, box_rule=o.box_rule, **over) for l in self.levels}
        )
        if o.scale != 1.0:
            for m in self.losses.values():
                for k in ("alpha", "beta", "gamma", "lambda_"):
                    setattr(m, k, getattr(m, k) * o.scale)

    def _fgd_levels(self, kind: str) -> list[str]:
        """FGD's levels for the student's family (:data:`FGD_LEVELS`) that both detectors produce."""
        wanted = FGD_LEVELS[_DETECTOR_PRESET[kind]]
        common = self.common_levels
        levels = [l for l in common if l in wanted]
        if not levels:
            raise ConfigError(
                f"distill.options.levels: none of FGD's levels for {kind} ({wanted[0]}-{wanted[-1]}) is produced "
                f"by both detectors (common: {common}); set distill.options.levels"
            )
        return levels

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        s, t = inputs.student.features, inputs.teacher_features
        out: dict[str, torch.Tensor] = {}
        for l in self.levels:
            for k, v in self.losses[l](s[l], t[l], inputs.boxes, stride_of(l), inputs.image_sizes).items():
                out[f"distill.fgd_{k}_{l.lower()}"] = v
        return out
