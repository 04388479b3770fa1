"""What the distillers ask of a detector: its FPN levels, strides, kind and class count."""

from __future__ import annotations

from torch import nn

from hmkd.models.backbones import level_index


def detector_levels(model: nn.Module) -> list[str]:
    """The P-named levels a detector's FPN produces (ours or torchvision's own)."""
    inner = getattr(model, "module", model)
    levels = getattr(inner.backbone, "levels", None)
    if levels:
        return list(levels)
    # torchvision BackboneWithFPN: infer from a dry run on a tiny input
    import torch

    from hmkd.models.tap import backbone_features

    p = next(inner.parameters())
    with torch.no_grad():
        was = inner.training
        inner.eval()
        feats = backbone_features(inner, torch.zeros(1, 3, 256, 256, device=p.device, dtype=p.dtype))
        inner.train(was)
    return list(feats)


def stride_of(level: str) -> int:
    """Stride in pixels of ``P{l}``: ``2**l``."""
    return 2 ** level_index(level)


def finer_level(level: str) -> str:
    """The next finer FPN level: ``P3`` -> ``P2`` (half the stride)."""
    return f"P{level_index(level) - 1}"


def detector_kind(model: nn.Module) -> str:
    """``faster_rcnn`` | ``mask_rcnn`` | ``retinanet`` | ``fcos`` from the model's class."""
    name = type(getattr(model, "module", model)).__name__
    return {"FasterRCNN": "faster_rcnn", "MaskRCNN": "mask_rcnn", "RetinaNet": "retinanet", "FCOS": "fcos"}.get(
        name, "faster_rcnn"
    )


def num_classes_of(model: nn.Module) -> int | None:
    """Object classes (without background) of a torchvision detector, or None if it cannot tell."""
    inner = getattr(model, "module", model)
    rh = getattr(inner, "roi_heads", None)
    if rh is not None and hasattr(rh, "box_predictor"):
        return int(rh.box_predictor.cls_score.out_features) - 1
    head = getattr(getattr(inner, "head", None), "classification_head", None)
    if head is not None and hasattr(head, "num_classes"):
        return int(head.num_classes) - 1
    return None
