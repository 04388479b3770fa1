"""The instance-conditional matching decoder shared by ICD and HMKD, and what goes with it.

ICD (Kang et al., NeurIPS 2021) introduced it; HMKD (Sec. 3.2.2, Fig. 3) uses it for its
hierarchical matching, "with reference to DETR". It is ONE post-norm transformer decoder layer
without self-attention between the inquiries (ICD's ``OfficialDecoderLayer``, ``ATT_LAYERS = 1``)::

    K = F_k(X + F_pe(P)),  O = F_v(X),  q_i = F_q(b_i)          split into N_m heads of c
    m_ij = softmax_j(k_j . q_ij / sqrt(c))                      padded positions excluded
    y_i  = LN(b_i + F_o(sum_j m_ij O_j))                          multi-head attention + out proj
    z_i  = LN(y_i + W_2 ReLU(W_1 y_i))                            FFN 4 x hidden, dropout 0

X is the concatenation (along positions) of the given key maps: HMKD passes the single level l-1
map, ICD all FPN levels. P is (``position_code``) DETR's normalised sine embedding of each map's
cells over each image's valid (unpadded) extent
(:func:`~hmkd.distill.matching.positional.valid_extent_pos_embed`, ICD's), or a sine code of the cells'
pixel coordinates with periods down to 2 strides (:func:`~hmkd.distill.matching.positional.absolute_pos_embed`),
whose code of the inquiry's centre is then also added to b_i through a linear layer; no level
embedding; the padded cells are masked out of the attention (:func:`valid_cells`).
The attention m (softmax over positions) and the values O are what the distillation uses; the
auxiliary heads read the layer's output z.

Inquiry encodings b_i (``encoding``):

- ``icd`` (ICD's ``InstanceEncoder``): MLP_3([one-hot class ; sine(cx') ; sine(cy') ; 10-d scale
  indicator]), the centre (cx', cy') normalised by the image size, 128 features per coordinate at
  hidden 256 (hidden/2), the indicator 5 width + 5 height bins of ~log2 of the box side in pixels;
- ``hmkd`` (the HMKD paper's reading): MLP_2([class embedding ; sine(cx, cy, w, h)]), plus
  Linear(teacher level-l feature bilinearly sampled at the centre) with ``query_feature``.

The decoder is trained only by its auxiliary task (:meth:`MatchingDecoder.aux_task`), ICD's: every
object's inquiry with its centre jittered by ``U(-j, j) x (w, h)``, plus ``fakes_per_real`` fake
inquiries per object (ICD's non-COCO sampler, or displaced copies of real inquiries:
:mod:`hmkd.distill.matching.task`); a shared
3-layer MLP on z predicts a real/fake logit (BCE over real + fake) and, through a sigmoid, the
distances from the jittered centre to the box's left/top/right/bottom edges in image-normalised
units (L1 divided by the box's normalised w or h, summed over the 4 sides, averaged over the real
inquiries); with ``attention_supervision`` also ``-log`` of the attention mass inside each real
inquiry's object (an extension beyond ICD and the paper). It never sends gradients into its input maps (they are detached inside). It has its
own optimiser (:func:`decoder_optimizers`, from the :class:`DecoderOptions` both methods share)
with an optional cosine schedule over the run (:func:`decoder_schedulers`). The student side of
the imitation is :class:`StudentValueProjection`.

Boxes are xyxy in pixels of the resized input frame; ``image_sizes`` are the per-image resized
(h, w) before batch padding (torchvision ``ImageList.image_sizes``); ``padded_hw`` is the padded
batch tensor's (H, W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmkd.allowed import allowed
from hmkd.distill.matching.task import FAKE_KINDS, attention_in_box_loss, cells_in_boxes, sample_inquiries
from hmkd.distill.masks import pad_by_image
from hmkd.distill.options import MethodOptions, refuse
from hmkd.distill.matching.positional import (
    absolute_pos_embed,
    absolute_sine_code,
    sine_box_encoding,
    sine_split_encoding,
    valid_extent_pos_embed,
)

__all__ = [
    "ENCODINGS",
    "POSITION_CODES",
    "AuxOutput",
    "DecoderOptions",
    "KeyValues",
    "MatchingDecoder",
    "StudentValueProjection",
    "decoder_optimizers",
    "decoder_schedulers",
    "scale_indicator",
    "split_heads",
    "valid_cells",
]

#: Inquiry encodings: ``icd`` (ICD's) and ``hmkd`` (the HMKD paper's reading).
ENCODINGS = ("icd", "hmkd")
#: Decoder learning-rate schedules: ``constant`` or ``cosine`` to 0 over the run (ICD's).
DECODER_SCHEDULES = ("constant", "cosine")
#: What a fitted decoder does during distillation: keeps learning (``joint``) or not (``frozen``).
DECODER_TRAINING = ("joint", "frozen")
#: ICD's ``MAX_LABELS`` (cap on real + fake inquiries per image): 100 for Faster/Mask R-CNN
#: (``RCNN_R_50_R101_icd_FPN_1x.yaml``, ``MaskRCNN_...``), 300 otherwise (``utils/build.py``).
MAX_INQUIRIES = {"faster_rcnn": 100, "mask_rcnn": 100}
MAX_INQUIRIES_DEFAULT = 300
#: Key/query position codes: ``normalised`` (DETR's over each image's valid extent, ICD's) or
#: ``absolute`` (pixel sine codes with cell-level resolution, :func:`absolute_sine_code`).
POSITION_CODES = ("normalised", "absolute")


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, U, hidden] -> [B, heads, U, hidden / heads]."""
    b, u, hidden = x.shape
    return x.reshape(b, u, heads, hidden // heads).transpose(1, 2)


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """``layers`` Linear layers with ReLU between them (ICD's ``MLP``)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            mods.append(nn.ReLU(inplace=True))
        mods.append(nn.Linear(a, b))
    return nn.Sequential(*mods)


def scale_indicator(wh_px: Tensor) -> Tensor:
    """ICD's 10-d scale indicator of boxes ``[N, 2]`` (w, h) in pixels: one-hot of
    ``clamp(floor(ln(side) * 1.44 - 5), 0, 4)`` (~ log2(side) - 5: < 64 px, 64-128, 128-256,
    256-512, >= 512) for the width, then the same 5 bins for the height."""
    bins = (wh_px.float().log() * 1.44 - 5.0).clamp(min=0.0, max=4.0).long()
    return F.one_hot(bins, 5).to(torch.float32).reshape(-1, 10)


def valid_cells(
    image_sizes: Sequence[tuple[int, int]],
    hw: tuple[int, int],
    padded_hw: tuple[int, int],
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool [B, h, w]: the cells of an h x w map of the padded (H, W) batch that hold image
    content (ICD's ``mask_out_padding``): with the stride estimated as ``(H/h + W/w) / 2``, the
    rows below ``ceil(img_h / stride)`` and the columns below ``ceil(img_w / stride)``."""
    h, w = int(hw[0]), int(hw[1])
    stride = (float(padded_hw[0]) / h + float(padded_hw[1]) / w) / 2.0
    rows = torch.tensor([math.ceil(float(ih) / stride) for ih, _ in image_sizes], device=device)
    cols = torch.tensor([math.ceil(float(iw) / stride) for _, iw in image_sizes], device=device)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    return (ys[None, :, None] < rows[:, None, None]) & (xs[None, None, :] < cols[:, None, None])


def _xavier_in_proj_(linears: Sequence[nn.Linear]) -> None:
    """Initialise q/k/v projections as slices of one xavier-uniform ``in_proj`` (as
    ``nn.MultiheadAttention`` and ICD's copy of it do: fan-out = 3 x hidden), biases 0."""
    fan_out = sum(lin.out_features for lin in linears)
    for lin in linears:
        bound = math.sqrt(6.0 / (lin.in_features + fan_out))
        nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(lin.bias)


class KeyValues(NamedTuple):
    """One step's keys and values of the key maps, shared by the aux task and the distillation.

    Attributes:
        keys, values: [B, heads, U, c].
        pad: bool [B, U], True at positions excluded from the attention (None: no mask).
        grid: per key map, (h, w, stride px), in the order the positions concatenate them.
    """

    keys: Tensor
    values: Tensor
    pad: Tensor | None
    grid: tuple[tuple[int, int, float], ...] = ()


@dataclass
class AuxOutput:
    """What :meth:`MatchingDecoder.aux_task` gives back.

    Attributes:
        losses: ``{"identification": BCE, "localisation": L1}``.
        queries: the encoded inquiries [B, Nq, hidden] (each image's real ones first, then its fakes;
            padded rows are 0), with their graph to the encoder.
        real: bool [B, Nq], True for real (object) inquiries.
        valid: bool [B, Nq], True for real and fake inquiries (False on padding).
        logits: the identification logits [B, Nq] (float32, detached).
        boxes: each inquiry's box [B, Nq, 4] px (a fake's own), ``centres`` [B, Nq, 2] its jittered
            position, ``displaced`` [B, Nq] bool its kind: what the quality measures read.
        localisation: the predicted (l, t, r, b) [B, Nq, 4] (image-normalised, detached).
        attention: the layer's attention [B, heads, Nq, U] when it was computed explicitly
            (``attention_supervision`` > 0), else None.
    """

    losses: dict[str, Tensor]
    queries: Tensor
    real: Tensor
    valid: Tensor
    logits: Tensor | None = None
    boxes: Tensor | None = None
    centres: Tensor | None = None
    displaced: Tensor | None = None
    localisation: Tensor | None = None
    attention: Tensor | None = None

    def real_queries(self) -> tuple[Tensor, Tensor]:
        """(queries [B, Nr, hidden], real [B, Nr]): the first Nr = max objects per image rows, where
        every image's real inquiries are (rows of fakes among them are False in ``real``)."""
        nr = int(self.real.sum(1).max()) if self.real.numel() else 0
        return self.queries[:, :nr], self.real[:, :nr]


class MatchingDecoder(nn.Module):
    """Instance-conditional decoder layer (ICD; HMKD's hierarchical matching), see the module docstring.

    Args:
        in_channels: channels C of the teacher maps (keys/values and the query map).
        num_classes: number of object classes K; labels are torchvision's 1..K (0: background,
            encoded as no class).
        hidden: attention width (multiple of 16 and of ``heads``).
        heads: number of heads N_m; per-head width c = hidden / heads.
        encoding: ``icd`` or ``hmkd`` (module docstring).
        query_feature: add Linear(C -> hidden) of the query map bilinearly sampled at each
            inquiry's centre (HMKD's "low-resolution, high-semantic" part).
        fakes_per_real: fake inquiries per object in the aux task.
        max_inquiries: cap on real + fake inquiries per image (never below its objects).
        jitter: the aux task's inquiry centres are shifted by ``U(-jitter, jitter) x (w, h)``.
        padding_mask: mask padded cells out of the attention and normalise the position embedding
            over each image's valid extent; False: every cell of the padded map is a position.
        temperature: sine-encoding temperature.
        fakes: the aux task's fake inquiries, ``random`` (ICD's), ``displaced`` or ``mixed``
            (:mod:`hmkd.distill.matching.task`).
        displacement: (low, high) of a displaced fake's move, in units of its box's (w, h).
        position_code: ``normalised`` (DETR's, ICD's) or ``absolute``: keys get the pixel sine
            code of their cell centres and every inquiry adds Linear(the same code of its centre),
            so that a query can single out the cells at its position.
        position_min_period: shortest period (px) of the ``absolute`` code (required with it;
            HMKD uses 2 x the key map's stride).
        attention_supervision: weight of :func:`attention_in_box_loss` in the aux task (0: off).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 256,
        heads: int = 8,
        *,
        encoding: str = "icd",
        query_feature: bool = False,
        fakes_per_real: int = 5,
        max_inquiries: int = MAX_INQUIRIES_DEFAULT,
        jitter: float = 0.3,
        padding_mask: bool = True,
        temperature: float = 10000.0,
        fakes: str = "random",
        displacement: tuple[float, float] = (1.5, 3.0),
        position_code: str = "normalised",
        position_min_period: float | None = None,
        attention_supervision: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden % 16 != 0:
            raise ValueError(f"MatchingDecoder: hidden must be a multiple of 16, got {hidden}")
        if hidden % heads != 0:
            raise ValueError(f"MatchingDecoder: heads ({heads}) must divide hidden ({hidden})")
        if encoding not in ENCODINGS:
            raise ValueError(f"MatchingDecoder: encoding must be one of {ENCODINGS}, got {encoding!r}")
        if fakes_per_real < 0 or max_inquiries < 1 or jitter < 0:
            raise ValueError(
                f"MatchingDecoder: need fakes_per_real >= 0, max_inquiries >= 1, jitter >= 0 "
                f"(got {fakes_per_real}, {max_inquiries}, {jitter})"
            )
        if fakes not in FAKE_KINDS:
            raise ValueError(f"MatchingDecoder: fakes must be one of {FAKE_KINDS}, got {fakes!r}")
        if position_code not in POSITION_CODES:
            raise ValueError(f"MatchingDecoder: position_code must be one of {POSITION_CODES}, got {position_code!r}")
        if position_code == "absolute" and not (position_min_period and position_min_period > 0):
            raise ValueError("MatchingDecoder: position_code 'absolute' needs position_min_period > 0 (px)")
        if not 0 <= displacement[0] <= displacement[1]:
            raise ValueError(f"MatchingDecoder: displacement must be (low, high) with 0 <= low <= high, got {displacement}")
        if attention_supervision < 0:
            raise ValueError(f"MatchingDecoder: attention_supervision must be >= 0, got {attention_supervision}")
        self.fakes = fakes
        self.displacement = (float(displacement[0]), float(displacement[1]))
        self.position_code = position_code
        self.position_min_period = float(position_min_period) if position_min_period else None
        self.attention_supervision = float(attention_supervision)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.encoding = encoding
        self.fakes_per_real = fakes_per_real
        self.max_inquiries = max_inquiries
        self.jitter = jitter
        self.padding_mask = padding_mask
        self.temperature = temperature

        # inquiry encoder
        if encoding == "icd":
            self.class_embed = None
            self.inquiry_mlp = _mlp(num_classes + hidden + 10, hidden, hidden, layers=3)
        else:
            self.class_embed = nn.Embedding(num_classes + 1, hidden // 2)
            self.inquiry_mlp = _mlp(hidden, hidden, hidden, layers=2)
        self.query_feat_proj = nn.Linear(in_channels, hidden) if query_feature else None
        self.query_pos_proj = nn.Linear(hidden, hidden) if position_code == "absolute" else None
        # the decoder layer: attention projections (F_pe, F_k, F_v, F_q), out projection, FFN, norms
        self.pos_proj = nn.Linear(hidden, in_channels)
        self.query_proj = nn.Linear(hidden, hidden)
        self.key_proj = nn.Linear(in_channels, hidden)
        self.value_proj = nn.Linear(in_channels, hidden)
        _xavier_in_proj_([self.query_proj, self.key_proj, self.value_proj])
        self.out_proj = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.out_proj.bias)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        # auxiliary predictor: [identification logit, l, t, r, b]
        self.predictor = _mlp(hidden, hidden, 5, layers=3)

    def reset_parameters(self) -> None:
        """Initialise every parameter afresh from the current random stream (as at construction: each
        layer's own init, then the q/k/v projections as slices of one xavier ``in_proj``)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        _xavier_in_proj_([self.query_proj, self.key_proj, self.value_proj])
        nn.init.zeros_(self.out_proj.bias)

    @property
    def query_feature(self) -> bool:
        return self.query_feat_proj is not None

    # ------------------------------------------------------------------ inquiries
    def _encode(
        self,
        centres: Tensor,
        wh: Tensor,
        labels: Tensor,
        img: Tensor,
        sizes_hw: Tensor,
        query_map: Tensor | None,
        query_stride: int | None,
        feature_centres: Tensor | None = None,
    ) -> Tensor:
        """Inquiries [N, hidden] of centres [N, 2] and sides [N, 2] (px) of images ``img`` [N]; the
        query feature is read at ``feature_centres`` (default: the centres)."""
        img_wh = sizes_hw[img].flip(-1).to(centres.dtype)  # [N, 2] as (w, h)
        c_norm = centres / img_wh
        if self.encoding == "icd":
            onehot = F.one_hot(labels.long(), self.num_classes + 1)[:, 1:].to(torch.float32)
            delta = torch.cat(
                (onehot, sine_split_encoding(c_norm, self.hidden // 2, self.temperature), scale_indicator(wh)), dim=-1
            )
        else:
            norm = torch.cat((c_norm, wh / img_wh), dim=-1).clamp(0.0, 1.0)
            delta = torch.cat(
                (self.class_embed(labels.long()), sine_box_encoding(norm, self.hidden // 2, self.temperature)),
                dim=-1,
            )
        q = self.inquiry_mlp(delta.to(self.out_proj.weight.dtype))
        if self.query_pos_proj is not None:
            code = absolute_sine_code(centres.flip(-1), self.hidden // 2, self.position_min_period)  # (y, x) as the keys
            q = q + self.query_pos_proj(code.to(q.dtype))
        if self.query_feat_proj is not None:
            if query_map is None or query_stride is None:
                raise ValueError("MatchingDecoder: query_feature=True needs query_map and query_stride")
            qm = query_map.detach()
            hq, wq = qm.shape[-2:]
            n = centres.shape[0]
            at = centres if feature_centres is None else feature_centres
            # align_corners=False: -1/+1 are the outer edges of the padded map; a centre at
            # pixel p lies at map coordinate p / stride (cell x spans [x, x+1)).
            gx = 2.0 * at[:, 0] / (query_stride * wq) - 1.0
            gy = 2.0 * at[:, 1] / (query_stride * hq) - 1.0
            grid = qm.new_zeros(qm.shape[0], n, 1, 2)
            # each image samples only its own inquiries: put them at their own row, others at 0
            rows = torch.arange(n, device=centres.device)
            grid[img, rows, 0] = torch.stack((gx, gy), dim=-1).to(qm.dtype)
            sampled = F.grid_sample(qm, grid, mode="bilinear", padding_mode="border", align_corners=False)
            q = q + self.query_feat_proj(sampled[img, :, rows, 0])
        return q

    def _flatten(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
        if not (len(boxes) == len(labels) == len(image_sizes)):
            raise ValueError(
                f"MatchingDecoder: {len(boxes)} box lists, {len(labels)} label lists, "
                f"{len(image_sizes)} image sizes"
            )
        device = self.out_proj.weight.device
        counts = [int(b.shape[0]) for b in boxes]
        flat_boxes = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device=device, dtype=torch.float32)
        flat_labels = torch.cat([lab.reshape(-1) for lab in labels]).to(device=device, dtype=torch.long)
        img = torch.repeat_interleave(torch.arange(len(boxes), device=device), torch.tensor(counts, device=device))
        sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], device=device, dtype=torch.float32)
        return flat_boxes, flat_labels, img, sizes, counts

    def build_inquiries(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        query_map: Tensor | None = None,
        query_stride: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Every object's inquiry at its own (un-jittered) box, padded per image.

        Args:
            boxes: per image [N_b, 4] xyxy in input pixels (N_b may be 0).
            labels: per image [N_b] class indices in [0, num_classes].
            image_sizes: per image resized (h, w); centres are normalised by them.
            query_map: teacher's level-l map [B, C, H, W] (needed when ``query_feature``).
            query_stride: stride of ``query_map`` in input pixels.

        Returns:
            queries [B, Nq, hidden] (Nq = max N_b; padded rows are 0) and valid [B, Nq] bool.
        """
        gt, lab, img, sizes, _ = self._flatten(boxes, labels, image_sizes)
        centres = (gt[:, :2] + gt[:, 2:]) / 2
        enc = self._encode(centres, gt[:, 2:] - gt[:, :2], lab, img, sizes, query_map, query_stride)
        return pad_by_image(enc, img, len(boxes))

    def sample_inquiries(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The aux task's real + fake inquiries of a batch (:func:`~hmkd.distill.matching.task.sample_inquiries`
        with this decoder's ``fakes``, ``displacement``, ``fakes_per_real``, cap and ``jitter``)."""
        gt, lab, img, sizes, counts = self._flatten(boxes, labels, image_sizes)
        return sample_inquiries(gt, lab, img, sizes, counts, num_classes=self.num_classes,
                                fakes_per_real=self.fakes_per_real, cap=self.max_inquiries, jitter=self.jitter,
                                fakes=self.fakes, displacement=self.displacement, generator=generator)

    # ------------------------------------------------------------------ attention
    def keys_values(
        self,
        key_maps: list[Tensor],
        image_sizes: Sequence[tuple[int, int]] | None = None,
        padded_hw: tuple[int, int] | None = None,
    ) -> KeyValues:
        """Keys, values (and the padding mask) of the concatenated key maps (detached inside).
        Compute them once per step and pass them to :meth:`aux_task` and :meth:`forward`.

        ``image_sizes`` and ``padded_hw`` (the padded batch's H, W) locate each image's valid cells;
        they are needed with ``padding_mask`` (the default).
        """
        if len(key_maps) == 0:
            raise ValueError("MatchingDecoder: key_maps is empty")
        if self.padding_mask and (image_sizes is None or padded_hw is None):
            raise ValueError("MatchingDecoder: padding_mask needs image_sizes and padded_hw")
        if self.position_code == "absolute" and padded_hw is None:
            raise ValueError("MatchingDecoder: position_code 'absolute' needs padded_hw")
        xs, pes, pads, grid = [], [], [], []
        for km in key_maps:  # loop over a handful of FPN levels
            km = km.detach()
            b, _, h, w = km.shape
            xs.append(km.flatten(2).transpose(1, 2))  # [B, hw, C]
            if self.padding_mask:
                valid = valid_cells(image_sizes, (h, w), padded_hw, device=km.device)
            else:
                valid = torch.ones(b, h, w, dtype=torch.bool, device=km.device)
            stride = (float(padded_hw[0]) / h + float(padded_hw[1]) / w) / 2.0 if padded_hw is not None else 1.0
            grid.append((h, w, stride))
            if self.position_code == "absolute":
                pe = absolute_pos_embed(b, (h, w), stride, self.hidden, self.position_min_period, device=km.device)
            else:
                pe = valid_extent_pos_embed(valid, self.hidden, self.temperature)
            pes.append(pe.to(km.dtype))
            pads.append(~valid.flatten(1))
        x = torch.cat(xs, dim=1)  # [B, U, C]
        pos = torch.cat(pes, dim=1)  # [B, U, hidden]
        keys = self.key_proj(x + self.pos_proj(pos))
        values = self.value_proj(x)
        pad = torch.cat(pads, dim=1) if self.padding_mask else None
        return KeyValues(split_heads(keys, self.heads), split_heads(values, self.heads), pad, tuple(grid))

    def attend(self, queries: Tensor, kv: KeyValues) -> Tensor:
        """The layer's attention m [B, heads, Nq, U] of inquiries [B, Nq, hidden] (rows sum to 1,
        0 on padded positions)."""
        q = split_heads(self.query_proj(queries), self.heads)
        logits = torch.matmul(q, kv.keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if kv.pad is not None:
            logits = logits.masked_fill(kv.pad[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def layer(self, queries: Tensor, kv: KeyValues, attention: Tensor | None = None) -> Tensor:
        """The decoder layer's output z [B, Nq, hidden] (module docstring). The attention runs in
        ``scaled_dot_product_attention`` (a fused kernel where one applies), unless ``attention``
        (:meth:`attend` of the same queries, when the caller needs it too) is given."""
        if attention is None:
            q = split_heads(self.query_proj(queries), self.heads)
            mask = None if kv.pad is None else ~kv.pad[:, None, None, :]
            att = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=mask)  # [B, heads, Nq, c]
        else:
            att = torch.matmul(attention, kv.values)
        y = self.norm1(queries + self.out_proj(att.transpose(1, 2).flatten(2)))
        return self.norm2(y + self.ffn_out(F.relu(self.ffn_in(y))))

    def forward(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        kv: KeyValues,
        query_map: Tensor | None = None,
        query_stride: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`build_inquiries` then :meth:`attend`: returns (m, values [B, heads, U, c], valid)."""
        queries, valid = self.build_inquiries(boxes, labels, image_sizes, query_map, query_stride)
        return self.attend(queries, kv), kv.values, valid

    # ------------------------------------------------------------------ auxiliary task
    def aux_task(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        kv: KeyValues,
        query_map: Tensor | None = None,
        query_stride: int | None = None,
        *,
        generator: torch.Generator | None = None,
        keep_attention: bool = False,
    ) -> AuxOutput:
        """ICD's auxiliary task that trains the decoder (teacher side only).

        Inquiries from :meth:`sample_inquiries`; the predictor on the layer's output z gives a
        real/fake logit and (sigmoid) the distances (l, t, r, b) from the jittered centre to the
        box's edges, normalised by the image's (w, h, w, h). Losses (ICD's ``InstanceEncoder.loss``):

        - identification: BCE with logits, target 1 for real and 0 for fake, mean over every
          (real + fake) inquiry of the batch;
        - localisation: ``sum_{l,t,r,b} |pred - target| / (w, h, w, h)`` (the box's normalised
          width for l and r, height for t and b), summed over the real inquiries of the batch and
          divided by their count (0 without objects);
        - attention (with ``attention_supervision`` > 0, times it): :func:`attention_in_box_loss`
          of the real inquiries over the key cells of their boxes.

        ``keep_attention``: compute the attention explicitly and return it (for the quality measures).
        """
        s = self.sample_inquiries(boxes, labels, image_sizes, generator)
        bx, ctr, img = s["boxes"], s["centres"], s["img"]
        enc = self._encode(ctr, bx[:, 2:] - bx[:, :2], s["labels"], img, s["sizes"], query_map, query_stride,
                           feature_centres=s["feature_centres"])
        n_img = len(boxes)
        queries, valid = pad_by_image(enc, img, n_img)
        real, _ = pad_by_image(s["real"], img, n_img)
        img_wh = s["sizes"][img].flip(-1).repeat(1, 2)  # (w, h, w, h)
        target = torch.cat((ctr - bx[:, :2], bx[:, 2:] - ctr), dim=-1) / img_wh  # l, t, r, b
        scale = (bx[:, 2:] - bx[:, :2]).repeat(1, 2) / img_wh  # w, h, w, h
        target, _ = pad_by_image(target, img, n_img)
        scale, _ = pad_by_image(scale, img, n_img)

        box_pad, _ = pad_by_image(bx, img, n_img)
        supervise = self.attention_supervision > 0
        m = self.attend(queries, kv) if supervise or keep_attention else None
        pred = self.predictor(self.layer(queries, kv, m)).float()  # [B, Nq, 5]; losses in float32 (AMP too)
        logit = pred[..., 0]
        ident = F.binary_cross_entropy_with_logits(logit[valid], real[valid].float())
        err = ((pred[..., 1:].sigmoid() - target).abs() / scale.clamp(min=1e-7)).sum(-1)
        loc = (err * real.float()).sum() / real.sum().clamp(min=1).float()
        losses = {"identification": ident, "localisation": loc}
        if supervise:
            inside = cells_in_boxes(box_pad, kv.grid)
            losses["attention"] = self.attention_supervision * attention_in_box_loss(m, inside, real)
        centres, _ = pad_by_image(ctr, img, n_img)
        displaced, _ = pad_by_image(s["displaced"], img, n_img)
        return AuxOutput(losses, queries, real, valid, logit.detach(), box_pad, centres, displaced,
                         pred[..., 1:].sigmoid().detach(), m.detach() if m is not None else None)

    def aux_loss(self, *args, **kwargs) -> dict[str, Tensor]:
        """:meth:`aux_task`'s losses only (same arguments)."""
        return self.aux_task(*args, **kwargs).losses


class StudentValueProjection(nn.Module):
    """Student-side value projection F_v^S: Linear(C -> hidden) per position, split into heads,
    the counterpart of the decoder's ``value_proj`` on the student maps.

    Args:
        in_channels: channels C of the student map (ICD: the raw student FPN map; HMKD: the adapted one).
        hidden: width (must match the decoder's hidden).
        heads: number of heads (must match the decoder's heads).
        init: ``default`` (PyTorch's Linear init) or ``attention``: the value slice of a fresh
            xavier-uniform ``in_proj`` with bias 0, as ICD's student-side decoder (fan-out 3 x hidden).
    """

    def __init__(self, in_channels: int, hidden: int = 256, heads: int = 8, init: str = "default") -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"StudentValueProjection: heads ({heads}) must divide hidden ({hidden})")
        if init not in ("default", "attention"):
            raise ValueError(f"StudentValueProjection: init must be 'default' or 'attention', got {init!r}")
        self.heads = heads
        self.proj = nn.Linear(in_channels, hidden)
        if init == "attention":
            bound = math.sqrt(6.0 / (in_channels + 3 * hidden))
            nn.init.uniform_(self.proj.weight, -bound, bound)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor | list[Tensor], cells: Tensor | None = None) -> Tensor:
        """Map [B, C, H, W] (or a list of maps, concatenated along positions in order, as the
        decoder does for its key maps) -> values [B, heads, U, hidden/heads]; with ``cells``
        ([B, k] position indices) only those positions are projected: [B, heads, k, hidden/heads]."""
        maps = [x] if isinstance(x, Tensor) else list(x)
        flat = torch.cat([mp.flatten(2).transpose(1, 2) for mp in maps], dim=1)  # [B, U, C]
        if cells is not None:
            flat = flat.gather(1, cells[..., None].expand(-1, -1, flat.shape[-1]))
        return split_heads(self.proj(flat), self.heads)


@dataclass
class DecoderOptions(MethodOptions):
    """The options of a method with a matching decoder (ICD, HMKD); each method sets its own defaults.

    Attributes:
        heads, hidden: decoder heads N_m and attention width (ICD and the HMKD paper: 8, 256).
        encoding: inquiry encoding, ``icd`` or ``hmkd`` (see :mod:`hmkd.distill.matching.decoder`).
        fakes_per_real: fake inquiries per object in the aux task (ICD: 5).
        max_inquiries: cap on real + fake inquiries per image (None: ICD's ``MAX_LABELS`` of the
            student's family, 100 for Faster/Mask R-CNN, 300 otherwise).
        jitter: the aux task's inquiry centres move by ``U(-jitter, jitter)`` x (w, h) (ICD: 0.3).
        padding_mask: mask padded cells out of the attention, position embedding normalised over
            each image's valid extent (ICD and DETR: on).
        decoder_lr, decoder_weight_decay: the decoder's own AdamW (ICD: 1e-4 / 1e-4; the HMKD
            paper's 1e-3 / 1e-3 is in ``configs/coco/base_hmkd.yaml``).
        decoder_clip: max L2 norm its gradients are clipped to, jointly (None: no clipping).
        decoder_schedule: ``constant`` or ``cosine`` (to 0 over the run, ICD's).
        fakes: the aux task's fake inquiries: ``random`` (ICD's), ``displaced`` (a real object's
            inquiry moved outside its box) or ``mixed`` (half each); see
            :mod:`hmkd.distill.matching.task`.
        displacement: [low, high] of a displaced fake's move in units of its box's (w, h).
        position_code: ``normalised`` (DETR's, ICD's) or ``absolute`` (pixel sine codes with
            cell-level resolution on keys and inquiries).
        attention_supervision: weight of the direct supervision of the attention towards the
            object's cells in the aux task (an extension beyond ICD and the paper; 0: off).
        decoder_fit: ``none`` (the decoder starts untrained and learns during distillation, as ICD
            and the paper train it), ``auto`` (fit it on the frozen teacher alone before
            distilling, cached by teacher, options and data, and reused), or the path of a file
            ``hmkd fit-decoder`` wrote.
        decoder_training: with a fitted decoder, ``joint`` (it keeps learning its task during
            distillation, warm-started) or ``frozen`` (no aux task, no decoder optimiser).
        fit_iters, fit_lr: the fit's iterations and its constant AdamW learning rate (None:
            ``decoder_lr``); batches are the config's training batches.
    """

    heads: int = allowed(8, ge=1)
    hidden: int = allowed(256, ge=16, multiple_of=16, words="a positive multiple of 16")
    encoding: str = allowed("icd", one_of=ENCODINGS)
    fakes_per_real: int = allowed(5, ge=0)
    max_inquiries: int | None = allowed(None, ge=1)
    jitter: float = allowed(0.3, ge=0)
    padding_mask: bool = True
    decoder_lr: float = allowed(1e-4, gt=0)
    decoder_weight_decay: float = allowed(1e-4, ge=0)
    decoder_clip: float | None = allowed(1.0, gt=0)
    decoder_schedule: str = allowed("constant", one_of=DECODER_SCHEDULES)
    fakes: str = allowed("random", one_of=FAKE_KINDS)
    displacement: list[float] = allowed(factory=lambda: [1.5, 3.0], ge=0, length=2, ordered=True,
                                        words="[low, high] with 0 <= low <= high")
    position_code: str = allowed("normalised", one_of=POSITION_CODES)
    attention_supervision: float = allowed(0.0, ge=0)
    decoder_fit: str = "none"  # none | auto | a file: checked in check()
    decoder_training: str = allowed("joint", one_of=DECODER_TRAINING)
    fit_iters: int = allowed(600, ge=1)
    fit_lr: float | None = allowed(None, gt=0)

    def check(self) -> None:
        super().check()
        if self.hidden % self.heads:
            refuse("heads", f"a divisor of hidden ({self.hidden})", self.heads)
        if not isinstance(self.decoder_fit, str) or not self.decoder_fit:
            refuse("decoder_fit", "none, auto or the path of a fitted decoder", self.decoder_fit)
        if self.decoder_training == "frozen" and self.decoder_fit == "none":
            refuse("decoder_training", "joint when decoder_fit is none (a frozen untrained decoder attends at random)",
                   self.decoder_training)

    @property
    def frozen(self) -> bool:
        """The decoder is fitted beforehand and does not learn during distillation."""
        return self.decoder_training == "frozen"

    def decoder_kwargs(self) -> dict:
        """The :class:`MatchingDecoder` arguments these options set (its task and codes)."""
        return dict(hidden=self.hidden, heads=self.heads, encoding=self.encoding, fakes_per_real=self.fakes_per_real,
                    jitter=self.jitter, padding_mask=self.padding_mask, fakes=self.fakes,
                    displacement=tuple(self.displacement), position_code=self.position_code,
                    attention_supervision=self.attention_supervision)

    def inquiry_cap(self, detector_kind: str) -> int:
        """``max_inquiries``, or ICD's default for a student of ``detector_kind``."""
        if self.max_inquiries is not None:
            return self.max_inquiries
        return MAX_INQUIRIES.get(detector_kind, MAX_INQUIRIES_DEFAULT)


def decoder_optimizers(
    groups: dict[str, nn.Module | Sequence[nn.Module]], options: DecoderOptions
) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
    """``(name, AdamW, clip)``: one optimiser per entry of ``groups``, over all its modules' parameters
    (clipped jointly at ``decoder_clip``); what a decoder method returns from ``make_extra_optimizers``."""
    o = options
    out = []
    for name, mods in groups.items():
        mods = [mods] if isinstance(mods, nn.Module) else list(mods)
        params = [p for m in mods for p in m.parameters()]
        out.append((name, torch.optim.AdamW(params, lr=o.decoder_lr, weight_decay=o.decoder_weight_decay), o.decoder_clip))
    return out


def decoder_schedulers(
    optimizers: Sequence[tuple[str, torch.optim.Optimizer, float | None]], options: DecoderOptions, total_iters: int
) -> list[tuple[str, torch.optim.lr_scheduler.LRScheduler]]:
    """``(name, LambdaLR)`` per decoder optimiser: ``decoder_schedule`` over ``total_iters``
    (``cosine``: ``0.5 (1 + cos(pi i / total_iters))``, no warm-up, as ICD's ``WarmupCosineLR``
    with its 10 warm-up iterations at factor 1; ``constant``: 1); stepped once per iteration."""
    from hmkd.engine.optim import WarmupSchedule  # the trainer's own multiplier (picklable)

    return [
        (name, torch.optim.lr_scheduler.LambdaLR(opt, WarmupSchedule(total_iters, schedule=options.decoder_schedule)))
        for name, opt, _ in optimizers
    ]
