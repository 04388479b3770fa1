"""torchvision detectors (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS) on our P-named FPN backbones.

Nothing is downloaded. Anchor sizes follow each detector's torchvision default relative to the
level's stride (``anchor_scale * stride``: 8 for the R-CNNs, 4 for RetinaNet with three octave
scales, 1 for FCOS), which ``anchor_scale`` overrides (small objects on small images want smaller
anchors).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from hmkd.errors import ConfigError, did_you_mean
from hmkd.models.backbones import LEVELS, build_backbone, group_norm, level_index
from hmkd.models.torchvision_zoo import (
    TORCHVISION_DETECTORS,
    build_torchvision_detector,
    freeze_body_layers,
    is_torchvision,
    set_body_norm,
)

DETECTORS: dict[str, str] = {
    "faster_rcnn": "Faster R-CNN + FPN (two-stage; P2-P6)",
    "mask_rcnn": "Mask R-CNN + FPN (boxes and instance masks; P2-P6)",
    "retinanet": "RetinaNet + FPN (one-stage, anchors; P3-P7, P2-P7 on request)",
    "fcos": "FCOS + FPN (one-stage, anchor-free; P3-P7, P2-P7 on request)",
}
#: ``torchvision:<builder>`` detectors (torchvision's own models; see :mod:`hmkd.models.torchvision_zoo`)
TORCHVISION_DESCRIPTIONS: dict[str, str] = {
    name: f"torchvision's own builder ({e.family}, {e.levels[0]}-{e.levels[-1]}; its COCO checkpoint: {e.coco})"
    for name, e in TORCHVISION_DETECTORS.items()
}

DEFAULT_LEVELS = {
    "faster_rcnn": ["P2", "P3", "P4", "P5", "P6"],
    "mask_rcnn": ["P2", "P3", "P4", "P5", "P6"],
    "retinanet": ["P3", "P4", "P5", "P6", "P7"],
    "fcos": ["P3", "P4", "P5", "P6", "P7"],
}
_DEFAULT_ANCHOR_SCALE = {"faster_rcnn": 8.0, "mask_rcnn": 8.0, "retinanet": 4.0, "fcos": 1.0}


def _mask_background_logit(out: dict[str, torch.Tensor], training: bool) -> dict[str, torch.Tensor]:
    """At inference, pin the label-0 (background) logit to -30 (sigmoid ~1e-13): it is never a positive
    in training, but an untrained one-stage head would otherwise emit label-0 detections (no data-set
    category). Finite, so gradients through FCOS's sqrt(cls * ctrness) scores stay finite (Grad-CAM)."""
    if not training:
        cls = out["cls_logits"].clone()
        cls[..., 0] = -30.0
        out = {**out, "cls_logits": cls}
    return out


class _RetinaNetHead(RetinaNetHead):
    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return _mask_background_logit(super().forward(x), self.training)


class _FCOSHead(FCOSHead):
    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return _mask_background_logit(super().forward(x), self.training)


def build_detector(
    detector: str = "faster_rcnn",
    backbone: str = "resnet50",
    *,
    num_classes: int = 80,
    fpn_channels: int = 256,
    levels: list[str] | None = None,
    norm: str = "gn",
    min_size: int | list[int] = 800,
    max_size: int = 1333,
    anchor_scale: float | None = None,
    head_convs: int = 4,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    score_thresh: float = 0.05,
    nms_thresh: float | None = None,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    norm_eps: float | None = None,
    trainable_backbone_layers: int | None = None,
) -> nn.Module:
    """Build a torchvision detector with a P-named FPN backbone and random weights.

    Args:
        detector: one of :data:`DETECTORS`.
        backbone: one of :data:`hmkd.models.backbones.BACKBONES`.
        num_classes: object classes, without background (labels run 1..num_classes).
        levels: FPN levels (default per detector, see :data:`DEFAULT_LEVELS`).
        norm: ``gn`` (GroupNorm, trains from scratch at small batch), ``bn`` or ``frozen_bn``
            (torchvision's pretrained-weight setting).
        min_size, max_size: the detector's own resize (shorter side, longer side cap); a list of
            ``min_size`` values gives torchvision's multi-scale training.
        head_convs: conv layers in the FCOS head (RetinaNet's is fixed at 4 by torchvision).
        norm_eps: eps of the backbone body's batch norms (``bn``/``frozen_bn``; None: the layer's).
        trainable_backbone_layers: None trains every layer; k freezes all but the last k stages of a
            ResNet body with torchvision's rule (5: all, 0: none).
        The remaining arguments are torchvision's own (proposal counts, thresholds).

    ``detector="torchvision:<builder>"`` builds torchvision's own model instead
    (:func:`hmkd.models.torchvision_zoo.build_torchvision_detector`); ``backbone``, ``fpn_channels``,
    ``levels``, ``anchor_scale`` and ``head_convs`` are then the builder's and are not used.
    """
    if is_torchvision(detector):
        return build_torchvision_detector(
            detector, num_classes=num_classes, norm=norm, norm_eps=norm_eps,
            trainable_backbone_layers=trainable_backbone_layers, min_size=min_size, max_size=max_size,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_batch_size_per_image=box_batch_size_per_image, score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_img=detections_per_img, topk_candidates=topk_candidates,
        )
    if detector not in DETECTORS:
        known = ", ".join(DETECTORS) + ", torchvision:<builder> (hmkd list detectors)"
        raise ConfigError(f"unknown detector {detector!r} (known: {known}){did_you_mean(detector, list(DETECTORS))}")
    if num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {num_classes}")
    levels = list(levels) if levels else list(DEFAULT_LEVELS[detector])
    for lv in levels:
        level_index(lv)
    if detector in ("faster_rcnn", "mask_rcnn") and max(level_index(l) for l in levels) > 6:
        raise ConfigError(f"model.levels: {detector} uses at most P6, got {levels}")
    body = build_backbone(backbone, levels, fpn_channels, norm)
    if norm_eps is not None:
        if norm == "gn":
            raise ConfigError("model.norm_eps applies to batch norm (model.norm bn or frozen_bn), not gn")
        set_body_norm(body.body, norm, norm_eps)
    if trainable_backbone_layers is not None:
        if not backbone.startswith("resnet"):
            raise ConfigError(
                f"model.trainable_backbone_layers applies to ResNet backbones and torchvision:<builder> detectors, "
                f"not {backbone}"
            )
        freeze_body_layers(body.body, trainable_backbone_layers, 5, backbone)
    levels = body.levels
    scale = anchor_scale if anchor_scale is not None else _DEFAULT_ANCHOR_SCALE[detector]
    strides = [2 ** level_index(l) for l in levels]
    common: dict[str, Any] = dict(min_size=min_size, max_size=max_size)
    n_cls = num_classes + 1  # torchvision convention: label 0 is background

    if detector in ("faster_rcnn", "mask_rcnn"):
        sizes = tuple((int(round(scale * s)),) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        roi_levels = [l for l in levels if level_index(l) <= 5]
        kwargs: dict[str, Any] = dict(
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_batch_size_per_image=box_batch_size_per_image,
            box_score_thresh=score_thresh,
            box_nms_thresh=0.5 if nms_thresh is None else nms_thresh,
            box_detections_per_img=detections_per_img,
        )
        if detector == "mask_rcnn":
            kwargs["mask_roi_pool"] = MultiScaleRoIAlign(roi_levels, output_size=14, sampling_ratio=2)
            return MaskRCNN(body, n_cls, **common, **kwargs)
        return FasterRCNN(body, n_cls, **common, **kwargs)

    if detector == "retinanet":
        octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        sizes = tuple(tuple(int(round(scale * s * o)) for o in octaves) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        head = _RetinaNetHead(
            fpn_channels,
            anchors.num_anchors_per_location()[0],
            n_cls,
            norm_layer=partial(group_norm) if norm == "gn" else None,
        )
        return RetinaNet(
            body,
            n_cls,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=0.5 if nms_thresh is None else nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
            **common,
        )

    sizes = tuple((int(round(scale * s)),) for s in strides)
    anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    head = _FCOSHead(fpn_channels, 1, n_cls, num_convs=head_convs)
    return FCOS(
        body,
        n_cls,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=0.6 if nms_thresh is None else nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
        **common,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def fpn_channels_of(model: nn.Module) -> int:
    """The channel count of a detector's FPN maps (``backbone.out_channels``)."""
    ch = getattr(getattr(model, "backbone", None), "out_channels", None)
    if not isinstance(ch, int):
        raise ConfigError(f"{type(model).__name__} has no backbone.out_channels; is it an FPN detector?")
    return ch


__all__ = ["DETECTORS", "DEFAULT_LEVELS", "TORCHVISION_DESCRIPTIONS", "LEVELS", "build_detector", "count_parameters", "fpn_channels_of"]

