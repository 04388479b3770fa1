"""ICD baseline (Kang et al., NeurIPS 2021): instance-conditional distillation over all FPN levels.

Every object (no small-object focus) is an inquiry; the decoder's keys/values span ALL distilled
teacher levels concatenated along positions (a learned level embedding tells them apart); the
student imitates the teacher's LayerNorm-normalised values under the attention of each inquiry
(``distill.icd``); the decoder is trained only by its auxiliary identification + localisation task
(``aux.*``), with its own AdamW, and a warm-up keeps the distillation term off while it is noise.
It shares :class:`~hmkd.distill.decoder.MatchingDecoder` and
:func:`~hmkd.distill.losses.attention_weighted_mse` with HMKD, so the two differ exactly in what
HMKD adds: small-object inquiries over a finer level, the Inquiry Head, fg/bg masks and the
supplemental GcBlock term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hmkd.distill.base import Distiller, DistillInputs
from hmkd.distill.common import make_adapter, resolve_levels
from hmkd.distill.decoder import MatchingDecoder
from hmkd.distill.hmkd import _num_classes
from hmkd.distill.losses import StudentValueProjection, attention_weighted_mse
from hmkd.distill.registry import register
from hmkd.errors import ConfigError
from hmkd.models.detectors import fpn_channels_of


@dataclass
class ICDOptions:
    """``levels`` (default: every common level), decoder size, loss weight, decoder optimiser, warm-up."""

    levels: list[str] | None = None
    heads: int = 8
    hidden: int = 256
    fakes_per_real: int = 3
    weight: float = 1.0
    decoder_lr: float = 1e-4
    decoder_weight_decay: float = 1e-4
    decoder_clip: float | None = 1.0
    warmup_iters: int = 0


@register("icd", "ICD: instance-conditional decoder over all levels, all objects, with its auxiliary task")
class ICDDistiller(Distiller):
    Options = ICDOptions
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, options: ICDOptions) -> None:
        super().__init__(student, teacher, options)
        assert self.teacher is not None
        o = options
        if o.hidden % o.heads or o.hidden % 16:
            raise ConfigError(f"distill.options.heads={o.heads} must divide hidden={o.hidden} (a multiple of 16)")
        self.levels = resolve_levels(o.levels, student, self.teacher, "levels")
        ct = fpn_channels_of(self.teacher)
        self.adapters = nn.ModuleDict({l: make_adapter(student, self.teacher) for l in self.levels})
        self.decoder = MatchingDecoder(
            ct, _num_classes(student), hidden=o.hidden, heads=o.heads, query_feature=False,
            fakes_per_real=o.fakes_per_real, max_key_maps=max(8, len(self.levels)),
        )
        self.value_proj = StudentValueProjection(ct, o.hidden, o.heads)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        o = self.options
        t_maps = [inputs.teacher_features[l] for l in self.levels]
        kv = self.decoder.keys_values(t_maps)  # shared by the aux task and the distillation
        aux = self.decoder.aux_loss(inputs.boxes, inputs.labels, inputs.image_sizes, t_maps, kv=kv)
        out = {f"aux.{k}": v for k, v in aux.items()}
        if iteration is None or iteration >= o.warmup_iters:
            with torch.no_grad():  # m and O^T are targets
                m, v_t, valid = self.decoder(inputs.boxes, inputs.labels, inputs.image_sizes, t_maps, kv=kv)
            s_maps = [self.adapters[l](inputs.student.features[l]) for l in self.levels]
            v_s = self.value_proj(s_maps)
            out["distill.icd"] = o.weight * attention_weighted_mse(m, v_s, v_t.detach(), valid)
        return out
