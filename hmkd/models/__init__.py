"""Detectors, backbones, feature taps and weight loading."""

from __future__ import annotations

from torch import nn

from hmkd.config import PRETRAIN_BACKBONE, Config, ModelConfig, model_kwargs
from hmkd.errors import ConfigError
from hmkd.models.backbones import BACKBONES, LEVELS, build_backbone, level_index
from hmkd.models.detectors import (
    DEFAULT_LEVELS,
    DETECTORS,
    TORCHVISION_DESCRIPTIONS,
    build_detector,
    count_parameters,
    fpn_channels_of,
)
from hmkd.models.tap import DetectorTap, TapOutput, backbone_features, name_levels, renormalise
from hmkd.models.torchvision_zoo import TORCHVISION_DETECTORS, detector_family, is_torchvision
from hmkd.models.weights import (
    CLASS_DEPENDENT,
    INIT_PARTS,
    InitReport,
    init_from_teacher,
    load_weights,
    read_state_dict,
)


def build_model(cfg: ModelConfig, num_classes: int | None = None, *, load: bool = True) -> nn.Module:
    """Build the detector a :class:`ModelConfig` describes and load its weights file if it names one."""
    if load and cfg.backbone_weights == PRETRAIN_BACKBONE:
        raise ConfigError(f"backbone_weights: {PRETRAIN_BACKBONE} names the pretrained stand-in, which "
                          "hmkd.training.resolve_pretrained turns into its file first")
    model = build_detector(**model_kwargs(cfg, num_classes))
    if load and cfg.backbone_weights:
        load_weights(model, cfg.backbone_weights, prefix="backbone.body", strict=False)
    if load and cfg.weights:
        load_weights(model, cfg.weights, skip_classes=cfg.weights_skip_classes)
    return model


def is_mask_model(cfg: Config) -> bool:
    """Whether the run's detector predicts masks (its data needs masks, its evaluation scores segm)."""
    return detector_family(cfg.model.detector) == "mask_rcnn"


__all__ = [
    "BACKBONES",
    "CLASS_DEPENDENT",
    "TORCHVISION_DESCRIPTIONS",
    "TORCHVISION_DETECTORS",
    "detector_family",
    "is_torchvision",
    "DETECTORS",
    "DEFAULT_LEVELS",
    "INIT_PARTS",
    "InitReport",
    "LEVELS",
    "DetectorTap",
    "TapOutput",
    "backbone_features",
    "build_backbone",
    "build_detector",
    "build_model",
    "count_parameters",
    "fpn_channels_of",
    "init_from_teacher",
    "is_mask_model",
    "level_index",
    "load_weights",
    "name_levels",
    "read_state_dict",
    "renormalise",
]
