"""ICD baseline (Kang et al., NeurIPS 2021) as its authors run it (``megvii-research/ICD``,
``pytorch_release``): instance-conditional distillation over all FPN levels.

Per step:

* the matching decoder (:class:`~hmkd.distill.matching.decoder.MatchingDecoder`, ``encoding: icd``: one
  post-norm decoder layer; keys/values span ALL distilled teacher levels concatenated along
  positions, padded cells masked, DETR's valid-extent sine embedding, no level embedding) runs its
  auxiliary task on every object's jittered inquiry plus 5 fakes per object (``aux.identification``,
  ``aux.localisation``);
* ``distill.icd``: the student's FPN maps (no adapter) go through a student-side value projection
  and imitate the teacher's LayerNorm-normalised values under the decoder's attention of THIS
  step's real (jittered) inquiries, fakes excluded (:func:`~hmkd.distill.losses.attention_weighted_mse`,
  normalised per image by default), times ``weight``;
* the decoder AND the student-side projection are trained by one AdamW (lr 1e-4, weight decay
  1e-4, cosine to 0 over the run, gradient norm clipped jointly at 0.01), never by the student's
  optimiser;
* during the first ``bypass_iters`` iterations (ICD's ``BYPASS_DISTILL``) the loss is computed on
  DETACHED student maps: only the projection learns from it while the decoder's attention forms.

Defaults follow the official configs per detector family (``weight``: 8 for RetinaNet/FCOS, 3 for
Faster/Mask R-CNN; ``max_inquiries``: 300 / 100). The MegEngine release's per-batch reduction is an
option. It shares the decoder, its options and optimiser, and the loss with HMKD.

:meth:`ICDDistiller.distill_losses` runs its parts inside named ``torch.profiler`` ranges
(:data:`PROFILE_PARTS`, each ``icd.<part>``) so that a profiler can time them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from hmkd.allowed import allowed
from hmkd.distill.base import DistillInputs
from hmkd.distill.common import detector_kind, stride_of
from hmkd.distill.matching.decoder import MatchingDecoder
from hmkd.distill.matching.method import DecoderDistiller
from hmkd.distill.matching.options import DecoderOptions
from hmkd.distill.matching.projection import StudentValueProjection
from hmkd.distill.matching.task import AuxOutput
from hmkd.distill.losses import attention_weighted_mse
from hmkd.distill.options import levels_option
from hmkd.distill.registry import register

__all__ = ["AUTHORS_ITERS", "BYPASS_AUTHORS", "ICDDistiller", "ICDOptions", "PROFILE_PARTS", "WEIGHTS"]

#: The profiler ranges of one step, in order (each recorded as ``icd.<part>``): the decoder's
#: key/value pass + auxiliary task, the no-grad attention of the real inquiries, and the student
#: side (value projection, attention-weighted MSE).
PROFILE_PARTS = ("decoder_aux", "decoder_attention", "attention_term")

#: ``INS_ATT_MIMIC.WEIGHT_VALUE`` per student family (``RCNN_R_50_R101_icd_FPN_1x.yaml``,
#: ``MaskRCNN_R_50_R101_icd_FPN_1x.yaml``: 3.0); 8.0 otherwise (``retinanet_R_50_R101_icd_FPN_1x.yaml``,
#: ``FCOS_R50_R101_icd.yaml`` and the default of ``utils/build.py``).
WEIGHTS = {"faster_rcnn": 3.0, "mask_rcnn": 3.0}
WEIGHT_DEFAULT = 8.0
#: ``MODEL.DISTILLER.BYPASS_DISTILL`` (1000) of the authors' 1x schedule (``SOLVER.MAX_ITER`` 90k).
BYPASS_AUTHORS = 1000
AUTHORS_ITERS = 90_000


@dataclass
class ICDOptions(DecoderOptions):
    """ICD's options; the decoder's (:class:`~hmkd.distill.matching.options.DecoderOptions`) with ICD's defaults.

    Attributes:
        levels: distilled levels (default: every common level, P2-P6 for R-CNNs, P3-P7 otherwise).
        weight: loss weight (None: 8.0, or 3.0 for Faster/Mask R-CNN students).
        reduction: ``image`` (PyTorch release: per image by its object count, mean over the batch)
            or ``batch`` (MegEngine release: over all objects of the batch).
        bypass_iters: iterations during which the loss is computed on detached student maps
            (None: the authors' share of the run, ``round(1000 / 90000 x run length)``; the run
            length is what :meth:`~hmkd.distill.base.Distiller.extra_schedulers` was told, the
            authors' 90k when it was never called).
    """

    levels: list[str] | None = levels_option()
    weight: float | None = allowed(None, ge=0)
    reduction: str = allowed("image", one_of=("image", "batch"))
    bypass_iters: int | None = allowed(None, ge=0)
    decoder_clip: float | None = 0.01  # the ranges of DecoderOptions' fields hold (hmkd.allowed.declared)
    decoder_schedule: str = "cosine"


@register("icd", "ICD: instance-conditional decoder over all levels, all objects, with its auxiliary task")
class ICDDistiller(DecoderDistiller):
    """``distill.icd`` and the decoder's ``aux.identification`` / ``aux.localisation``."""

    Options = ICDOptions
    needs_teacher = True
    default_init_student = "neck_head"  # ICD: PRELOAD_FPN and PRELOAD_HEAD on in every official config

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: ICDOptions | None = None) -> None:
        super().__init__(student=student, teacher=teacher, options=options)
        o = self.options
        self.levels = self.resolve_levels(o.levels)
        kind = detector_kind(student)
        self.weight = float(o.weight) if o.weight is not None else WEIGHTS.get(kind, WEIGHT_DEFAULT)
        self.decoder = MatchingDecoder(
            self.teacher_channels, self.num_classes, max_inquiries=o.inquiry_cap(kind),
            position_min_period=2.0 * min(stride_of(l) for l in self.levels), **o.decoder_kwargs(),
        )
        # ICD has no adapter: its student-side decoder projects the raw student FPN maps
        self.value_proj = StudentValueProjection(self.student_channels, o.hidden, o.heads, init="attention")
        self.freeze_decoder_if_asked()

    @property
    def bypass_iters(self) -> int:
        """The bypass window's length in iterations (see :class:`ICDOptions`)."""
        if self.options.bypass_iters is not None:
            return int(self.options.bypass_iters)
        total = self.total_iters if self.total_iters is not None else AUTHORS_ITERS
        return int(round(BYPASS_AUTHORS * total / AUTHORS_ITERS))

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder, "value_proj": self.value_proj}

    def make_extra_optimizers(self) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
        # one AdamW over the decoder and the student-side projection, clipped jointly (ICD's teacher_opt)
        return self.decoder_optimizers_of({"decoder": [self.decoder, self.value_proj]})

    # -- the decoder's task (also what hmkd fit-decoder trains) ---------------------------------
    def decoder_modules(self) -> nn.Module:
        return self.decoder

    def fit_spec(self) -> dict:
        return {**super().fit_spec(), "levels": list(self.levels), "max_inquiries": self.decoder.max_inquiries}

    def decoder_task(self, teacher_features, boxes, labels, small, image_sizes, padded_hw, *, generator=None,
                     keep_attention=False, keys=None) -> dict[str, AuxOutput]:
        kv = self.decoder.keys_values([teacher_features[l] for l in self.levels], image_sizes, padded_hw)
        return {"": self.decoder.aux_task(boxes, labels, image_sizes, kv if keys is None else keys(kv),
                                          generator=generator, keep_attention=keep_attention)}

    @torch.no_grad()
    def distillation_attention(self, teacher_features, boxes, labels, small, image_sizes, padded_hw):
        kv = self.decoder.keys_values([teacher_features[l] for l in self.levels], image_sizes, padded_hw)
        m, _, valid = self.decoder(boxes, labels, image_sizes, kv)
        return {"": (m, valid, list(boxes), kv)}

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        o = self.options
        t_maps = [inputs.teacher_features[l] for l in self.levels]
        padded_hw = tuple(inputs.student.tensors.shape[-2:])
        bypass = iteration is not None and iteration < self.bypass_iters
        out: dict[str, torch.Tensor] = {}
        with record_function("icd.decoder_aux"), torch.set_grad_enabled(self.decoder_learns and torch.is_grad_enabled()):
            kv = self.decoder.keys_values(t_maps, inputs.image_sizes, padded_hw)  # aux task and distillation
            if self.decoder_learns:
                aux = self.decoder.aux_task(inputs.boxes, inputs.labels, inputs.image_sizes, kv)
                out.update((f"aux.{k}", v) for k, v in aux.losses.items())
        with record_function("icd.decoder_attention"), torch.no_grad():  # m and O^T are targets
            if self.decoder_learns:
                queries, real = aux.real_queries()  # this step's jittered real inquiries (fakes masked)
            else:  # a frozen, fitted decoder: every object's inquiry at its own box
                queries, real = self.decoder.build_inquiries(inputs.boxes, inputs.labels, inputs.image_sizes)
            m = self.decoder.attend(queries.detach(), kv)
        with record_function("icd.attention_term"):
            s_maps = [inputs.student.features[l] for l in self.levels]
            if bypass:  # BYPASS_DISTILL: the loss trains the projection only
                s_maps = [s.detach() for s in s_maps]
            v_s = self.value_proj(s_maps)
            loss = attention_weighted_mse(m, v_s, kv.values.detach(), real, reduction=o.reduction)
            out["distill.icd"] = self.weight * loss
        return out
