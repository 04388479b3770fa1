"""HMKD: Hierarchical Matching Knowledge Distillation (Ma et al., JCST 2024, Sec. 3), as a distiller.

Per step, with ``S'_l = adapter(S_l)`` and ``T_l`` the teacher's map at level ``l``:

* ``distill.others_pN`` (Sec. 3.2.1 / 3.3, ``L_others``): for each distilled level,
  ``sum_xy M K MSE_c(S', T)`` (M: foreground mask, K: scale mask; fg only by default,
  ``others_bg_weight`` adds the background half).
* For each matching pair (queries at ``l``, keys/values at ``l-1``; default ``l = P3``):

  - ``distill.inquiry_pL`` (Sec. 3.2.2): the Inquiry Head on ``S_l`` trained with sigmoid focal loss
    towards the cells within ``s_l`` cells of a small object's centre.
  - ``distill.small_fg_pL-1``: imitation ``sum_xy Ms Ks MSE_c(S', T)`` at level ``l-1`` over the
    small-object foreground ``Ms`` = cells of small GT boxes UNION the Inquiry Head's candidate
    cells (``MAP_l > t``) upsampled to ``l-1``; ``Ks`` is K on GT cells and ``1/N_cand`` on
    candidate-only cells (each image's candidate region weighs as one object).
  - ``distill.small_attn_pL-1``: ``1/(N_m N_s) sum_j sum_i <m_ij, MSE_c(LN O^S_j, LN O^T_j)>`` with
    ``m_ij`` the matching decoder's attention of inquiry ``i`` (small objects; ``inquiries: all``
    for every object) over level ``l-1``, ``O^T = F_v(T_{l-1})``, ``O^S`` the student-side value
    projection of ``S'_{l-1}``; ``m`` and ``O^T`` are detached.
  - ``aux.identification_pL`` / ``aux.localisation_pL`` / ``aux.attention_pL``: the decoder's own
    task (ICD's, plus the supervision of its attention towards the objects; teacher side only, its
    own AdamW), fitted on the teacher before distilling and then trained on jointly or frozen
    (``decoder_fit``, ``decoder_training``; see :mod:`hmkd.distill.matching.method` and
    docs/MATCHING.md). ``metric.in_box_pL-1`` logs the attention mass inside the objects (not a loss).
* ``distill.bg_pN`` (Sec. 3.2.3): ``sum f'(|T - S'|)^2`` with a trainable GcBlock (``bg_form: fgd``:
  ``sum (f'_s(S') - f'_t(T))^2``).

Total: ``L_det + alpha * L_bg + beta * L_small`` (alpha, beta applied here; the logged terms are
already weighted). ``reduction`` fixes how sums scale, see :class:`HMKDOptions`.

:meth:`HMKDDistiller.distill_losses` computes its parts one after the other, each inside a named
``torch.profiler`` range ``hmkd.<part>`` (:data:`PROFILE_PARTS`, in that order), so that a profiler
(e.g. the cost benchmark) can time them; a part that the options switch off is an empty range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from hmkd.allowed import allowed
from hmkd.distill.adapter import make_adapter
from hmkd.distill.base import METRIC_PREFIX, DistillInputs
from hmkd.distill.common import detector_kind, finer_level, stride_of
from hmkd.distill.matching.decoder import KeyValues, MatchingDecoder, WindowKeyValues, Windowed, window_cells_in_boxes
from hmkd.distill.matching.method import DecoderDistiller
from hmkd.distill.matching.options import DecoderOptions
from hmkd.distill.matching.projection import StudentValueProjection
from hmkd.distill.matching.task import AuxOutput, attention_in_box_share
from hmkd.distill.gcblock import GcBlock
from hmkd.distill.inquiry import InquiryHead, candidate_cells, inquiry_loss, inquiry_targets, widen_to_finer_level
from hmkd.distill.losses import attention_weighted_mse, background_loss, masked_feature_mse
from hmkd.distill.masks import box_mask, fg_bg_masks, pad_boxes
from hmkd.distill.options import level_option, levels_option, refuse
from hmkd.distill.registry import register
from hmkd.errors import ConfigError
from hmkd.models.backbones import level_index

__all__ = ["HMKDDistiller", "HMKDOptions", "PROFILE_PARTS", "REFERENCE_AREA"]

#: Input area (pixels) that ``reduction: size_normalised`` rescales sums to: an 800 x 1333 COCO image.
REFERENCE_AREA = 800 * 1333

#: The profiler ranges of one step, in the order they run (each recorded as ``hmkd.<part>``):
#: ``adapters`` (student-to-teacher 1x1 convs), ``masks`` (fg/bg masks of the distilled and finer
#: levels, small-object box masks), ``inquiry_head`` (head forward, targets, focal loss, candidates,
#: widening), ``decoder_aux`` (key/value pass + auxiliary loss), ``decoder_attention`` (no-grad
#: attention pass), ``others`` (L_others), ``small_fg`` (small-object foreground imitation),
#: ``attention_term`` (student value projection + attention-weighted MSE), ``gcblock_bg`` (L_bg).
PROFILE_PARTS = ("adapters", "masks", "inquiry_head", "decoder_aux", "decoder_attention", "others", "small_fg",
                 "attention_term", "gcblock_bg")


@dataclass
class HMKDOptions(DecoderOptions):
    """Options of HMKD; every reading of the paper we had to choose is one of these.

    Attributes:
        levels: levels of ``L_others`` and ``L_bg`` (default: the three finest levels both
            detectors have, i.e. P2-P4 for Faster/Mask R-CNN).
        start_level: level of the inquiries; keys/values come from the next finer level
            (default: the second-finest common level, P3 for Faster/Mask R-CNN: Table 7).
        pairs: several starting levels, e.g. ``[P3, P4]`` ("P2 to P4"); overrides start_level.
        heads, hidden, encoding, fakes_per_real, max_inquiries, jitter, padding_mask, decoder_lr,
            decoder_weight_decay, decoder_clip, decoder_schedule, fakes, displacement, position_code,
            attention_supervision, decoder_fit, decoder_training, fit_iters, fit_lr: the matching
            decoder's (:class:`~hmkd.distill.matching.options.DecoderOptions`; heads N_m: Table 6). HMKD's
            defaults: ``encoding: hmkd`` (class embedding + sine of the box, the paper's reading), a
            constant decoder learning rate, clip 1.0; the rest is ICD's (the paper trains the decoder
            with ICD's task and says no more). A ``position_code: absolute`` decoder's shortest
            period is 2 strides of the key level.
        attention_term: the attention-weighted imitation ``distill.small_attn`` (False: dropped, the
            hierarchical matching's own contribution removed; the decoder is then not needed for
            the loss and neither built nor run).
        small_foreground: the small-object foreground imitation ``distill.small_fg`` (False:
            dropped; the Inquiry Head, if on, still trains the student but its candidates then
            widen nothing). An ablation switch: which of HMKD's terms carries its gain.
        attention_cells: compute the attention-weighted term on each image's k cells with the most
            attention of its real inquiries only (the term is linear in the attention, so this drops
            the rest of the sum; the share of the attention kept is logged as
            ``metric.attention_kept_pN``). A speed knob for a decoder whose attention is
            concentrated; None (default): every cell, the paper's sum.
        attention_window: each inquiry attends over a window of this many cells per side of the key
            level around its centre (shifted to lie inside the image), and the keys, values and the
            student-side projection are computed only for the cells inside some window: the matching
            costs O(inquiries x window) instead of O(inquiries x map). A fitted decoder is fitted over
            the whole map (the fit does not depend on this option); during distillation every attention
            of the decoder (the distillation pass and, when trained jointly, its aux task) is windowed.
            Default 15 (cells of P2: 60 px); None: the whole map, the paper's.
        inquiry_channels, inquiry_convs: the Inquiry Head's tower: ``inquiry_convs`` 3x3 conv + GroupNorm
            + ReLU blocks of ``inquiry_channels`` channels (None: the student map's), then a 3x3 conv to
            one logit. The paper does not fix the head ("a light head"); default one 64-channel block.
            Our first reading, 2 full-width blocks like a detection-head tower, is ``inquiry_convs: 2,
            inquiry_channels: None``.
        warmup_iters: iterations during which only the decoder learns (no attention-weighted
            term), since attention from an untrained decoder is noise (ICD: 1000).
        query_feature: inquiries also add the teacher's level-l feature at the object.
        inquiries: ``small`` (objects with area < ``small_area``) or ``all``.
        inquiry_head: use the Inquiry Head (Table 5-style switch).
        inquiry_radius, inquiry_threshold: ``s_l`` (cells) and ``t``.
        inquiry_weight: weight of the Inquiry Head's focal loss (it trains the student too).
        supplement: use the supplemental (background) distillation (Table 5).
        bg_form: ``paper`` (``f'(|T-S'|)^2``) or ``fgd`` (FGD's global loss, two GcBlocks).
        alpha, beta: balance factors (paper: 1e-3 each with ``reduction: sum``; default 1 with
            ``reduction: mean``).
        reduction: ``mean`` (default): means over channels (and pixels for ``L_bg``), the masked
            sums of ``L_others`` averaged over objects, so every term is O(feature MSE) at any
            image size and object count and ``alpha = beta = 1`` is the working default at CPU
            sizes; ``sum`` (paper/FGD: sums over channels and pixels divided by the batch size,
            growing with image area and channel count; use with the paper's ``alpha = beta =
            1e-3``, as configs/coco/base_hmkd.yaml does); ``size_normalised``: ``sum`` rescaled to
            an 800x1333 input, so the paper's values mean the same at any image size. The
            attention-weighted term is the same under every reduction: the paper defines it with
            an MSE over the c channels of each head (a mean), so there is no channel sum to restore.
        others_bg_weight: weight of the background half of ``L_others`` (paper formula: 0).
        aux_every: run the decoder's auxiliary task (and so update the decoder) on every k-th
            iteration only (default 1: every step, as the paper trains it). On the other steps
            the keys, values and attention the distillation needs are computed without a graph,
            which saves the aux task's forward and backward (~60% of the decoder's cost). The
            decoder then gets 1/k of the updates; warm-up iterations always run it. A training
            change, not an exact speed-up: measure its effect before relying on it.
        small_area: an object is small when its area in the original image (COCO's ``area`` when
            given, else its box's) is below this (default 32 x 32, COCO's "small"); it decides
            the inquiries (``inquiries: small``), the Inquiry Head's targets and the small-object
            foreground. 0: no object is small.
    """

    # the ranges of DecoderOptions' fields hold for the defaults changed here (hmkd.allowed.declared)
    encoding: str = "hmkd"
    position_code: str = "absolute"
    attention_supervision: float = 1.0
    decoder_fit: str = "auto"
    decoder_training: str = "frozen"
    warmup_iters: int = allowed(0, ge=0)
    levels: list[str] | None = levels_option()
    start_level: str | None = level_option()
    pairs: list[str] | None = levels_option()
    query_feature: bool = True
    inquiries: str = allowed("small", one_of=("small", "all"))
    inquiry_head: bool = True
    inquiry_radius: float = allowed(2.0, gt=0)
    inquiry_threshold: float = allowed(0.5, gt=0, lt=1)
    inquiry_weight: float = allowed(1.0, ge=0)
    supplement: bool = True
    bg_form: str = allowed("paper", one_of=("paper", "fgd"))
    alpha: float = allowed(1.0, ge=0)
    beta: float = allowed(1.0, ge=0)
    reduction: str = allowed("mean", one_of=("sum", "size_normalised", "mean"))
    others_bg_weight: float = allowed(0.0, ge=0)
    aux_every: int = allowed(1, ge=1)
    small_area: float = allowed(32.0 * 32.0, ge=0)
    attention_term: bool = True
    small_foreground: bool = True
    attention_cells: int | None = allowed(None, ge=1)
    attention_window: int | None = allowed(15, ge=1)
    inquiry_channels: int | None = allowed(64, ge=1)
    inquiry_convs: int = allowed(1, ge=0)

    def check(self) -> None:
        super().check()
        if self.attention_window is not None and self.attention_cells is not None:
            refuse("attention_cells", "null when attention_window is set (the window already keeps the cells "
                   "around each object)", self.attention_cells)


@register("hmkd", "HMKD: hierarchical matching (small-object inquiries over finer teacher maps) + supplemental GcBlock")
class HMKDDistiller(DecoderDistiller):
    """HMKD around a student and a frozen teacher; see the module docstring for the terms."""

    Options = HMKDOptions
    needs_teacher = True

    def __init__(self, *, student: nn.Module, teacher: nn.Module | None = None, options: HMKDOptions | None = None) -> None:
        super().__init__(student=student, teacher=teacher, options=options)
        o = self.options
        self.small_area = float(o.small_area)
        common = self.common_levels
        self.levels = self.resolve_levels(o.levels) if o.levels is not None else common[:3]
        key = "pairs" if o.pairs else "start_level"
        self.pairs = list(o.pairs or [o.start_level or common[1]])
        for s in self.pairs:
            if s not in common or finer_level(s) not in common:
                raise ConfigError(
                    f"distill.options.{key} {s} needs {s} and {finer_level(s)} in both detectors (common: {common}); "
                    "for RetinaNet/FCOS set model.levels to P2-P7 or start at P4"
                )
        cs, ct = self.student_channels, self.teacher_channels
        #: levels whose fg/bg masks a step needs: the distilled ones and the pairs' finer ones
        self.mask_levels = sorted(set(self.levels) | {finer_level(s) for s in self.pairs}, key=level_index)
        self.adapters = nn.ModuleDict({l: make_adapter(cs, ct) for l in self.mask_levels})
        cap = o.inquiry_cap(detector_kind(student))
        pairs = self.pairs if o.attention_term else []
        self.decoders = nn.ModuleDict(
            {
                s: MatchingDecoder(ct, self.num_classes, query_feature=o.query_feature, max_inquiries=cap,
                                   position_min_period=2.0 * stride_of(finer_level(s)), **o.decoder_kwargs())
                for s in pairs
            }
        )
        self.value_proj = nn.ModuleDict({s: StudentValueProjection(ct, o.hidden, o.heads) for s in pairs})
        self.inquiry_heads = nn.ModuleDict(
            {s: InquiryHead(cs, hidden=o.inquiry_channels, num_convs=o.inquiry_convs) for s in self.pairs}
        ) if o.inquiry_head else None
        self.gc = nn.ModuleDict({l: GcBlock(ct) for l in self.levels}) if o.supplement else None
        self.gc_t = nn.ModuleDict({l: GcBlock(ct) for l in self.levels}) if o.supplement and o.bg_form == "fgd" else None
        self.freeze_decoder_if_asked()

    # -- optimisation ---------------------------------------------------------------------------
    def extra_modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoders}

    def make_extra_optimizers(self) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
        return self.decoder_optimizers_of(self.extra_modules())

    # -- the matching decoders' task (also what hmkd fit-decoder trains) -------------------------
    def decoder_modules(self) -> nn.Module:
        return self.decoders

    def fit_spec(self) -> dict:
        o = self.options
        return {**super().fit_spec(), "pairs": list(self.decoders), "query_feature": o.query_feature,
                "inquiries": o.inquiries, "small_area": o.small_area,
                "max_inquiries": next(iter(self.decoders.values())).max_inquiries if len(self.decoders) else None}

    def inquiry_objects(self, boxes: list[torch.Tensor], labels: list[torch.Tensor], small: list[torch.Tensor]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The objects that make inquiries: the small ones (``inquiries: small``) or all."""
        if self.options.inquiries == "all":
            return boxes, labels
        return [b[s] for b, s in zip(boxes, small)], [lab[s] for lab, s in zip(labels, small)]

    def decoder_task(self, teacher_features, boxes, labels, small, image_sizes, padded_hw, *, generator=None,
                     keep_attention=False, keys=None) -> dict[str, AuxOutput]:
        keep, keep_labels = self.inquiry_objects(boxes, labels, small)
        out = {}
        for start, dec in self.decoders.items():
            kv = dec.keys_values([teacher_features[finer_level(start)]], image_sizes, padded_hw)
            out[start] = dec.aux_task(keep, keep_labels, image_sizes, kv if keys is None else keys(kv),
                                      self._query_map(teacher_features, start), stride_of(start), generator=generator,
                                      keep_attention=keep_attention)
        return out

    @torch.no_grad()
    def distillation_attention(self, teacher_features, boxes, labels, small, image_sizes, padded_hw):
        keep, keep_labels = self.inquiry_objects(boxes, labels, small)
        out = {}
        for start, dec in self.decoders.items():
            kv = dec.keys_values([teacher_features[finer_level(start)]], image_sizes, padded_hw)
            m, _, valid = dec(keep, keep_labels, image_sizes, kv, self._query_map(teacher_features, start),
                              stride_of(start))
            out[start] = (m, valid, keep, kv)
        return out

    def _query_map(self, teacher_features: dict[str, torch.Tensor], start: str) -> torch.Tensor | None:
        return teacher_features[start] if self.options.query_feature else None

    @staticmethod
    def _in_box_share(m: torch.Tensor, boxes: list[torch.Tensor], kv: KeyValues | WindowKeyValues,
                      valid: torch.Tensor) -> torch.Tensor:
        """``metric.in_box``: the inquiries' attention mass inside their own boxes (over their windows
        with :class:`WindowKeyValues`)."""
        inside = None
        if isinstance(kv, WindowKeyValues):
            padded, _ = pad_boxes([b.to(device=m.device, dtype=torch.float32) for b in boxes])
            inside = window_cells_in_boxes(padded, kv.rows, kv.cols, kv.grid[0][2])
        return attention_in_box_share(m, boxes, kv.grid, valid, inside)

    # -- loss scale -----------------------------------------------------------------------------
    def _sum_scale(self, input_hw: tuple[int, int], channels: int) -> tuple[float, float]:
        """(factor for channel-mean quantities to become the configured reduction, pixel-sum factor).

        The channel factor applies to ``L_others`` and the small-object foreground term (channel
        means in :func:`masked_feature_mse`, channel sums in the paper's formula), never to the
        attention-weighted term, which the paper itself defines as a mean over channels.
        """
        r = self.options.reduction
        if r == "mean":
            return 1.0, 0.0
        area_factor = REFERENCE_AREA / float(input_hw[0] * input_hw[1]) if r == "size_normalised" else 1.0
        return float(channels), area_factor

    # -- the losses -----------------------------------------------------------------------------
    def small_object_region(
        self,
        start: str,
        s_feat: torch.Tensor,
        small_boxes: list[torch.Tensor],
        fine_hw: tuple[int, int],
        k_fine: torch.Tensor,
        *,
        small_fg: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, int]:
        """The Inquiry Head on the student's level-``start`` map and the small-object region it gives
        at the next finer level (``fine_hw``, whose scale mask is ``k_fine``).

        ``small_fg``: the cells of ``small_boxes`` at the finer level (:func:`box_mask`), computed
        here when not given.

        Returns (the weighted Inquiry Head focal loss, or None without the head; ``Ms``: cells of small
        GT boxes UNION the head's candidate cells (``MAP_l > t``) widened to the finer level; ``Ks``:
        ``k_fine`` on GT cells, ``1/N_cand`` on candidate-only cells; the number of regions: small
        objects plus the images that have candidate-only cells).
        """
        o = self.options
        if small_fg is None:
            small_fg = box_mask(small_boxes, fine_hw, stride_of(finer_level(start)))
        n_small = sum(int(b.shape[0]) for b in small_boxes)
        if self.inquiry_heads is None:
            return None, small_fg, k_fine, n_small
        logits = self.inquiry_heads[start](s_feat)
        centers = [torch.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2), dim=-1) for b in small_boxes]
        target = inquiry_targets(centers, tuple(logits.shape[-2:]), stride_of(start), o.inquiry_radius)
        loss = o.inquiry_weight * inquiry_loss(logits, target)
        cand = widen_to_finer_level(candidate_cells(logits, o.inquiry_threshold), fine_hw)
        cand_only = cand & ~small_fg
        n_cand = cand_only.flatten(1).sum(1).clamp(min=1).to(k_fine.dtype)[:, None, None]
        k_small = torch.where(cand_only, 1.0 / n_cand, k_fine)
        return loss, small_fg | cand, k_small, n_small + int(cand_only.flatten(1).any(1).sum())

    def distill_losses(self, inputs: DistillInputs, iteration: int | None) -> dict[str, torch.Tensor]:
        o = self.options
        s_feats, t_feats = inputs.student.features, inputs.teacher_features
        pairs = [(start, finer_level(start)) for start in self.pairs]

        def hw(level: str) -> tuple[int, int]:
            return tuple(t_feats[level].shape[-2:])

        input_hw = tuple(inputs.student.tensors.shape[-2:])
        ch_factor, area_factor = self._sum_scale(input_hw, next(iter(t_feats.values())).shape[1])
        small_boxes = [b[s] for b, s in zip(inputs.boxes, inputs.small)]
        keep, keep_labels = self.inquiry_objects(inputs.boxes, inputs.labels, inputs.small)
        warm = iteration is not None and iteration < o.warmup_iters
        # the decoder's aux task (its only training signal): every step, or every aux_every-th;
        # never for a frozen (fitted) decoder
        run_aux = self.decoder_learns and (warm or iteration is None or iteration % o.aux_every == 0)
        matched = [(start, fine) for start, fine in pairs if start in self.decoders]
        # With reduction "mean" the per-image sum over objects becomes a mean over objects.
        n_img = max(1, len(inputs.boxes))
        per_obj = (lambda n: n_img / max(1.0, float(n))) if o.reduction == "mean" else (lambda n: 1.0)

        with record_function("hmkd.adapters"):
            adapted = {l: self.adapters[l](s_feats[l]) for l in self.adapters}
        with record_function("hmkd.masks"):
            masks = {l: fg_bg_masks(inputs.boxes, hw(l), stride_of(l)) for l in self.mask_levels}
            small_masks = {start: box_mask(small_boxes, hw(fine), stride_of(fine)) for start, fine in pairs}
        with record_function("hmkd.inquiry_head"):
            # Ms, Ks and the region count of each pair's small-object foreground (+ the head's loss)
            regions = {start: self.small_object_region(start, s_feats[start], small_boxes, hw(fine), masks[fine][1],
                                                       small_fg=small_masks[start])
                       for start, fine in pairs}

        # hierarchical matching: inquiries at `start`, keys/values at `fine` (teacher side); with
        # attention_window, a Windowed source whose keys/values each attention computes for its windows
        def key_source(start: str, fine: str):
            if o.attention_window is not None:
                return Windowed(t_feats[fine], input_hw, o.attention_window)
            return self.decoders[start].keys_values([t_feats[fine]], inputs.image_sizes, input_hw)

        kvs: dict[str, KeyValues | Windowed] = {}
        aux: dict[str, dict[str, torch.Tensor]] = {}
        with record_function("hmkd.decoder_aux"):
            for start, fine in matched if run_aux else ():
                # one key/value pass serves aux and distillation (full map)
                kvs[start] = key_source(start, fine)
                aux[start] = self.decoders[start].aux_loss(keep, keep_labels, inputs.image_sizes, kvs[start],
                                                           self._query_map(t_feats, start), stride_of(start))
        attention: dict[str, tuple[torch.Tensor, torch.Tensor, KeyValues | WindowKeyValues]] = {}
        in_box: dict[str, torch.Tensor] = {}
        with record_function("hmkd.decoder_attention"), torch.no_grad():  # m and O^T are targets: no graph
            for start, fine in matched if not warm else ():
                kv = kvs[start] if start in kvs else key_source(start, fine)
                m_att, valid, kv = self.decoders[start].attention(keep, keep_labels, inputs.image_sizes, kv,
                                                                  self._query_map(t_feats, start), stride_of(start))
                attention[start] = (m_att, valid, kv)
                in_box[start] = self._in_box_share(m_att, keep, kv, valid)

        # L_others: fg/bg-separated imitation on every distilled level (K makes it scale-free)
        others: dict[str, torch.Tensor] = {}
        with record_function("hmkd.others"):
            n_obj = sum(int(b.shape[0]) for b in inputs.boxes)
            for l in self.levels:
                m, k = masks[l]
                val = masked_feature_mse(adapted[l], t_feats[l], m, k, bg_weight=o.others_bg_weight)
                others[l] = o.beta * ch_factor * per_obj(n_obj) * val
        small_fg: dict[str, torch.Tensor] = {}
        with record_function("hmkd.small_fg"):
            for start, fine in pairs if o.small_foreground else ():
                _, ms, k_small, n_regions = regions[start]
                val = masked_feature_mse(adapted[fine], t_feats[fine], ms.to(k_small.dtype), k_small)
                small_fg[start] = o.beta * ch_factor * per_obj(n_regions) * val
        attn: dict[str, torch.Tensor] = {}
        out_metrics: dict[str, torch.Tensor] = {}
        with record_function("hmkd.attention_term"):
            for start, fine in matched if not warm else ():
                m_att, valid, kv = attention[start]
                if isinstance(kv, WindowKeyValues):  # the window cells' values only
                    v_s = self.value_proj[start](adapted[fine], kv.cells)
                    attn[start] = o.beta * attention_weighted_mse(m_att, v_s, kv.values.detach(), valid, index=kv.index)
                    continue
                v_t = kv.values
                cells = None
                if o.attention_cells is not None and o.attention_cells < m_att.shape[-1]:
                    # only the cells the real inquiries attend to most (the term is linear in m)
                    weight = (m_att * valid[:, None, :, None]).sum((1, 2))  # [B, U]
                    cells = weight.topk(o.attention_cells, dim=-1).indices  # [B, k]
                    kept = weight.gather(1, cells).sum() / weight.sum().clamp(min=1e-12)
                    out_metrics[f"{METRIC_PREFIX}attention_kept_{fine.lower()}"] = kept
                    heads, n = m_att.shape[1], m_att.shape[2]
                    m_att = m_att.gather(3, cells[:, None, None, :].expand(-1, heads, n, -1))
                    v_t = v_t.gather(2, cells[:, None, :, None].expand(-1, heads, -1, v_t.shape[-1]))
                v_s = self.value_proj[start](adapted[fine], cells)
                attn[start] = o.beta * attention_weighted_mse(m_att, v_s, v_t.detach(), valid)
        # supplemental (background) distillation with GcBlocks
        bg: dict[str, torch.Tensor] = {}
        with record_function("hmkd.gcblock_bg"):
            for l in self.levels if self.gc is not None else ():
                gc_t = self.gc_t[l] if self.gc_t is not None else None
                t = t_feats[l].detach()
                if o.reduction == "mean":
                    val = background_loss(t, adapted[l], self.gc[l], form=o.bg_form, gc_t=gc_t, reduction="mean")
                else:
                    val = background_loss(t, adapted[l], self.gc[l], form=o.bg_form, gc_t=gc_t, reduction="sum") * area_factor
                bg[l] = o.alpha * val

        # the logged dict, in a fixed order: others, then per pair, then the background terms
        out = {f"distill.others_{l.lower()}": v for l, v in others.items()}
        for start, fine in pairs:
            if regions[start][0] is not None:
                out[f"distill.inquiry_{start.lower()}"] = regions[start][0]
            if start in small_fg:
                out[f"distill.small_fg_{fine.lower()}"] = small_fg[start]
            for k, v in aux.get(start, {}).items():
                out[f"aux.{k}_{start.lower()}"] = v
            if start in attn:
                out[f"distill.small_attn_{fine.lower()}"] = attn[start]
            if start in in_box:
                out[f"{METRIC_PREFIX}in_box_{fine.lower()}"] = in_box[start]
            kept = f"{METRIC_PREFIX}attention_kept_{fine.lower()}"
            if kept in out_metrics:
                out[kept] = out_metrics[kept]
        out.update((f"distill.bg_{l.lower()}", v) for l, v in bg.items())
        return out
