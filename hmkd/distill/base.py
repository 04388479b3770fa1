"""The distiller interface every method shares (``none`` = plain training of one detector).

A :class:`Distiller` holds the student, the frozen teacher and the method's own modules. Each step
``losses = distiller(images, targets, iteration)`` runs ONE ordinary forward of the student (its FPN
maps come from a :class:`~hmkd.models.DetectorTap`), one ``torch.no_grad()`` pass of the teacher's
backbone + FPN on the very same transformed batch, and the method's losses. The result is a flat,
prefixed dict (``student.loss_classifier``, ``distill.small_p2``, ``aux.identification`` ...) whose
sum is backpropagated once:

- ``student.*`` and ``distill.*`` terms train the student and the distiller's modules (adapters,
  GcBlocks, student-side projections) with the main optimiser, except the modules a method gives
  its own optimiser (:meth:`extra_modules`, e.g. ICD's student-side value projection);
- ``aux.*`` terms train only modules that have their own optimiser (:meth:`extra_optimizers`, e.g.
  the matching decoder); their inputs come from the teacher and are detached, and the distillation
  terms detach the decoder's outputs, so the decoder learns from its own task only.

The method's own optimisers may follow a schedule over the run (:meth:`extra_schedulers`).

The teacher is kept out of ``parameters()``, ``state_dict()`` and DDP: it is frozen, in eval mode,
and moved with the distiller by ``.to()``.

A method subclasses :class:`Distiller`, sets ``Options`` (a :class:`~hmkd.distill.options.MethodOptions`
dataclass, validated by its ``check()`` when the distiller is built) and ``needs_teacher``, builds its
modules in ``__init__`` from what the base tells of the two detectors (:attr:`Distiller.student_channels`,
:attr:`Distiller.teacher_channels`, :attr:`Distiller.num_classes`, :meth:`Distiller.resolve_levels`)
and returns its terms from :meth:`Distiller.distill_losses`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from hmkd.config import parse_method_options
from hmkd.distill.common import detector_levels, num_classes_of
from hmkd.distill.options import NoOptions
from hmkd.engine.optim import clip_and_step, optimizer_params
from hmkd.errors import ConfigError
from hmkd.models.detectors import fpn_channels_of
from hmkd.models.tap import DetectorTap, TapOutput, backbone_features, renormalise

logger = logging.getLogger(__name__)

#: COCO's "small": area < 32 x 32 pixels in the original image (a method may set its own).
SMALL_AREA = 32 * 32

#: Terms whose name starts with this are measurements, logged with the losses but never summed
#: into the loss (e.g. HMKD's ``metric.in_box_p2``, the attention mass inside the objects).
METRIC_PREFIX = "metric."


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss to backpropagate: the sum of a step's terms, without the ``metric.*`` measurements."""
    return sum(v for k, v in losses.items() if not k.startswith(METRIC_PREFIX))

#: Precisions the frozen teacher may run in (``distill.teacher_dtype``).
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistillInputs:
    """Everything a distillation loss may read for one batch.

    Attributes:
        student: the student's tapped forward (features ``P*``, resized targets, sizes).
        teacher_features: the teacher's FPN maps on the same transformed batch (no grad).
        boxes: per image, GT boxes in the resized frame ``[N,4]``.
        labels: per image, GT labels ``[N]``.
        small: per image, bool ``[N]``: object area < the distiller's :attr:`Distiller.small_area`
            (default 32x32, COCO's "small") in the original image.
        image_sizes: resized (unpadded) sizes.
    """

    student: TapOutput
    teacher_features: dict[str, torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    small: list[torch.Tensor]
    image_sizes: list[tuple[int, int]]


def small_flags(targets: list[dict[str, torch.Tensor]], small_area: float = SMALL_AREA) -> list[torch.Tensor]:
    """Per-box bool "small object" flags from ORIGINAL-frame targets (``area`` if given, else box area)."""
    out = []
    for t in targets:
        if "area" in t and len(t["area"]) == len(t["boxes"]):
            area = t["area"].to(torch.float32)
        else:
            b = t["boxes"]
            area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
        out.append(area < small_area)
    return out


class TeacherTrunk(nn.Module):
    """What distillation runs of a teacher detector: its ``backbone`` (body + FPN) and its
    ``transform`` (for the input normalisation), the same module objects, not copies.

    The distiller keeps only this, so the teacher's detection heads (e.g. 14.5M parameters, 58 MB,
    of a ResNet-50 Faster R-CNN's RPN + box head) are freed once the caller drops the detector: no method
    ever runs them.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        inner = getattr(detector, "module", detector)
        self.backbone = inner.backbone
        self.transform = inner.transform
        self.detector_class = type(inner).__name__
        self.eval()

    def extra_repr(self) -> str:
        return f"of {self.detector_class}"


class Distiller(nn.Module):
    """Base distiller; as is, the ``none`` method (the student's own detection losses only)."""

    name: ClassVar[str] = "none"
    Options: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = False
    #: Whether the method runs the teacher's detection head (its class scores). None of hmkd's does:
    #: they read the teacher's backbone + FPN only, so the teacher may have its own class set (e.g.
    #: a COCO-91 teacher on a 3-class data set); a method that sets this needs the student's classes.
    uses_teacher_head: ClassVar[bool] = False
    #: Objects with an original-image area below this are "small" (:attr:`DistillInputs.small`).
    small_area: float = SMALL_AREA
    #: What ``distill.init_student: null`` means for this method: ``none`` | ``neck`` | ``neck_head``
    #: (how the method's authors start the student; see :func:`hmkd.models.weights.init_from_teacher`).
    default_init_student: ClassVar[str] = "none"
    #: Gradient clip (max global L2 norm) of the main parameters while this method trains, in place
    #: of ``train.clip_grad``; None: ``train.clip_grad`` (see :meth:`main_clip`).
    main_clip_grad: float | None = None

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: Any = None) -> None:
        """Keyword-only, so that two detectors of one class count cannot be swapped silently.

        ``options``: an ``Options`` object, or a mapping read into one by
        :func:`hmkd.config.parse_method_options` (unknown names and wrong types refused), default
        ``Options()``; either is validated by its ``check()``, if it has one.
        """
        super().__init__()
        if isinstance(options, Mapping):
            options = parse_method_options(self.Options, options, check=False)
        self.options = options if options is not None else self.Options()
        check = getattr(self.options, "check", None)
        if callable(check):
            check()
        self.student = student
        self._teacher: list[nn.Module] = []  # hidden from parameters()/state_dict()/DDP
        self._common_levels: list[str] | None = None
        self._extra_opts: list[tuple[str, torch.optim.Optimizer, float | None]] | None = None
        self._extra_scheds: list[tuple[str, torch.optim.lr_scheduler.LRScheduler]] | None = None
        #: the run's length in iterations, once :meth:`extra_schedulers` has been told it (else None)
        self.total_iters: int | None = None
        if self.needs_teacher and teacher is None:
            raise ConfigError(f"method {self.name!r} needs a teacher (config 'teacher' with 'weights')")
        if teacher is not None:
            ns, nt = num_classes_of(student), num_classes_of(teacher)
            if ns is not None and nt is not None and ns != nt:
                if self.uses_teacher_head:
                    raise ConfigError(
                        f"teacher has {nt} classes but the student has {ns}: method {self.name!r} uses the teacher's "
                        "detection head, so both must be trained on the same label set"
                    )
                if self.needs_teacher:
                    logger.info(
                        "teacher has %d classes, the student %d: method %r uses only the teacher's backbone + FPN, "
                        "so the class sets need not match", nt, ns, self.name,
                    )
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            trunk = TeacherTrunk(teacher)
            # channels_last: the frozen teacher's convolutions run faster (CPU oneDNN, GPU tensor
            # cores); ~26% off its forward on CPU, same numbers up to float rounding
            trunk.to(memory_format=torch.channels_last)
            self._teacher.append(trunk)
        self._tap = DetectorTap(student)

    # -- teacher handling ---------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher's :class:`TeacherTrunk` (backbone + transform; not a registered
        sub-module)."""
        return self._teacher[0] if self._teacher else None

    def _trunk(self) -> nn.Module:
        if self.teacher is None:
            raise ConfigError(f"method {self.name!r} needs a teacher (config 'teacher' with 'weights')")
        return self.teacher

    # -- what a method needs to know of the two detectors ---------------------------------------
    @property
    def student_channels(self) -> int:
        """Channels of the student's FPN maps."""
        return fpn_channels_of(self.student)

    @property
    def teacher_channels(self) -> int:
        """Channels of the teacher's FPN maps (ConfigError without a teacher)."""
        return fpn_channels_of(self._trunk())

    @property
    def num_classes(self) -> int:
        """Object classes (without background) of the student; ConfigError if it cannot be told."""
        n = num_classes_of(self.student)
        if n is None:
            raise ConfigError(f"cannot tell the class count of {type(self.student).__name__}")
        return n

    @property
    def common_levels(self) -> list[str]:
        """The FPN levels both the student and the teacher produce, finest first."""
        if self._common_levels is None:
            teacher_levels = set(detector_levels(self._trunk()))
            self._common_levels = [l for l in detector_levels(self.student) if l in teacher_levels]
        return list(self._common_levels)

    def resolve_levels(self, requested: list[str] | None, key: str = "levels") -> list[str]:
        """``requested`` levels (None: :attr:`common_levels`), each checked to be produced by both
        detectors (ConfigError naming ``distill.options.<key>`` otherwise)."""
        if requested is None:
            return self.common_levels
        common = self.common_levels
        for l in requested:
            if l not in common:
                raise ConfigError(f"distill.options.{key}: level {l} is not produced by both detectors (common: {common})")
        return list(requested)

    def set_teacher_dtype(self, dtype: torch.dtype | str) -> None:
        """Run the frozen teacher in ``dtype`` (``torch.float32``, ``bfloat16`` or ``float16``).

        The teacher's weights are cast once; each step its input is cast to ``dtype`` and its FPN
        maps back to the student's dtype, so the losses see float32 targets rounded to ``dtype``.
        """
        if isinstance(dtype, str):
            if dtype not in TEACHER_DTYPES:
                raise ConfigError(f"distill.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
            dtype = TEACHER_DTYPES[dtype]
        if dtype not in TEACHER_DTYPES.values():
            raise ConfigError(f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype}")
        if self.teacher is not None:
            self.teacher.to(dtype=dtype)

    def _apply(self, fn: Callable, recurse: bool = True) -> "Distiller":  # .to(), .cuda(), .double()
        super()._apply(fn, recurse)
        if self._teacher:
            self._teacher[0]._apply(fn)
        return self

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()
        return self

    def wrap_student(self, wrapped: nn.Module) -> None:
        """Run the student through ``wrapped`` (e.g. its DDP wrapper); hooks stay on the inner model."""
        self._tap.remove()
        self._tap = DetectorTap(wrapped)

    def prepare(self, cfg: Any, train_set: Any, device: torch.device, *, progress: bool = False) -> str | None:
        """Work the method does once before a run trains, on the run's config and training set:
        none by default; ICD and HMKD fit their matching decoder on the teacher alone, or load the
        cached fit (:class:`~hmkd.distill.matching.method.DecoderDistiller`). Returns the file it
        used, if any. Not called when a run resumes (the checkpoint holds the method's state)."""
        return None

    # -- parameters -----------------------------------------------------------------------------
    def main_clip(self, train_clip_grad: float | None) -> float | None:
        """The main parameters' clip: :attr:`main_clip_grad` when the method sets one, else
        ``train_clip_grad`` (what the trainer and ``hmkd bench cost`` pass to ``train_step``)."""
        return self.main_clip_grad if self.main_clip_grad is not None else train_clip_grad

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules trained by their own optimiser (``aux.*`` losses), by name. None by default."""
        return {}

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def distiller_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the method's own modules optimised with the student."""
        skip = {id(p) for p in self.student.parameters()}
        for m in self.extra_modules().values():
            skip.update(id(p) for p in m.parameters())
        return [p for p in self.parameters() if p.requires_grad and id(p) not in skip]

    def extra_optimizers(self) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
        """``(name, optimiser, grad-clip max-norm or None)`` for each module with its own optimiser;
        built once by :meth:`make_extra_optimizers` and cached (the same objects on every call)."""
        if self._extra_opts is None:
            self._extra_opts = list(self.make_extra_optimizers())
        return self._extra_opts

    def make_extra_optimizers(self) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
        """Build the optimisers of :meth:`extra_optimizers`; none for the base (override it)."""
        return []

    def extra_schedulers(self, total_iters: int) -> list[tuple[str, torch.optim.lr_scheduler.LRScheduler]]:
        """``(name, scheduler)`` of the learning-rate schedules of the method's own optimisers, for a
        run of ``total_iters`` iterations; built once by :meth:`make_extra_schedulers` and cached.

        Call it once, before the first step, when the run's length is known (the trainer does, with
        ``train.iters``); it also records that length as :attr:`total_iters`, which a method may use
        to size other iteration-based settings (ICD's bypass window). Each scheduler is stepped once
        per iteration after the optimisers (the trainer does it after each ``train_step``;
        :meth:`step_extra_optimizers` does it too) and its state belongs in a training checkpoint.
        None for the base.
        """
        if self._extra_scheds is None:
            if total_iters < 0:
                raise ValueError(f"extra_schedulers: total_iters must be >= 0, got {total_iters}")
            self.total_iters = int(total_iters)
            self._extra_scheds = list(self.make_extra_schedulers(int(total_iters)))
        elif int(total_iters) != self.total_iters:
            raise ValueError(
                f"extra_schedulers: already built for {self.total_iters} iterations, asked for {total_iters}"
            )
        return self._extra_scheds

    def make_extra_schedulers(self, total_iters: int) -> list[tuple[str, torch.optim.lr_scheduler.LRScheduler]]:
        """Build the schedulers of :meth:`extra_schedulers` over :meth:`extra_optimizers`; none for the
        base (override it)."""
        return []

    def step_extra_optimizers(self) -> None:
        """Clip, step and zero the method's own optimisers (e.g. the matching decoder's AdamW; each
        through :func:`hmkd.engine.optim.clip_and_step`), then step their schedules if
        :meth:`extra_schedulers` built any.

        Call it after ``loss.backward()``, next to your own ``optimizer.step()``.
        """
        for _, opt, clip in self.extra_optimizers():
            clip_and_step([(opt, optimizer_params(opt), clip)])
            opt.zero_grad(set_to_none=True)
        for _, sched in self._extra_scheds or ():
            sched.step()

    # -- the step -------------------------------------------------------------------------------
    def teacher_features(self, tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's P-named FPN maps on a batch the student's transform produced."""
        teacher = self.teacher
        assert teacher is not None
        dtype = next(teacher.parameters()).dtype  # see set_teacher_dtype
        cast = dtype != torch.float32
        with torch.no_grad():
            x = renormalise(tensors, self.student, teacher)
            x = (x.to(dtype) if cast else x).contiguous(memory_format=torch.channels_last)
            feats = backbone_features(teacher, x)
            return {k: (v.to(tensors.dtype) if cast else v).contiguous() for k, v in feats.items()}

    def forward(
        self,
        images: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        iteration: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's losses, flat and prefixed (sum them and backpropagate once)."""
        small = small_flags(targets, self.small_area)
        res = self._tap(images, targets)
        losses = {f"student.{k}": v for k, v in res.output.items()}
        if self.teacher is None or not self.needs_teacher:
            return losses
        t_feats = self.teacher_features(res.tensors)
        resized = res.targets or []
        inputs = DistillInputs(
            student=res,
            teacher_features=t_feats,
            boxes=[t["boxes"] for t in resized],
            labels=[t["labels"] for t in resized],
            small=small,
            image_sizes=res.image_sizes,
        )
        losses.update(self.distill_losses(inputs, iteration))
        return losses

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        """The method's loss terms (``distill.*`` and ``aux.*``). None for the base."""
        return {}
