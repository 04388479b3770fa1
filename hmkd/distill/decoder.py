"""The instance-conditional matching decoder shared by ICD and HMKD, and what goes with it.

ICD (Kang et al., NeurIPS 2021) introduced it; HMKD (Sec. 3.2.2, Fig. 3) uses it for its
hierarchical matching. Inquiries (one per object) attend over the teacher's key/value maps::

    b_i   = MLP([class_emb(label_i) ; sine(cx, cy, w, h)]) (+ Linear(T_l sampled at the centre))
    K     = F_k(X + F_pe(V)),  O = F_v(X),  q_i = F_q(b_i)         split into N_m heads of c
    m_ij  = softmax_U(k_j . q_ij / sqrt(c))

X is the concatenation (along positions) of the given key maps: HMKD passes the single level
l-1 map, the ICD baseline passes all FPN levels. V is a 2-D sine positional embedding per map
plus a learned per-map level embedding when more than one map is given.

The decoder is trained only by the ICD-style auxiliary task (:meth:`MatchingDecoder.aux_loss`),
on the teacher side: it never sends gradients into its input maps (they are detached inside). It
has its own optimiser (:func:`decoder_optimizers`, from the :class:`DecoderOptions` both methods
share). The student side of the imitation is :class:`StudentValueProjection`.

Boxes are xyxy in pixels of the resized input frame; ``image_sizes`` are the per-image resized
(h, w) before batch padding (torchvision ``ImageList.image_sizes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmkd.distill.masks import pad_by_image
from hmkd.distill.options import MethodOptions, refuse
from hmkd.distill.positional import sine_box_encoding, sine_pos_embed_2d

__all__ = [
    "DecoderOptions",
    "MatchingDecoder",
    "StudentValueProjection",
    "decoder_optimizers",
    "split_heads",
]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, U, hidden] -> [B, heads, U, hidden / heads]."""
    b, u, hidden = x.shape
    return x.reshape(b, u, heads, hidden // heads).transpose(1, 2)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def _xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def _attend_values(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """``softmax(q k^T / sqrt(c)) v`` with c = q's width, for v wider than q and k.

    The fused (flash) kernels, CPU included, need q, k and v of one width; with a wider v
    PyTorch falls back to the math kernel, which materialises the [B, heads, Nq, U] attention
    and keeps it (and its softmax) for backward. Zero columns appended to q and k leave every
    logit unchanged (the scale is passed explicitly), so the result is the same up to
    float summation order while the fused kernel never stores the attention matrix.
    """
    c = q.shape[-1]
    extra = v.shape[-1] - c
    if extra > 0:
        q, k = F.pad(q, (0, extra)), F.pad(k, (0, extra))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0 / math.sqrt(c))


class MatchingDecoder(nn.Module):
    """Instance-conditional multi-head attention decoder (ICD; HMKD's hierarchical matching).

    Args:
        in_channels: channels C of the teacher maps (keys/values and the query map).
        num_classes: number of object classes K. Labels index ``nn.Embedding(K + 1, hidden/2)``
            directly, so they must lie in [0, K] (torchvision convention: 1..K objects, 0
            background; padded inquiries use 0).
        hidden: attention width (multiple of 16 and of ``heads``).
        heads: number of heads N_m; per-head width c = hidden / heads.
        query_feature: add Linear(C -> hidden) of the query map bilinearly sampled at each box
            centre to the inquiry (the "low-resolution, high-semantic" part of HMKD).
        fakes_per_real: fake inquiries per real object in :meth:`aux_loss`.
        max_key_maps: size of the learned level-embedding table (ICD passes up to 5 levels).
        real_jitter: relative jitter of the real inquiries' boxes in :meth:`aux_loss`.
        fake_size_jitter: fake box sides are real sides scaled by ``exp(U(-j, j))``.
        temperature: sine-encoding temperature.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 256,
        heads: int = 8,
        query_feature: bool = True,
        fakes_per_real: int = 3,
        *,
        max_key_maps: int = 8,
        real_jitter: float = 0.1,
        fake_size_jitter: float = 0.5,
        temperature: float = 10000.0,
    ) -> None:
        super().__init__()
        if hidden % 16 != 0:
            raise ValueError(f"MatchingDecoder: hidden must be a multiple of 16, got {hidden}")
        if hidden % heads != 0:
            raise ValueError(f"MatchingDecoder: heads ({heads}) must divide hidden ({hidden})")
        if fakes_per_real < 0:
            raise ValueError(f"MatchingDecoder: fakes_per_real must be >= 0, got {fakes_per_real}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.query_feature = query_feature
        self.fakes_per_real = fakes_per_real
        self.real_jitter = real_jitter
        self.fake_size_jitter = fake_size_jitter
        self.temperature = temperature

        # inquiry encoder
        self.class_embed = nn.Embedding(num_classes + 1, hidden // 2)
        self.inquiry_mlp = _mlp(hidden, hidden, hidden)  # F_b
        self.query_feat_proj = nn.Linear(in_channels, hidden) if query_feature else None
        # attention projections
        self.pos_proj = nn.Linear(hidden, in_channels)  # F_pe
        self.level_embed = nn.Parameter(torch.empty(max_key_maps, hidden))
        nn.init.normal_(self.level_embed)
        self.key_proj = nn.Linear(in_channels, hidden)  # F_k
        self.value_proj = nn.Linear(in_channels, hidden)  # F_v
        self.query_proj = nn.Linear(hidden, hidden)  # F_q
        # auxiliary heads
        self.ident_head = _mlp(hidden, hidden, 1)
        # localisation sees what was attended, WHERE it was (attended positional embedding) and
        # the inquiry itself: values carry no position, so offsets need the other two.
        self.loc_head = _mlp(3 * hidden, hidden, 4)

    # ------------------------------------------------------------------ inquiries
    def _encode(
        self,
        boxes: Tensor,
        labels: Tensor,
        img: Tensor,
        sizes_hw: Tensor,
        query_map: Tensor | None,
        query_stride: int | None,
    ) -> Tensor:
        """Encode flat boxes [N,4] xyxy px of images ``img`` [N] into inquiries [N, hidden]."""
        wh = sizes_hw[img].flip(-1).to(boxes.dtype)  # [N, 2] as (w, h)
        cxcywh = _xyxy_to_cxcywh(boxes)
        norm = (cxcywh / torch.cat((wh, wh), dim=-1)).clamp(0.0, 1.0)
        delta = torch.cat(
            (self.class_embed(labels.long()), sine_box_encoding(norm, self.hidden // 2, self.temperature)),
            dim=-1,
        )
        q = self.inquiry_mlp(delta.to(self.class_embed.weight.dtype))
        if self.query_feat_proj is not None:
            if query_map is None or query_stride is None:
                raise ValueError("MatchingDecoder: query_feature=True needs query_map and query_stride")
            qm = query_map.detach()
            hq, wq = qm.shape[-2:]
            # align_corners=False: -1/+1 are the outer edges of the padded map; a centre at
            # pixel p lies at map coordinate p / stride (cell x spans [x, x+1)).
            gx = 2.0 * cxcywh[:, 0] / (query_stride * wq) - 1.0
            gy = 2.0 * cxcywh[:, 1] / (query_stride * hq) - 1.0
            grid = qm.new_zeros(qm.shape[0], boxes.shape[0], 1, 2)
            # each image samples only its own boxes: put them at their own row, others at 0
            grid[img, torch.arange(boxes.shape[0], device=boxes.device), 0] = torch.stack(
                (gx, gy), dim=-1
            ).to(qm.dtype)
            sampled = F.grid_sample(qm, grid, mode="bilinear", padding_mode="border", align_corners=False)
            feat = sampled[img, :, torch.arange(boxes.shape[0], device=boxes.device), 0]  # [N, C]
            q = q + self.query_feat_proj(feat)
        return q

    def build_inquiries(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
        query_map: Tensor | None = None,
        query_stride: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode every object as an inquiry b_i, padded per image.

        Args:
            boxes: per image [N_b, 4] xyxy in input pixels (N_b may be 0).
            labels: per image [N_b] class indices in [0, num_classes].
            image_sizes: per image resized (h, w); boxes are normalised by them.
            query_map: teacher's level-l map [B, C, H, W] (needed when ``query_feature``).
            query_stride: stride of ``query_map`` in input pixels.

        Returns:
            queries [B, Nq, hidden] (Nq = max N_b; padded rows are finite but meaningless) and
            valid [B, Nq] bool.
        """
        flat_boxes, flat_labels, img, sizes = self._flatten(boxes, labels, image_sizes)
        enc = self._encode(flat_boxes, flat_labels, img, sizes, query_map, query_stride)
        return pad_by_image(enc, img, len(boxes))

    def _flatten(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not (len(boxes) == len(labels) == len(image_sizes)):
            raise ValueError(
                f"MatchingDecoder: {len(boxes)} box lists, {len(labels)} label lists, "
                f"{len(image_sizes)} image sizes"
            )
        device = self.class_embed.weight.device
        counts = torch.tensor([int(b.shape[0]) for b in boxes], device=device, dtype=torch.long)
        flat_boxes = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device=device, dtype=torch.float32)
        flat_labels = torch.cat([lab.reshape(-1) for lab in labels]).to(device=device, dtype=torch.long)
        img = torch.repeat_interleave(torch.arange(len(boxes), device=device), counts)
        sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], device=device, dtype=torch.float32)
        return flat_boxes, flat_labels, img, sizes

    # ------------------------------------------------------------------ attention
    def keys_values(self, key_maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values [B, heads, U, c] of the concatenated key maps (detached inputs) and the
        positional embedding V [U, hidden]. Compute them once per step and pass them as ``kv`` to
        :meth:`aux_loss` and :meth:`forward` (both need the same keys and values)."""
        return self._keys_values(key_maps, with_pos=True)

    def _keys_values(self, key_maps: list[Tensor], with_pos: bool = False):
        if len(key_maps) == 0:
            raise ValueError("MatchingDecoder: key_maps is empty")
        if len(key_maps) > self.level_embed.shape[0]:
            raise ValueError(
                f"MatchingDecoder: {len(key_maps)} key maps but max_key_maps={self.level_embed.shape[0]}"
            )
        xs, pes = [], []
        for i, km in enumerate(key_maps):  # loop over a handful of FPN levels
            km = km.detach()
            h, w = km.shape[-2:]
            xs.append(km.flatten(2).transpose(1, 2))  # [B, HW, C]
            pe = sine_pos_embed_2d(h, w, self.hidden, self.temperature, device=km.device, dtype=km.dtype)
            if len(key_maps) > 1:
                pe = pe + self.level_embed[i].to(km.dtype)
            pes.append(pe)
        x = torch.cat(xs, dim=1)  # [B, U, C]
        v_pos = torch.cat(pes, dim=0)  # [U, hidden]
        keys = self.key_proj(x + self.pos_proj(v_pos))
        values = self.value_proj(x)
        if with_pos:
            return split_heads(keys, self.heads), split_heads(values, self.heads), v_pos
        return split_heads(keys, self.heads), split_heads(values, self.heads)

    def value_heads(self, x: Tensor) -> Tensor:
        """Split [B, U, hidden] into heads: [B, heads, U, c]."""
        return split_heads(x, self.heads)

    def _queries(self, queries: Tensor) -> Tensor:
        return split_heads(self.query_proj(queries), self.heads)  # [B, heads, Nq, c]

    def attend(
        self,
        queries: Tensor,
        key_maps: list[Tensor],
        key_padding_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attention masks m and teacher values O (``kv``: precomputed :meth:`keys_values`).

        By default no key padding mask is applied: the batch-padding region of the maps is
        kept as attendable positions (it is zero-padded image content, which the learned
        attention learns to ignore, and the student's values cover the same positions). Pass
        ``key_padding_mask`` (see :meth:`key_padding_mask`) to exclude it.

        Args:
            queries: [B, Nq, hidden] from :meth:`build_inquiries`.
            key_maps: list of teacher maps [B, C, H_k, W_k] (detached inside).
            key_padding_mask: optional bool [B, U], True where a position must be ignored.

        Returns:
            m [B, heads, Nq, U] (rows sum to 1) and values [B, heads, U, c].
        """
        k, v = (kv[0], kv[1]) if kv is not None else self._keys_values(key_maps)
        q = self._queries(queries)
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1), v

    @staticmethod
    def key_padding_mask(
        image_sizes: list[tuple[int, int]],
        key_hw: list[tuple[int, int]],
        strides: list[int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Bool [B, U], True at cells outside each image's valid region.

        Cell (x, y) of a stride-s map is valid when ``x * s < w`` and ``y * s < h`` (it holds at
        least one image pixel), so every image keeps at least one valid cell.
        """
        sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], device=device)
        masks = []
        for (h, w), s in zip(key_hw, strides):  # loop over FPN levels
            ys = torch.arange(h, device=device) * s
            xs = torch.arange(w, device=device) * s
            ok = (ys[None, :, None] < sizes[:, 0, None, None]) & (xs[None, None, :] < sizes[:, 1, None, None])
            masks.append(~ok.flatten(1))
        return torch.cat(masks, dim=1)

    def forward(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
        key_maps: list[Tensor],
        query_map: Tensor | None = None,
        query_stride: int | None = None,
        key_padding_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`build_inquiries` then :meth:`attend`: returns (m, values, valid)."""
        queries, valid = self.build_inquiries(boxes, labels, image_sizes, query_map, query_stride)
        m, values = self.attend(queries, key_maps, key_padding_mask, kv=kv)
        return m, values, valid

    # ------------------------------------------------------------------ auxiliary task
    def aux_loss(
        self,
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
        key_maps: list[Tensor],
        query_map: Tensor | None = None,
        query_stride: int | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        kv: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """ICD-style auxiliary task that trains the decoder (teacher side only).

        Inquiries per image: its real objects with jittered boxes (centre shifted by
        ``U(-j, j)`` x side, each side scaled by ``exp(U(-j, j))``, j = ``real_jitter``; without
        the jitter the localisation target would be identically zero) and
        ``fakes_per_real`` x N_b fake ones: class uniform in [1, num_classes], centre uniform in
        the image, (w, h) of a real box drawn uniformly from the whole batch with each side
        scaled by ``exp(U(-j_f, j_f))``, j_f = ``fake_size_jitter``. From each inquiry's
        attended value (sum_j m_ij O_j, heads concatenated) one MLP predicts a real/fake
        logit and another, from the attended value, the attended positional embedding
        (sum_j m_ij V_j) and the inquiry, 4 offsets ``(gt - inquiry) / (w, h, w, h)`` of the
        inquiry box (xyxy).

        Returns:
            ``{"identification": BCE over real + fake inquiries (mean),
            "localisation": L1 over the real inquiries' 4 offsets (mean)}``; both are 0 (with a
            graph to the decoder's parameters) when the batch has no objects.
        """
        gt, lab, img, sizes = self._flatten(boxes, labels, image_sizes)
        n = gt.shape[0]
        if n == 0:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return {"identification": zero, "localisation": zero.clone()}
        device = gt.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, device=device, generator=generator)

        # real inquiries: jittered gt boxes
        gt_c = _xyxy_to_cxcywh(gt)
        gt_wh = gt_c[:, 2:].clamp(min=1.0)
        j = self.real_jitter
        ctr = gt_c[:, :2] + (rand(n, 2) * 2 - 1) * j * gt_wh
        side = gt_wh * torch.exp((rand(n, 2) * 2 - 1) * j)
        real_c = torch.cat((ctr, side), dim=-1)

        # fake inquiries
        nf = n * self.fakes_per_real
        fake_img = img.repeat_interleave(self.fakes_per_real)
        size_wh = sizes[fake_img].flip(-1)  # (w, h)
        fake_ctr = rand(nf, 2) * size_wh
        src = torch.randint(0, n, (nf,), device=device, generator=generator)
        fake_side = gt_wh[src] * torch.exp((rand(nf, 2) * 2 - 1) * self.fake_size_jitter)
        fake_c = torch.cat((fake_ctr, fake_side), dim=-1)
        fake_lab = torch.randint(1, max(2, self.num_classes + 1), (nf,), device=device, generator=generator)
        fake_lab = fake_lab.clamp(max=self.num_classes)

        all_c = torch.cat((real_c, fake_c))
        all_boxes = _cxcywh_to_xyxy(all_c)
        all_lab = torch.cat((lab, fake_lab))
        all_img = torch.cat((img, fake_img))
        is_real = torch.cat((torch.ones(n, device=device), torch.zeros(nf, device=device)))
        # localisation targets (fakes get zeros; they are masked out)
        wh4 = all_c[:, 2:].repeat(1, 2)
        tgt = torch.cat((gt, gt.new_zeros(nf, 4)))
        loc_t = (tgt - all_boxes) / wh4

        enc = self._encode(all_boxes, all_lab, all_img, sizes, query_map, query_stride)
        queries, valid = pad_by_image(enc, all_img, len(boxes))
        real_p, _ = pad_by_image(is_real, all_img, len(boxes))
        loc_p, _ = pad_by_image(loc_t, all_img, len(boxes))

        k, v, pos = kv if kv is not None else self._keys_values(key_maps, with_pos=True)
        q = self._queries(queries)
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        c = v.shape[-1]
        pos_h = split_heads(pos[None].expand(v.shape[0], -1, -1).to(v.dtype), self.heads)  # [B, heads, U, c]
        both = _attend_values(q, k, torch.cat((v, pos_h), dim=-1), attn_mask)
        att = both[..., :c].transpose(1, 2).flatten(2)  # [B, Nq, hidden]: sum_j m_ij O_j
        att_pos = both[..., c:].transpose(1, 2).flatten(2)  # [B, Nq, hidden]: sum_j m_ij V_j

        ident_logit = self.ident_head(att).squeeze(-1)
        ident = F.binary_cross_entropy_with_logits(ident_logit[valid], real_p[valid].to(ident_logit.dtype))
        real_mask = valid & (real_p > 0.5)
        loc_pred = self.loc_head(torch.cat((att, att_pos, queries), dim=-1))
        loc = F.l1_loss(loc_pred[real_mask], loc_p[real_mask].to(loc_pred.dtype))
        return {"identification": ident, "localisation": loc}


class StudentValueProjection(nn.Module):
    """Student-side value projection F_v^S: Linear(C -> hidden) per position, split into heads,
    the counterpart of the decoder's ``value_proj`` on the (adapted) student maps.

    Args:
        in_channels: channels C of the adapted student map.
        hidden: width (must match the decoder's hidden).
        heads: number of heads (must match the decoder's heads).
    """

    def __init__(self, in_channels: int, hidden: int = 256, heads: int = 8) -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"StudentValueProjection: heads ({heads}) must divide hidden ({hidden})")
        self.heads = heads
        self.proj = nn.Linear(in_channels, hidden)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        """Map [B, C, H, W] (or a list of maps, concatenated along positions in order, as the
        decoder does for its key maps) -> values [B, heads, U, hidden/heads]."""
        maps = [x] if isinstance(x, Tensor) else list(x)
        flat = torch.cat([mp.flatten(2).transpose(1, 2) for mp in maps], dim=1)  # [B, U, C]
        return split_heads(self.proj(flat), self.heads)


@dataclass
class DecoderOptions(MethodOptions):
    """The options of a method with a matching decoder (ICD, HMKD).

    Attributes:
        heads, hidden: decoder heads N_m and attention width (paper: 8, 256).
        fakes_per_real: fake inquiries per real one in the decoder's auxiliary task.
        decoder_lr, decoder_weight_decay, decoder_clip: the decoder's own AdamW (default 1e-4 /
            1e-4, ICD's; the HMKD paper's 1e-3 / 1e-3 is in ``configs/coco/base_hmkd.yaml``) and
            the max-norm its gradients are clipped to (None: no clipping).
        warmup_iters: iterations during which only the decoder learns (no attention-weighted
            term), since attention from an untrained decoder is noise (ICD: 1000).
    """

    heads: int = 8
    hidden: int = 256
    fakes_per_real: int = 3
    decoder_lr: float = 1e-4
    decoder_weight_decay: float = 1e-4
    decoder_clip: float | None = 1.0
    warmup_iters: int = 0

    def check(self) -> None:
        super().check()
        if self.heads < 1:
            refuse("heads", ">= 1", self.heads)
        if self.hidden < 16 or self.hidden % 16:
            refuse("hidden", "a positive multiple of 16", self.hidden)
        if self.hidden % self.heads:
            refuse("heads", f"a divisor of hidden ({self.hidden})", self.heads)
        if self.fakes_per_real < 0:
            refuse("fakes_per_real", ">= 0", self.fakes_per_real)
        self._positive("decoder_lr", "decoder_clip")
        self._nonnegative("decoder_weight_decay")
        if self.warmup_iters < 0:
            refuse("warmup_iters", ">= 0", self.warmup_iters)


def decoder_optimizers(
    modules: dict[str, nn.Module], options: DecoderOptions
) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
    """``(name, AdamW, clip)`` for each decoder module: the optimiser every decoder-using method
    returns from ``make_extra_optimizers`` (lr, weight decay and clip from ``options``)."""
    o = options
    return [
        (name, torch.optim.AdamW(m.parameters(), lr=o.decoder_lr, weight_decay=o.decoder_weight_decay), o.decoder_clip)
        for name, m in modules.items()
    ]
