"""Backbones with an FPN whose outputs are named by pyramid level ``P2`` .. ``P7`` (stride ``2**l``).

Every backbone is built without downloading anything. A backbone ``body`` returns the stage maps
``C2`` .. ``C5`` (strides 4 .. 32); :class:`FPNBackbone` runs torchvision's
:class:`~torchvision.ops.FeaturePyramidNetwork` over the stages the requested levels need and adds
``P6`` / ``P7`` with torchvision's extra blocks. Attribute names (``body``, ``fpn``) follow
torchvision's ``BackboneWithFPN`` so that torchvision-format state dicts of ResNet-FPN detectors load.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from hmkd.errors import ConfigError, did_you_mean

LEVELS = ("P2", "P3", "P4", "P5", "P6", "P7")

BACKBONES: dict[str, str] = {
    "resnet18": "ResNet-18 (torchvision)",
    "resnet34": "ResNet-34 (torchvision)",
    "resnet50": "ResNet-50 (torchvision)",
    "resnet101": "ResNet-101 (torchvision)",
    "mobilenet_v2": "MobileNetV2 (torchvision), the paper's mobile student",
    "vovnet19": "VoVNetV2-19 (timm ese_vovnet19b_dw)",
    "vovnet39": "VoVNetV2-39 (timm ese_vovnet39b)",
    "vovnet57": "VoVNetV2-57 (timm ese_vovnet57b)",
}

_TIMM_VOVNET = {"vovnet19": "ese_vovnet19b_dw", "vovnet39": "ese_vovnet39b", "vovnet57": "ese_vovnet57b"}
NORMS = ("gn", "bn", "frozen_bn")


def level_index(name: str) -> int:
    """``"P3"`` -> 3, with a clear error for anything else."""
    if name not in LEVELS:
        raise ConfigError(f"unknown FPN level {name!r} (known: {', '.join(LEVELS)}{did_you_mean(name, list(LEVELS))})")
    return int(name[1:])


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with at most ``groups`` groups, fewer when ``channels`` is not divisible."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """The 2-D norm layer factory for ``norm`` in :data:`NORMS`."""
    if norm == "gn":
        return group_norm
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    raise ConfigError(f"unknown norm {norm!r} (known: {', '.join(NORMS)}{did_you_mean(norm, list(NORMS))})")


class _MobileNetV2Body(nn.Module):
    """MobileNetV2 ``features`` cut into the four stages of strides 4, 8, 16 and 32."""

    # (first, last+1) indices of torchvision's mobilenet_v2().features for C2..C5
    _CUTS = ((0, 4), (4, 7), (7, 14), (14, 18))

    def __init__(self, norm: str) -> None:
        super().__init__()
        features = tvm.mobilenet_v2(weights=None, norm_layer=norm_layer(norm)).features
        self.stages = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in self._CUTS)
        self.channels = [24, 32, 96, 320]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"C{i + 2}"] = x
        return out


class _TimmBody(nn.Module):
    """A timm ``features_only`` model keeping the stages of strides 4 .. 32 as ``C2`` .. ``C5``."""

    def __init__(self, timm_name: str, norm: str) -> None:
        super().__init__()
        import timm

        kwargs = {}
        if norm == "gn":
            from timm.layers import GroupNormAct

            kwargs["norm_layer"] = partial(GroupNormAct, num_groups=32)
        self.model = timm.create_model(timm_name, pretrained=False, features_only=True, **kwargs)
        if norm == "frozen_bn":  # timm builds with BatchNorm; freeze it afterwards (its own helper)
            from timm.layers import freeze_batch_norm_2d

            self.model = freeze_batch_norm_2d(self.model)
        reductions = self.model.feature_info.reduction()
        self._keep = [reductions.index(r) for r in (4, 8, 16, 32)]
        self.channels = [self.model.feature_info.channels()[i] for i in self._keep]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.model(x)
        return OrderedDict((f"C{j + 2}", feats[i]) for j, i in enumerate(self._keep))


def build_body(name: str, norm: str = "gn") -> tuple[nn.Module, list[int]]:
    """The backbone body returning ``C2..C5`` and the channel count of each."""
    if name.startswith("resnet") and name in BACKBONES:
        net = getattr(tvm, name)(weights=None, norm_layer=norm_layer(norm))
        body = IntermediateLayerGetter(
            net, return_layers={"layer1": "C2", "layer2": "C3", "layer3": "C4", "layer4": "C5"}
        )
        width = 64 if name in ("resnet18", "resnet34") else 256
        return body, [width, width * 2, width * 4, width * 8]
    if name == "mobilenet_v2":
        body = _MobileNetV2Body(norm)
        return body, list(body.channels)
    if name in _TIMM_VOVNET:
        body = _TimmBody(_TIMM_VOVNET[name], norm)
        return body, list(body.channels)
    raise ConfigError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)}{did_you_mean(name, list(BACKBONES))})")


class FPNBackbone(nn.Module):
    """Backbone body + FPN, returning ``OrderedDict`` of the requested levels named ``P2`` .. ``P7``.

    Args:
        body: module returning ``{"C2": .., "C3": .., "C4": .., "C5": ..}``.
        body_channels: channels of C2..C5.
        levels: contiguous requested levels, e.g. ``["P2", ..., "P6"]``. The lowest must be P2..P5;
            P6 (and P7) come from torchvision's extra blocks: max-pool when the top is P6, the
            RetinaNet P6/P7 convolutions when it is P7.
        out_channels: FPN channels.
        norm: norm used inside the FPN's convolutions (``gn`` or none for ``bn``/``frozen_bn``,
            matching torchvision's plain FPN).
    """

    def __init__(
        self,
        body: nn.Module,
        body_channels: list[int],
        levels: list[str],
        out_channels: int = 256,
        norm: str = "gn",
    ) -> None:
        super().__init__()
        idx = sorted(level_index(l) for l in levels)
        if idx != list(range(idx[0], idx[-1] + 1)):
            raise ConfigError(f"model.levels must be contiguous, got {levels}")
        if idx[0] > 5 or idx[-1] < 5:
            raise ConfigError(f"model.levels must include P5 and start at P2..P5, got {levels}")
        self.levels = [f"P{i}" for i in idx]
        self.body = body
        self._c_names = [f"C{i}" for i in range(idx[0], 6)]
        in_list = body_channels[idx[0] - 2 :]
        extra: nn.Module | None = None
        if idx[-1] == 6:
            extra = LastLevelMaxPool()
        elif idx[-1] == 7:
            extra = LastLevelP6P7(out_channels, out_channels)
        fpn_norm = group_norm if norm == "gn" else None
        self.fpn = FeaturePyramidNetwork(in_list, out_channels, extra_blocks=extra, norm_layer=fpn_norm)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        c = self.body(x)
        outs = self.fpn(OrderedDict((k, c[k]) for k in self._c_names))
        return OrderedDict(zip(self.levels, outs.values()))


def build_backbone(
    name: str, levels: list[str], out_channels: int = 256, norm: str = "gn"
) -> FPNBackbone:
    """Backbone ``name`` with an FPN producing ``levels`` (no weights are downloaded)."""
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r} (known: {', '.join(NORMS)}{did_you_mean(norm, list(NORMS))})")
    body, chans = build_body(name, norm)
    return FPNBackbone(body, chans, levels, out_channels, norm)
