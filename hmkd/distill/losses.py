"""Distillation loss functions shared by the methods (HMKD paper Sec. 3.2-3.3; ICD).

``L_small = L_others + 1/(N_m N_s) sum_heads sum_i < m_ij , MSE_c(LN O^S_j, LN O^T_j) >``

* :func:`masked_feature_mse` is L_others for one level: the fg/bg-separated imitation of
  Sec. 3.2.1 weighted by the masks M and K. Because K sums to 1 over each box's cells (and over
  the background), the value does not grow with the level's resolution, so levels can be summed.
* :func:`attention_weighted_mse` is the attention-weighted value imitation (HMKD and ICD).
* :func:`background_loss` is the supplemental (background) loss of Sec. 3.2.3 with a GcBlock f'::

      paper form: L_bg = sum (f'(|T - S'|))^2
      fgd form:   L_bg = sum (f'_s(S') - f'_t(T))^2        (FGD's global loss)

The teacher side is a constant target everywhere here: teacher maps / values and the attention
mask m are detached inside, so gradients reach only the student side (its maps, projection and
GcBlocks). Balance factors (alpha, beta) are applied by the caller.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hmkd.distill.gcblock import GcBlock

__all__ = ["masked_feature_mse", "attention_weighted_mse", "background_loss"]


def masked_feature_mse(
    S: Tensor,
    T: Tensor,
    M: Tensor,
    K: Tensor,
    *,
    bg_weight: float = 0.0,
) -> Tensor:
    """Foreground(/background) masked feature imitation for one level.

    ``MSE_c(x, y) = mean_c (S - T)^2`` per cell; per image
    ``sum_xy M K MSE_c + bg_weight * sum_xy (1 - M) K MSE_c``, averaged over the batch.

    Args:
        S: adapted student map [B, C, H, W].
        T: teacher map [B, C, H, W] (detached inside).
        M: foreground mask [B, H, W] (1 inside any box).
        K: scale mask [B, H, W] (1/(H_g W_g) inside boxes, 1/N_bg outside).
        bg_weight: weight of the background term (0 = foreground only).

    Returns:
        Scalar tensor.
    """
    if S.shape != T.shape:
        raise ValueError(f"masked_feature_mse: S {tuple(S.shape)} and T {tuple(T.shape)} differ")
    if M.shape != K.shape or M.shape != (S.shape[0],) + tuple(S.shape[2:]):
        raise ValueError(
            f"masked_feature_mse: M {tuple(M.shape)} / K {tuple(K.shape)} do not match S {tuple(S.shape)}"
        )
    mse_c = (S - T.detach()).pow(2).mean(dim=1)  # [B, H, W]
    M = M.to(mse_c.dtype)
    K = K.to(mse_c.dtype)
    weight = M * K
    if bg_weight:
        weight = weight + bg_weight * (1.0 - M) * K
    return (weight * mse_c).flatten(1).sum(dim=1).mean()


def attention_weighted_mse(
    m: Tensor,
    values_s: Tensor,
    values_t: Tensor,
    valid: Tensor,
    reduction: Literal["batch", "image"] = "batch",
    index: Tensor | None = None,
) -> Tensor:
    """Attention-weighted imitation of the decoder values.

    Both value tensors are LayerNorm-normalised over the c channels of each head (no affine,
    eps 1e-5), ``MSE_c`` per position gives [B, h, U], and each valid (real) inquiry i of image b
    contributes ``e_bhi = < m_bhi , MSE_c >``. ``reduction``:

    - ``batch`` (HMKD's ``1/(N_m N_s)``; ICD's MegEngine release): ``sum e / (h N_s)`` with N_s
      the valid inquiries of the whole batch, so every object weighs the same and an image without
      objects changes nothing;
    - ``image`` (ICD's PyTorch release, ``mimic_loss``): per image and head the weighted sum is
      divided by that image's total weight ``sum_i sum_j m_bhij`` (= its object count n_b), then
      averaged over heads and over ALL B images, so an image without objects counts as 0 in the mean.

    ``m`` and ``values_t`` are detached: gradients reach ``values_s`` only (the decoder is trained
    by its own auxiliary task).

    ``MSE_c`` is a mean over the c channels of a head: the paper defines this term as an MSE in
    the hidden dimension of LayerNorm-normalised per-head values, so it is already per-channel in
    its own formula and HMKD's ``reduction: sum`` does not multiply it by a channel count.

    Args:
        m: attention masks [B, h, Nq, U] (rows sum to 1).
        values_s: student values [B, h, U, c].
        values_t: teacher values [B, h, U, c].
        valid: bool [B, Nq], False for padded (or fake) inquiries.
        reduction: ``batch`` or ``image`` (above).
        index: with an attention restricted to windows (``attention_window``): long [B, Nq, K], the
            row of the values of each inquiry's k-th window cell; ``m`` is then [B, h, Nq, K] and the
            values are those of the M distinct window cells, [M, h, c]. The same sum, over the window.

    Returns:
        Scalar tensor; 0 (still attached to ``values_s``'s graph) when N_s = 0.
    """
    if values_s.shape != values_t.shape:
        raise ValueError(
            f"attention_weighted_mse: values_s {tuple(values_s.shape)} and values_t "
            f"{tuple(values_t.shape)} differ"
        )
    b, h, nq, u = m.shape
    if index is None:
        fits = values_s.shape[:3] == (b, h, u) and tuple(valid.shape) == (b, nq)
        what = f"values {tuple(values_s.shape)}"
    else:
        fits = values_s.dim() == 3 and values_s.shape[1] == h and tuple(index.shape) == (b, nq, u) \
            and tuple(valid.shape) == (b, nq)
        what = f"window values {tuple(values_s.shape)}, index {tuple(index.shape)}"
    if not fits:
        raise ValueError(f"attention_weighted_mse: m {tuple(m.shape)}, {what} and valid {tuple(valid.shape)} do not fit")
    if reduction not in ("batch", "image"):
        raise ValueError(f"attention_weighted_mse: reduction must be 'batch' or 'image', got {reduction!r}")
    c = values_s.shape[-1]
    ln_s = F.layer_norm(values_s, (c,))
    ln_t = F.layer_norm(values_t.detach(), (c,))
    mse_c = (ln_s - ln_t).pow(2).mean(dim=-1)  # [B, h, U]; windows: [M, h], once per distinct cell
    if index is None:
        # the real inquiries' attention summed: [B, h, U] (ICD's value_mask)
        sel = valid[:, None, None, :].to(mse_c.dtype).expand(b, h, 1, nq)
        w = torch.matmul(sel, m.detach().to(mse_c.dtype)).squeeze(2)
        per_head, weight = (w * mse_c).sum(dim=-1), w.sum(dim=-1)  # [B, h]
    else:  # each inquiry's attention over its own window cells, MSE_c read there
        w = m.detach().to(mse_c.dtype) * valid[:, None, :, None].to(mse_c.dtype)
        per_head = (w * mse_c[index].permute(0, 3, 1, 2)).sum(dim=(2, 3))
        weight = w.sum(dim=(2, 3))
    if reduction == "image":
        return (per_head / weight.clamp(min=1e-6)).mean()
    n_s = valid.sum().clamp(min=1).to(mse_c.dtype)
    return per_head.sum() / (h * n_s)


def _reduce(sq: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return sq.sum() / max(1, sq.shape[0])
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"background_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def background_loss(
    T: Tensor,
    S: Tensor,
    gc: GcBlock,
    *,
    form: Literal["paper", "fgd"] = "paper",
    gc_t: GcBlock | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Supplemental (background) distillation loss of HMKD Sec. 3.2.3, without alpha.

    Args:
        T: teacher map [B, C, H, W] (detached here; the teacher is frozen).
        S: (adapted) student map [B, C, H, W].
        gc: the GcBlock f' (the student-side block in the ``fgd`` form).
        form: ``"paper"``: ``sum (f'(|T - S|))^2``; ``"fgd"``: ``sum (f'_s(S) - f'_t(T))^2``.
        gc_t: teacher-side GcBlock for the ``fgd`` form (FGD keeps two blocks); when None the
            single block ``gc`` is shared by both sides. Ignored by the paper form.
        reduction: ``"sum"``: sum over C, H, W, divided by the batch size B (FGD convention, so
            the value grows with image area and channel count); ``"mean"``: mean over all elements.

    Returns:
        Scalar loss tensor.
    """
    if T.shape != S.shape:
        raise ValueError(f"background_loss: T {tuple(T.shape)} and S {tuple(S.shape)} differ")
    T = T.detach()
    if form == "paper":
        sq = gc(torch.abs(T - S)).pow(2)
    elif form == "fgd":
        teacher_block = gc if gc_t is None else gc_t
        sq = (gc(S) - teacher_block(T)).pow(2)
    else:
        raise ValueError(f"background_loss: form must be 'paper' or 'fgd', got {form!r}")
    return _reduce(sq, reduction)
