"""The base of the methods with a matching decoder (ICD, HMKD): the decoder's task, and fitting it once.

The decoder's auxiliary task depends only on the teacher and the ground truth, never on the
student. So it can be fitted once per teacher, on the frozen teacher alone
(:mod:`hmkd.distill.matching.fit`), saved, and loaded by every later distillation with that teacher:
``distill.options.decoder_fit`` (``none``: learn from scratch during distillation, as ICD and the
paper do; ``auto``: fit and cache; a path: load). ``decoder_training: frozen`` then keeps it fixed
(no aux task, no decoder optimiser); ``joint`` keeps training it, warm-started.

A subclass builds its decoder(s) and implements :meth:`DecoderDistiller.decoder_modules` (what a fit
trains and a fitted file holds) and :meth:`DecoderDistiller.decoder_task` (the aux task of each
decoder on one batch of teacher maps); :meth:`DecoderDistiller.fit_spec` lists what the fit depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hmkd.distill.base import Distiller
from hmkd.distill.matching.decoder import KeyValues
from hmkd.distill.matching.fit import prepare_decoder
from hmkd.distill.matching.optim import decoder_optimizers, decoder_schedulers
from hmkd.distill.matching.options import DecoderOptions
from hmkd.distill.matching.task import AuxOutput
from hmkd.errors import ConfigError

__all__ = ["DecoderDistiller"]


class DecoderDistiller(Distiller):
    """A distiller with matching decoder(s) that can be fitted on the teacher alone."""

    options: DecoderOptions

    # -- what a subclass provides ---------------------------------------------------------------
    def decoder_modules(self) -> nn.Module:
        """The decoder module(s) a fit trains and a fitted file holds."""
        raise NotImplementedError

    def decoder_task(
        self,
        teacher_features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
        small: list[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_hw: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        keep_attention: bool = False,
        keys: Callable[[KeyValues], KeyValues] | None = None,
    ) -> dict[str, AuxOutput]:
        """Each decoder's aux task on one batch (name -> :class:`~hmkd.distill.matching.task.AuxOutput`).

        Args:
            teacher_features: the teacher's P-named maps of the batch.
            boxes, labels: per image, in the resized frame; small: per image bool, small objects.
            image_sizes: per image resized (h, w); padded_hw: the padded batch's (H, W).
            generator: draws the fakes and the jitter.
            keep_attention: return the attention (:class:`AuxOutput`).
            keys: applied to each decoder's keys and values before the task (the quality measures'
                shortcut probes shuffle them or take them from another image).
        """
        raise NotImplementedError

    def distillation_attention(
        self,
        teacher_features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
        small: list[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_hw: tuple[int, int],
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], KeyValues]]:
        """Each decoder's attention for the inquiries the distillation uses (every inquiring object at
        its own box): name -> (attention [B, heads, N, U], valid [B, N], the objects' boxes per image,
        the keys and values). No graph."""
        raise NotImplementedError

    def fit_spec(self) -> dict[str, Any]:
        """Everything a fitted decoder depends on besides the teacher and the data (part of its cache key)."""
        o = self.options
        return {
            "method": getattr(self, "name", type(self).__name__),
            "decoder": {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.decoder_kwargs().items()},
            "num_classes": self.num_classes,
            "teacher_channels": self.teacher_channels,
            "fit_iters": o.fit_iters,
            "fit_lr": self.fit_lr,
            "decoder_weight_decay": o.decoder_weight_decay,
            "decoder_clip": o.decoder_clip,
        }

    # -- shared behaviour -----------------------------------------------------------------------
    def prepare(self, cfg: Any, train_set: Any, device: torch.device, *, progress: bool = False) -> str | None:
        """Fit the decoder on the teacher alone, or load the cached fit, as ``distill.options.decoder_fit``
        says (:func:`hmkd.distill.matching.fit.prepare_decoder`); returns the fitted file (None: none)."""
        return prepare_decoder(self, cfg, train_set, device, progress=progress)

    @property
    def fit_lr(self) -> float:
        return float(self.options.fit_lr if self.options.fit_lr is not None else self.options.decoder_lr)

    @property
    def decoder_learns(self) -> bool:
        """The decoder runs its aux task and has an optimiser during distillation (not ``frozen``)."""
        return not self.options.frozen

    def freeze_decoder_if_asked(self) -> None:
        """With ``decoder_training: frozen``, no decoder parameter takes a gradient (call at the end of
        ``__init__``)."""
        if self.options.frozen:
            self.decoder_modules().requires_grad_(False)

    def make_extra_schedulers(self, total_iters: int) -> list[tuple[str, torch.optim.lr_scheduler.LRScheduler]]:
        return decoder_schedulers(self.extra_optimizers(), self.options, total_iters)

    def decoder_optimizers_of(self, groups: dict[str, nn.Module | Sequence[nn.Module]]) -> list[tuple[str, torch.optim.Optimizer, float | None]]:
        """:func:`~hmkd.distill.matching.optim.decoder_optimizers` over the groups' trainable parameters (a
        frozen decoder's are left out; a group left empty gets no optimiser)."""
        kept: dict[str, list[nn.Module]] = {}
        for name, mods in groups.items():
            mods = [mods] if isinstance(mods, nn.Module) else list(mods)
            if any(p.requires_grad for m in mods for p in m.parameters()):
                kept[name] = [m for m in mods if any(p.requires_grad for p in m.parameters())]
        return decoder_optimizers(kept, self.options)

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The decoder(s)' state dict (what a fitted file's ``state_dict`` is)."""
        return {k: v.detach().cpu().clone() for k, v in self.decoder_modules().state_dict().items()}

    def load_decoder_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a fitted decoder's state; a one-line error names ``source`` when it does not fit."""
        mods = self.decoder_modules()
        own = mods.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or extra or bad:
            what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                    else f"shape of {bad[0]} {tuple(state[bad[0]].shape)} != {tuple(own[bad[0]].shape)}")
            raise ConfigError(f"{source}: the fitted decoder does not match this method's decoder ({what}); "
                              "fit it again with these options (hmkd fit-decoder)")
        device = next(mods.parameters()).device
        mods.load_state_dict({k: v.to(device) for k, v in state.items()})
