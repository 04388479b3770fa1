"""Feature taps: FPN maps and the transformed batch from one ordinary forward of a detector.

:class:`DetectorTap` registers forward hooks on a torchvision detector's ``transform`` and
``backbone``; a normal ``model(images, targets)`` call then also yields the FPN maps (named
``P2`` .. ``P7`` by their stride, whatever the backbone calls them), the padded input tensor, the
resized image sizes and the targets projected into the resized frame. There is no second backbone
pass. It works for any torchvision ``GeneralizedRCNN``, ``RetinaNet`` or ``FCOS`` (ours or built
with torchvision's own builders).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hmkd.errors import ConfigError


def name_levels(
    features: "dict[str, torch.Tensor]", input_hw: tuple[int, int], level_keys: "dict[str, str] | None" = None
) -> "OrderedDict[str, torch.Tensor]":
    """Rename FPN maps to ``P{l}`` with ``l = log2(stride)``, the stride read off the input size.

    ``level_keys`` (a backbone's ``level_keys`` attribute, e.g. torchvision detectors built by
    :mod:`hmkd.models.torchvision_zoo`) maps output keys to level names instead; keys it does not
    name are left out (the MobileNetV3 FPN's second stride-32 map)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    if level_keys:
        for key, f in features.items():
            if key in level_keys:
                out[level_keys[key]] = f
        return out
    for key, f in features.items():
        if isinstance(key, str) and key.startswith("P") and key[1:].isdigit():
            out[key] = f
            continue
        stride = input_hw[-1] / f.shape[-1]
        level = int(round(math.log2(stride)))
        out[f"P{level}"] = f
    return out


@dataclass
class TapOutput:
    """What one tapped forward returns.

    Attributes:
        output: the detector's usual result (loss dict in train mode, detections in eval mode).
        features: FPN maps ``{"P2": [B,C,H,W], ...}``.
        tensors: the padded, normalised input batch ``[B,3,H,W]`` the backbone saw.
        image_sizes: resized (unpadded) size ``(h, w)`` of each image.
        targets: targets after the detector's resize (boxes in the resized frame), or None.
    """

    output: Any
    features: "OrderedDict[str, torch.Tensor]"
    tensors: torch.Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, torch.Tensor]] | None = None


class DetectorTap:
    """Hooks on ``model.transform`` and ``model.backbone`` capturing one forward's internals.

    Use ``tap = DetectorTap(model)`` once, then ``res = tap(images, targets)`` each step; call
    :meth:`remove` to detach the hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "module", model)  # DDP-wrapped
        for attr in ("transform", "backbone"):
            if not hasattr(inner, attr):
                raise ConfigError(
                    f"{type(inner).__name__} has no '{attr}': a torchvision detection model with an FPN is needed"
                )
        self.model = model
        self._store: dict[str, Any] = {}
        self._handles = [
            inner.transform.register_forward_hook(self._on_transform),
            inner.backbone.register_forward_hook(self._on_backbone),
        ]

    def _on_transform(self, module: nn.Module, args: Any, out: Any) -> None:
        self._store["images"], self._store["targets"] = out

    def _on_backbone(self, module: nn.Module, args: Any, out: Any) -> None:
        self._store["features"] = out

    def __call__(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> TapOutput:
        self._store.clear()
        output = self.model(images, targets)
        image_list = self._store["images"]
        feats = self._store["features"]
        if isinstance(feats, torch.Tensor):
            feats = OrderedDict([("0", feats)])
        tensors = image_list.tensors
        inner = getattr(self.model, "module", self.model)
        return TapOutput(
            output=output,
            features=name_levels(feats, tuple(tensors.shape[-2:]), getattr(inner.backbone, "level_keys", None)),
            tensors=tensors,
            image_sizes=[tuple(s) for s in image_list.image_sizes],
            targets=self._store.get("targets"),
        )

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def renormalise(tensors: torch.Tensor, src: nn.Module, dst: nn.Module) -> torch.Tensor:
    """Re-express a batch normalised by ``src.transform`` in ``dst.transform``'s normalisation."""
    sm, ss = src.transform.image_mean, src.transform.image_std
    dm, ds = dst.transform.image_mean, dst.transform.image_std
    if list(sm) == list(dm) and list(ss) == list(ds):
        return tensors
    t = lambda v: torch.as_tensor(v, dtype=tensors.dtype, device=tensors.device)[:, None, None]  # noqa: E731
    return (tensors * t(ss) + t(sm) - t(dm)) / t(ds)


def backbone_features(model: nn.Module, tensors: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """Run only ``model.backbone`` (body + FPN) on an already transformed batch; P-named maps."""
    inner = getattr(model, "module", model)
    feats = inner.backbone(tensors)
    if isinstance(feats, torch.Tensor):
        feats = OrderedDict([("0", feats)])
    return name_levels(feats, tuple(tensors.shape[-2:]), getattr(inner.backbone, "level_keys", None))
