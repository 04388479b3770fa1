"""The student side of the matching decoder's imitation: :class:`StudentValueProjection` maps the
student's maps to values of the decoder's shape (heads x per-head width), the counterpart of the
decoder's own value projection on the teacher's maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hmkd.distill.matching.decoder import split_heads

__all__ = ["StudentValueProjection"]


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
        ([B, k] position indices) only those positions are projected: [B, heads, k, hidden/heads];
        with flat ``cells`` ([M] indices ``b * U + u``, a
        :class:`~hmkd.distill.matching.decoder.WindowKeyValues`' cells) only those: [M, heads, hidden/heads]."""
        maps = [x] if isinstance(x, Tensor) else list(x)
        if cells is not None and cells.dim() == 1:
            pos = maps[0].flatten(2) if len(maps) == 1 else torch.cat([mp.flatten(2) for mp in maps], dim=2)  # [B, C, U]
            picked = self.proj(pos[cells // pos.shape[2], :, cells % pos.shape[2]])  # [M, hidden], no copy of the map
            return picked.reshape(cells.shape[0], self.heads, self.proj.out_features // self.heads)
        flat = torch.cat([mp.flatten(2).transpose(1, 2) for mp in maps], dim=1)  # [B, U, C]
        if cells is not None:
            flat = flat.gather(1, cells[..., None].expand(-1, -1, flat.shape[-1]))
        return split_heads(self.proj(flat), self.heads)
