"""ICD baseline (Kang et al., NeurIPS 2021): instance-conditional distillation over all FPN levels.

Every object (no small-object focus) is an inquiry; the decoder's keys/values span ALL distilled
teacher levels concatenated along positions (a learned level embedding tells them apart); the
student imitates the teacher's LayerNorm-normalised values under the attention of each inquiry
(``distill.icd``); the decoder is trained only by its auxiliary identification + localisation task
(``aux.*``), with its own AdamW, and a warm-up keeps the distillation term off while it is noise.
It shares :class:`~hmkd.distill.decoder.MatchingDecoder`, its options and optimiser, and
:func:`~hmkd.distill.losses.attention_weighted_mse` with HMKD, so the two differ exactly in what
HMKD adds: small-object inquiries over a finer level, the Inquiry Head, fg/bg masks and the
supplemental GcBlock term.

:meth:`ICDDistiller.distill_losses` runs its parts inside named ``torch.profiler`` ranges
(:data:`PROFILE_PARTS`, each ``icd.<part>``) so that a profiler can time them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from hmkd.distill.adapter import make_adapter
from hmkd.distill.base import DistillInputs, Distiller
from hmkd.distill.decoder import DecoderOptions, MatchingDecoder, StudentValueProjection, decoder_optimizers
from hmkd.distill.losses import attention_weighted_mse
from hmkd.distill.registry import register

__all__ = ["ICDDistiller", "ICDOptions", "PROFILE_PARTS"]

#: The profiler ranges of one step, in order (each recorded as ``icd.<part>``): the decoder's
#: key/value pass + auxiliary loss, its no-grad attention pass, and the student side (adapters,
#: value projection, attention-weighted MSE).
PROFILE_PARTS = ("decoder_aux", "decoder_attention", "attention_term")


@dataclass
class ICDOptions(DecoderOptions):
    """``levels`` (default: every common level) and the loss ``weight``, plus the decoder's options
    (:class:`~hmkd.distill.decoder.DecoderOptions`: size, optimiser, warm-up)."""

    levels: list[str] | None = None
    weight: float = 1.0

    def check(self) -> None:
        super().check()
        self._levels("levels")
        self._nonnegative("weight")


@register("icd", "ICD: instance-conditional decoder over all levels, all objects, with its auxiliary task")
class ICDDistiller(Distiller):
    """``distill.icd`` and the decoder's ``aux.identification`` / ``aux.localisation``."""

    Options = ICDOptions
    needs_teacher = True
    default_init_student = "neck_head"  # ICD: PRELOAD_FPN and PRELOAD_HEAD on in every official config

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: ICDOptions | None = None) -> None:
        super().__init__(student=student, teacher=teacher, options=options)
        o = self.options
        self.levels = self.resolve_levels(o.levels)
        cs, ct = self.student_channels, self.teacher_channels
        self.adapters = nn.ModuleDict({l: make_adapter(cs, ct) for l in self.levels})
        self.decoder = MatchingDecoder(
            ct, self.num_classes, hidden=o.hidden, heads=o.heads, query_feature=False,
            fakes_per_real=o.fakes_per_real, max_key_maps=max(8, len(self.levels)),
        )
        self.value_proj = StudentValueProjection(ct, o.hidden, o.heads)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    def make_extra_optimizers(self) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
        return decoder_optimizers(self.extra_modules(), self.options)

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        o = self.options
        t_maps = [inputs.teacher_features[l] for l in self.levels]
        distill = iteration is None or iteration >= o.warmup_iters
        with record_function("icd.decoder_aux"):
            kv = self.decoder.keys_values(t_maps)  # shared by the aux task and the distillation
            aux = self.decoder.aux_loss(inputs.boxes, inputs.labels, inputs.image_sizes, t_maps, kv=kv)
        out = {f"aux.{k}": v for k, v in aux.items()}
        with record_function("icd.decoder_attention"):
            if distill:
                with torch.no_grad():  # m and O^T are targets
                    m, v_t, valid = self.decoder(inputs.boxes, inputs.labels, inputs.image_sizes, t_maps, kv=kv)
        with record_function("icd.attention_term"):
            if distill:
                s_maps = [self.adapters[l](inputs.student.features[l]) for l in self.levels]
                v_s = self.value_proj(s_maps)
                out["distill.icd"] = o.weight * attention_weighted_mse(m, v_s, v_t.detach(), valid)
        return out
