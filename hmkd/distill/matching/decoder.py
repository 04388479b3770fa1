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
embedding; the padded cells are masked out of the attention
(:func:`~hmkd.distill.matching.positional.valid_cells`).
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
own optimiser (:func:`~hmkd.distill.matching.optim.decoder_optimizers`, from the
:class:`~hmkd.distill.matching.options.DecoderOptions` both methods share) with an optional cosine
schedule over the run (:func:`~hmkd.distill.matching.optim.decoder_schedulers`). The student side of
the imitation is :class:`~hmkd.distill.matching.projection.StudentValueProjection`.

Boxes are xyxy in pixels of the resized input frame; ``image_sizes`` are the per-image resized
(h, w) before batch padding (torchvision ``ImageList.image_sizes``); ``padded_hw`` is the padded
batch tensor's (H, W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmkd.distill.masks import pad_boxes, pad_by_image
from hmkd.distill.matching.positional import (absolute_pos_embed, absolute_sine_code, sine_box_encoding,
                                              sine_split_encoding, valid_cells, valid_extent_pos_embed)
from hmkd.distill.matching.task import (FAKE_KINDS, MAX_INQUIRIES_DEFAULT, AuxOutput, attention_in_box_loss,
                                        cells_in_boxes, sample_inquiries)

__all__ = ["ENCODINGS", "POSITION_CODES", "KeyValues", "MatchingDecoder", "WindowKeyValues", "Windowed", "scale_indicator",
           "split_heads", "window_cells", "window_cells_in_boxes"]

#: Inquiry encodings: ``icd`` (ICD's) and ``hmkd`` (the HMKD paper's reading).
ENCODINGS = ("icd", "hmkd")
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


class Windowed(NamedTuple):
    """Where an attention restricted to windows (``attention_window``) takes its keys and values: the
    key map, the padded batch's (H, W) and the window's side in cells. The decoder resolves it into a
    :class:`WindowKeyValues` once it knows the inquiries' centres (:meth:`MatchingDecoder.window_keys_values`)."""

    key_map: Tensor
    padded_hw: tuple[int, int]
    size: int


class WindowKeyValues(NamedTuple):
    """Keys and values of the cells inside some inquiry's window only (``attention_window``).

    Each inquiry attends over the ``K = kh x kw`` cells of its own window (``kh = min(size, h)``, the
    same for w) of one key map; the M distinct cells of all windows of the batch are projected once.

    Attributes:
        keys, values: [M, heads, c] of the distinct cells.
        index: long [B, N, K]: the row of ``keys``/``values`` of each inquiry's k-th window cell.
        pad: bool [B, N, K], True at window cells outside the image's valid (unpadded) extent.
        rows, cols: long [B, N, K]: each window cell's (row, column) in the key map.
        cells: long [M]: each distinct cell's flat index ``b * h * w + row * w + col``.
        grid: the key map's ((h, w, stride px),), as :attr:`KeyValues.grid`.
    """

    keys: Tensor
    values: Tensor
    index: Tensor
    pad: Tensor
    rows: Tensor
    cols: Tensor
    cells: Tensor
    grid: tuple[tuple[int, int, float], ...]


def window_cells(centres: Tensor, hw: tuple[int, int], stride: float, valid_hw: Tensor, size: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The cells of each inquiry's window: ``size x size`` cells (fewer where the map is smaller) around
    the cell holding its centre, shifted to lie inside its image's valid cells where they fit.

    Args:
        centres: [B, N, 2] (x, y) px of the inquiries (padded rows give windows callers ignore).
        hw: the key map's (h, w); ``stride``: its stride in px.
        valid_hw: long [B, 2]: each image's valid rows and columns of the map (:func:`valid_cells`' extent).
        size: the window's side in cells.

    Returns:
        rows, cols (long [B, N, kh * kw], raster order within the window) and pad (bool, True at
        cells outside the image's valid extent: only when that extent is smaller than the window).
    """
    h, w = int(hw[0]), int(hw[1])
    kh, kw = min(size, h), min(size, w)
    col = (centres[..., 0] / stride).floor().long().clamp(0, w - 1)  # [B, N]
    row = (centres[..., 1] / stride).floor().long().clamp(0, h - 1)
    vh, vw = valid_hw[:, 0, None], valid_hw[:, 1, None]  # [B, 1]
    y0 = torch.minimum((row - size // 2).clamp(min=0), (vh - kh).clamp(min=0))
    x0 = torch.minimum((col - size // 2).clamp(min=0), (vw - kw).clamp(min=0))
    dy = torch.arange(kh, device=centres.device).repeat_interleave(kw)  # raster order
    dx = torch.arange(kw, device=centres.device).repeat(kh)
    rows, cols = y0[..., None] + dy, x0[..., None] + dx  # [B, N, K]
    pad = (rows >= vh[..., None]) | (cols >= vw[..., None])
    return rows, cols, pad


def window_cells_in_boxes(boxes: Tensor, rows: Tensor, cols: Tensor, stride: float) -> Tensor:
    """Bool [B, N, K]: which of each inquiry's window cells its box covers, by the rule of
    :func:`~hmkd.distill.matching.task.cells_in_boxes` (the cell's centre in the box, or the cell
    holding the box's centre). ``boxes`` [B, N, 4] xyxy px; ``rows``/``cols`` from :func:`window_cells`."""
    x1, y1, x2, y2 = (t[..., None] for t in boxes.unbind(-1))
    yc, xc = (rows.to(boxes.dtype) + 0.5) * stride, (cols.to(boxes.dtype) + 0.5) * stride
    inside = (xc >= x1) & (xc < x2) & (yc >= y1) & (yc < y2)
    centre = (rows == ((y1 + y2) / 2 / stride).floor().long()) & (cols == ((x1 + x2) / 2 / stride).floor().long())
    return inside | centre


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

    def window_keys_values(self, source: Windowed, centres: Tensor, image_sizes: Sequence[tuple[int, int]]
                           ) -> WindowKeyValues:
        """Keys and values of the cells inside the windows of inquiries at ``centres`` ([B, N, 2] (x, y)
        px, padded per image) only: the distinct cells of all windows are gathered from the key map
        (detached), get their position code and are projected once (cost O(inquiries x window), not
        O(map)). The same code and projections as :meth:`keys_values`, so on a window as large as the
        map the attention is the full map's."""
        km = source.key_map.detach()
        b, c_in, h, w = km.shape
        padded_hw = source.padded_hw
        stride = (float(padded_hw[0]) / h + float(padded_hw[1]) / w) / 2.0
        valid_hw = self.valid_extent(image_sizes, (h, w), padded_hw, km.device)
        rows, cols, pad = window_cells(centres, (h, w), stride, valid_hw, source.size)
        img = torch.arange(b, device=km.device)[:, None, None]
        flat = (img * h + rows) * w + cols  # [B, N, K]
        cells, index = torch.unique(flat, return_inverse=True)
        x = km.flatten(2)[cells // (h * w), :, cells % (h * w)]  # [M, C], no copy of the map
        if self.position_code == "absolute":
            u = cells % (h * w)
            yx = torch.stack(((u // w).float() + 0.5, (u % w).float() + 0.5), dim=-1) * stride
            pe = absolute_sine_code(yx, self.hidden // 2, self.position_min_period)
        else:
            valid = valid_cells(image_sizes, (h, w), padded_hw, device=km.device) if self.padding_mask else \
                torch.ones(b, h, w, dtype=torch.bool, device=km.device)
            pe = valid_extent_pos_embed(valid, self.hidden, self.temperature).reshape(b * h * w, -1)[cells]
        keys = self.key_proj(x + self.pos_proj(pe.to(x.dtype)))
        values = self.value_proj(x)
        m = cells.shape[0]
        return WindowKeyValues(keys.reshape(m, self.heads, self.head_dim), values.reshape(m, self.heads, self.head_dim),
                               index, pad, rows, cols, cells, ((h, w, stride),))

    def valid_extent(self, image_sizes: Sequence[tuple[int, int]], hw: tuple[int, int], padded_hw: tuple[int, int],
                     device: torch.device | None = None) -> Tensor:
        """Long [B, 2]: each image's valid rows and columns of an h x w key map (as :func:`valid_cells`;
        the whole map without ``padding_mask``)."""
        h, w = int(hw[0]), int(hw[1])
        if not self.padding_mask:
            return torch.tensor([[h, w]] * len(image_sizes), device=device)
        stride = (float(padded_hw[0]) / h + float(padded_hw[1]) / w) / 2.0
        return torch.tensor([[min(h, math.ceil(float(ih) / stride)), min(w, math.ceil(float(iw) / stride))]
                             for ih, iw in image_sizes], device=device)

    def resolve(self, kv: KeyValues | WindowKeyValues | Windowed, centres: Tensor,
                image_sizes: Sequence[tuple[int, int]]) -> KeyValues | WindowKeyValues:
        """``kv`` itself, or a :class:`Windowed` source made into the keys and values of the windows of
        inquiries at ``centres`` [B, N, 2]."""
        return self.window_keys_values(kv, centres, image_sizes) if isinstance(kv, Windowed) else kv

    def attend(self, queries: Tensor, kv: KeyValues | WindowKeyValues) -> Tensor:
        """The layer's attention m [B, heads, Nq, U] of inquiries [B, Nq, hidden] (rows sum to 1,
        0 on padded positions); over each inquiry's own K window cells ([B, heads, Nq, K]) with
        :class:`WindowKeyValues`."""
        q = split_heads(self.query_proj(queries), self.heads)
        if isinstance(kv, WindowKeyValues):
            logits = torch.einsum("bhnc,bnkhc->bhnk", q, kv.keys[kv.index]) / math.sqrt(self.head_dim)
            return logits.masked_fill(kv.pad[:, None], float("-inf")).softmax(dim=-1)
        logits = torch.matmul(q, kv.keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if kv.pad is not None:
            logits = logits.masked_fill(kv.pad[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def layer(self, queries: Tensor, kv: KeyValues | WindowKeyValues, attention: Tensor | None = None) -> Tensor:
        """The decoder layer's output z [B, Nq, hidden] (module docstring). The attention runs in
        ``scaled_dot_product_attention`` (a fused kernel where one applies), unless ``attention``
        (:meth:`attend` of the same queries, when the caller needs it too) is given."""
        if isinstance(kv, WindowKeyValues):
            m = self.attend(queries, kv) if attention is None else attention
            att = torch.einsum("bhnk,bnkhc->bhnc", m, kv.values[kv.index])
        elif attention is None:
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
        """:meth:`build_inquiries` then :meth:`attend`: returns (m, values [B, heads, U, c], valid)
        (over full-map :class:`KeyValues`; :meth:`attention` takes windows too)."""
        m, valid, kv = self.attention(boxes, labels, image_sizes, kv, query_map, query_stride)
        return m, kv.values, valid

    def attention(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        kv: KeyValues | Windowed,
        query_map: Tensor | None = None,
        query_stride: int | None = None,
    ) -> tuple[Tensor, Tensor, KeyValues | WindowKeyValues]:
        """The objects' inquiries' attention: (m, valid, the keys and values it is over: ``kv``, or the
        :class:`WindowKeyValues` of the inquiries' windows when ``kv`` is :class:`Windowed`)."""
        queries, valid = self.build_inquiries(boxes, labels, image_sizes, query_map, query_stride)
        if isinstance(kv, Windowed):
            padded, _ = pad_boxes([bx.to(device=queries.device, dtype=torch.float32) for bx in boxes])
            kv = self.window_keys_values(kv, (padded[..., :2] + padded[..., 2:]) / 2, image_sizes)
        return self.attend(queries, kv), valid, kv

    # ------------------------------------------------------------------ auxiliary task
    def aux_task(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        kv: KeyValues | Windowed,
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
        With a :class:`Windowed` ``kv`` every inquiry (real or fake) attends over its own window
        around its (jittered) centre; the returned attention is then over those K cells.
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
        centres, _ = pad_by_image(ctr, img, n_img)
        kv = self.resolve(kv, centres, image_sizes)
        supervise = self.attention_supervision > 0
        m = self.attend(queries, kv) if supervise or keep_attention else None
        pred = self.predictor(self.layer(queries, kv, m)).float()  # [B, Nq, 5]; losses in float32 (AMP too)
        logit = pred[..., 0]
        ident = F.binary_cross_entropy_with_logits(logit[valid], real[valid].float())
        err = ((pred[..., 1:].sigmoid() - target).abs() / scale.clamp(min=1e-7)).sum(-1)
        loc = (err * real.float()).sum() / real.sum().clamp(min=1).float()
        losses = {"identification": ident, "localisation": loc}
        if supervise:
            if isinstance(kv, WindowKeyValues):
                inside = window_cells_in_boxes(box_pad, kv.rows, kv.cols, kv.grid[0][2])
            else:
                inside = cells_in_boxes(box_pad, kv.grid)
            losses["attention"] = self.attention_supervision * attention_in_box_loss(m, inside, real)
        displaced, _ = pad_by_image(s["displaced"], img, n_img)
        return AuxOutput(losses, queries, real, valid, logit.detach(), box_pad, centres, displaced,
                         pred[..., 1:].sigmoid().detach(), m.detach() if m is not None else None)

    def aux_loss(self, *args, **kwargs) -> dict[str, Tensor]:
        """:meth:`aux_task`'s losses only (same arguments)."""
        return self.aux_task(*args, **kwargs).losses
