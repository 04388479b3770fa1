"""HMKD small-distill loss terms (Sec. 3.3; DESIGN.md item 4).

``L_small = L_others + 1/(N_m N_s) sum_heads sum_i < m_ij , MSE_c(LN O^S_j, LN O^T_j) >``

* :func:`masked_feature_mse` is L_others for one level: the fg/bg-separated imitation of
  Sec. 3.2.1 weighted by the masks M and K. Because K sums to 1 over each box's cells (and over
  the background), the value does not grow with the level's resolution, so levels can be summed.
* :func:`attention_weighted_mse` is the attention-weighted value imitation.
* :class:`StudentValueProjection` is the student-side value map F_v^S.

The teacher side is a constant target everywhere here: teacher maps / values and the attention
mask m are detached inside, so gradients reach only the student (and its projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmkd.distill.decoder import split_heads

__all__ = ["masked_feature_mse", "attention_weighted_mse", "StudentValueProjection"]


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
) -> Tensor:
    """Attention-weighted imitation of the decoder values.

    Both value tensors are LayerNorm-normalised over the c channels of each head (no affine),
    ``MSE_c`` per position gives [B, h, U], and the loss is
    ``1/(h N_s) sum_heads sum_{valid i} < m_ij , MSE_c >`` with N_s the number of valid (real)
    inquiries in the batch. ``m`` and ``values_t`` are detached: gradients reach ``values_s``
    only (the decoder is trained by its own auxiliary task).

    Args:
        m: attention masks [B, h, Nq, U] (rows sum to 1).
        values_s: student values [B, h, U, c].
        values_t: teacher values [B, h, U, c].
        valid: bool [B, Nq], False for padded inquiries.

    Returns:
        Scalar tensor; 0 (still attached to ``values_s``'s graph) when N_s = 0.
    """
    if values_s.shape != values_t.shape:
        raise ValueError(
            f"attention_weighted_mse: values_s {tuple(values_s.shape)} and values_t "
            f"{tuple(values_t.shape)} differ"
        )
    b, h, nq, u = m.shape
    if values_s.shape[:3] != (b, h, u) or tuple(valid.shape) != (b, nq):
        raise ValueError(
            f"attention_weighted_mse: m {tuple(m.shape)}, values {tuple(values_s.shape)} and "
            f"valid {tuple(valid.shape)} do not fit"
        )
    c = values_s.shape[-1]
    ln_s = F.layer_norm(values_s, (c,))
    ln_t = F.layer_norm(values_t.detach(), (c,))
    mse_c = (ln_s - ln_t).pow(2).mean(dim=-1)  # [B, h, U]
    per_inquiry = torch.matmul(m.detach().to(mse_c.dtype), mse_c.unsqueeze(-1)).squeeze(-1)  # [B,h,Nq]
    total = (per_inquiry * valid[:, None, :].to(mse_c.dtype)).sum()
    n_s = valid.sum().clamp(min=1).to(mse_c.dtype)
    return total / (h * n_s)


class StudentValueProjection(nn.Module):
    """Student-side value projection F_v^S: Linear(C -> hidden) per position, split into heads.

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
