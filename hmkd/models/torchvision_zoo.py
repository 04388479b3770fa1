"""torchvision's FPN detection builders as hmkd detectors: ``model.detector: torchvision:<builder>``.

The detector *is* torchvision's: its own builder (``torchvision.models.detection.<builder>``) is
called with ``weights=None, weights_backbone=None`` (nothing is downloaded), so its architecture,
anchors, heads, losses and post-processing are torchvision's code, and torchvision's state dicts
(its COCO checkpoints or your own torchvision-trained models) load as they are. hmkd adds only:

* ``norm``: ``frozen_bn`` swaps the BatchNorm2d layers of the backbone *body* for torchvision's
  FrozenBatchNorm2d, which is what the builder itself does when it is given weights (v1 ResNet-50
  models, MobileNetV3, FCOS); ``bn`` keeps BatchNorm2d (the builder's ``weights=None`` model, and
  the v2 models' setting even with weights). ``norm_eps`` sets those layers' eps (torchvision's
  v1 ResNet-50 COCO checkpoints run with eps 0, see :data:`TORCHVISION_DETECTORS`).
* ``trainable_backbone_layers``: freezes the body's first stages with torchvision's own rule
  (``None``: every layer trains, the builder's ``weights=None`` behaviour).
* P-named levels: ``backbone.levels`` and ``backbone.level_keys`` (the FPN's output key of each
  level), which :class:`~hmkd.models.DetectorTap` and the distillers read.

Nothing else differs: in particular hmkd's background-logit pin of its own one-stage heads
(:func:`hmkd.models.detectors._mask_background_logit`) is not applied, so outputs are torchvision's
exactly (tested against torchvision's own models in ``tests/models/test_torchvision_zoo.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.ops.misc import FrozenBatchNorm2d

from hmkd.errors import ConfigError

PREFIX = "torchvision:"


@dataclass(frozen=True)
class TorchvisionDetector:
    """What hmkd knows of one torchvision builder.

    Attributes:
        builder: the function name in ``torchvision.models.detection``.
        family: ``faster_rcnn`` | ``mask_rcnn`` | ``retinanet`` | ``fcos``.
        level_keys: FPN output key -> P-named level (stride ``2**l``).
        norm: the backbone body's norm of torchvision's COCO checkpoint (``frozen_bn`` | ``bn``).
        norm_eps: its FrozenBatchNorm2d eps (None: the layer's default 1e-5; 0.0 where torchvision
            calls ``overwrite_eps(model, 0.0)`` after loading the COCO weights).
        max_trainable: the largest ``trainable_backbone_layers`` (every stage trains).
        settings: the builder's own settings beyond the detector class's defaults, plus the class
            defaults hmkd's config keys would otherwise change (what the preset files set).
        coco: torchvision's published COCO val2017 numbers of its checkpoint.
        checkpoint: the file name of torchvision's COCO checkpoint.
    """

    builder: str
    family: str
    level_keys: tuple[tuple[str, str], ...]
    norm: str
    norm_eps: float | None
    max_trainable: int
    settings: tuple[tuple[str, Any], ...]
    coco: str
    checkpoint: str

    @property
    def levels(self) -> list[str]:
        return [lv for _, lv in self.level_keys]

    @property
    def name(self) -> str:
        return PREFIX + self.builder

    @property
    def backbone(self) -> str:
        """The body the builder fixes: ``resnet50`` or ``mobilenet_v3_large``."""
        return "mobilenet_v3_large" if "mobilenet_v3_large" in self.builder else "resnet50"


_RCNN_KEYS = (("0", "P2"), ("1", "P3"), ("2", "P4"), ("3", "P5"), ("pool", "P6"))
_ONE_STAGE_KEYS = (("0", "P3"), ("1", "P4"), ("2", "P5"), ("p6", "P6"), ("p7", "P7"))
# the MobileNetV3 FPN returns two maps at stride 32 (after blocks 13 and 16) and a max-pooled one at
# 64; the top one (block 16, the last stage, as a ResNet's P5) is P5, the other is used by the
# heads but has no P name of its own
_MOBILENET_KEYS = (("1", "P5"), ("pool", "P6"))
_SIZE = (("min_size", 800), ("max_size", 1333))
_RETINANET = _SIZE + (("detections_per_img", 300),)  # torchvision's RetinaNet keeps 300, hmkd's default 100

_ENTRIES = (
    TorchvisionDetector("fasterrcnn_resnet50_fpn", "faster_rcnn", _RCNN_KEYS, "frozen_bn", 0.0, 5, _SIZE,
                        "37.0 box mAP", "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"),
    TorchvisionDetector("fasterrcnn_resnet50_fpn_v2", "faster_rcnn", _RCNN_KEYS, "bn", None, 5, _SIZE,
                        "46.7 box mAP", "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"),
    TorchvisionDetector("fasterrcnn_mobilenet_v3_large_fpn", "faster_rcnn", _MOBILENET_KEYS, "frozen_bn", None, 6,
                        _SIZE, "32.8 box mAP", "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"),
    TorchvisionDetector("fasterrcnn_mobilenet_v3_large_320_fpn", "faster_rcnn", _MOBILENET_KEYS, "frozen_bn", None, 6,
                        (("min_size", 320), ("max_size", 640), ("rpn_pre_nms_top_n_test", 150),
                         ("rpn_post_nms_top_n_test", 150)),
                        "22.8 box mAP", "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"),
    TorchvisionDetector("retinanet_resnet50_fpn", "retinanet", _ONE_STAGE_KEYS, "frozen_bn", 0.0, 5, _RETINANET,
                        "36.4 box mAP", "retinanet_resnet50_fpn_coco-eeacb38b.pth"),
    TorchvisionDetector("retinanet_resnet50_fpn_v2", "retinanet", _ONE_STAGE_KEYS, "bn", None, 5, _RETINANET,
                        "41.5 box mAP", "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"),
    TorchvisionDetector("fcos_resnet50_fpn", "fcos", _ONE_STAGE_KEYS, "frozen_bn", None, 5,
                        _SIZE + (("score_thresh", 0.2),), "39.2 box mAP", "fcos_resnet50_fpn_coco-99b0c9b7.pth"),
    TorchvisionDetector("maskrcnn_resnet50_fpn", "mask_rcnn", _RCNN_KEYS, "frozen_bn", 0.0, 5, _SIZE,
                        "37.9 box / 34.6 mask mAP", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
    TorchvisionDetector("maskrcnn_resnet50_fpn_v2", "mask_rcnn", _RCNN_KEYS, "bn", None, 5, _SIZE,
                        "47.4 box / 41.8 mask mAP", "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"),
)

#: ``torchvision:<builder>`` -> what hmkd knows of it, for every torchvision FPN detection builder
#: hmkd can train, distil and evaluate (keypointrcnn_resnet50_fpn is not among them: hmkd's data
#: sets and evaluation carry no keypoints).
TORCHVISION_DETECTORS: dict[str, TorchvisionDetector] = {e.name: e for e in _ENTRIES}


def is_torchvision(detector: str | None) -> bool:
    """Whether ``detector`` names a torchvision builder (``torchvision:<builder>``)."""
    return isinstance(detector, str) and detector.startswith(PREFIX)


def torchvision_entry(detector: str) -> TorchvisionDetector:
    """The entry of ``torchvision:<builder>`` (one-line ConfigError for an unknown builder)."""
    entry = TORCHVISION_DETECTORS.get(detector)
    if entry is None:
        known = ", ".join(e.builder for e in _ENTRIES)
        raise ConfigError(f"model.detector: unknown torchvision builder {detector!r} (known: torchvision:<{known}>)")
    return entry


def detector_family(detector: str) -> str:
    """``faster_rcnn`` | ``mask_rcnn`` | ``retinanet`` | ``fcos`` of an hmkd or torchvision detector name."""
    return torchvision_entry(detector).family if is_torchvision(detector) else detector


def freeze_body_layers(body: nn.Module, trainable_layers: int, max_layers: int, what: str) -> None:
    """Freeze all but the last ``trainable_layers`` stages of a backbone body, with torchvision's rule
    (``backbone_utils._resnet_fpn_extractor`` for ResNets, ``_mobilenet_extractor`` for MobileNets)."""
    if not 0 <= trainable_layers <= max_layers:
        raise ConfigError(f"model.trainable_backbone_layers must be in 0..{max_layers} for {what}, got {trainable_layers}")
    children = dict(body.named_children())
    if "layer4" in children:  # ResNet
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            train.append("bn1")
        for name, p in body.named_parameters():
            if all(not name.startswith(layer) for layer in train):
                p.requires_grad_(False)
        return
    blocks = list(children.values())  # MobileNet features (the FPN keeps every block)
    stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    freeze_before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for b in blocks[:freeze_before]:
        for p in b.parameters():
            p.requires_grad_(False)


def set_body_norm(body: nn.Module, norm: str, eps: float | None) -> None:
    """``frozen_bn``: replace every BatchNorm2d of ``body`` by FrozenBatchNorm2d (its statistics and
    affine parameters copied; eps ``eps`` or the layer's default 1e-5, as torchvision's builders
    create them); then, when ``eps`` is given, set it on every (frozen) batch norm of the body."""
    if norm == "frozen_bn":
        for parent in list(body.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    frozen = FrozenBatchNorm2d(child.num_features)
                    with torch.no_grad():
                        for key in ("weight", "bias", "running_mean", "running_var"):
                            getattr(frozen, key).copy_(getattr(child, key))
                    setattr(parent, name, frozen)
    if eps is not None:
        for m in body.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.eps = float(eps)


def build_torchvision_detector(
    detector: str,
    *,
    num_classes: int,
    norm: str,
    norm_eps: float | None = None,
    trainable_backbone_layers: int | None = None,
    min_size: int | list[int] = 800,
    max_size: int = 1333,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    score_thresh: float = 0.05,
    nms_thresh: float | None = None,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
) -> nn.Module:
    """torchvision's ``<builder>(weights=None, weights_backbone=None, num_classes=num_classes + 1, ...)``
    with hmkd's norm, eps, frozen stages and P-named levels (see the module docstring).

    The keyword arguments are hmkd's config keys, passed to the detector class under torchvision's
    names (``score_thresh`` is ``box_score_thresh`` for the R-CNNs, and so on); ``nms_thresh=None``
    keeps torchvision's default.
    """
    entry = torchvision_entry(detector)
    if norm not in ("bn", "frozen_bn"):
        raise ConfigError(
            f"model.norm: {norm!r} does not apply to {detector} (its backbone uses batch norm): set frozen_bn "
            f"or bn (torchvision's COCO checkpoint uses {entry.norm}; configs/torchvision/{entry.builder}.yaml sets it)"
        )
    if num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {num_classes}")
    kwargs: dict[str, Any] = dict(min_size=min_size, max_size=max_size)
    if entry.family in ("faster_rcnn", "mask_rcnn"):
        kwargs.update(
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_batch_size_per_image=box_batch_size_per_image,
            box_score_thresh=score_thresh,
            box_detections_per_img=detections_per_img,
        )
        if nms_thresh is not None:
            kwargs["box_nms_thresh"] = nms_thresh
    else:
        kwargs.update(score_thresh=score_thresh, detections_per_img=detections_per_img, topk_candidates=topk_candidates)
        if nms_thresh is not None:
            kwargs["nms_thresh"] = nms_thresh
    build = getattr(tvd, entry.builder)
    model = build(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)
    body = model.backbone.body
    set_body_norm(body, norm, norm_eps)
    if trainable_backbone_layers is not None:
        freeze_body_layers(body, trainable_backbone_layers, entry.max_trainable, detector)
    model.backbone.level_keys = dict(entry.level_keys)
    model.backbone.levels = entry.levels
    return model


# -- what a state dict is, and COCO's names ------------------------------------------------------
_COUNTER = ".num_batches_tracked"


@functools.lru_cache(maxsize=None)
def _meta_model(builder: str) -> nn.Module:
    """torchvision's ``<builder>`` on the meta device (no memory, no random init: keys and shapes only)."""
    with torch.device("meta"):
        return getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=91)


@functools.lru_cache(maxsize=None)
def builder_keys(detector: str) -> frozenset[str]:
    """The state-dict keys of ``torchvision:<builder>``'s model, without batch-norm
    ``num_batches_tracked`` counters (which FrozenBatchNorm2d drops); they do not depend on the
    class count, the norm or the sizes."""
    model = _meta_model(torchvision_entry(detector).builder)
    return frozenset(k for k in model.state_dict() if not k.endswith(_COUNTER))


def same_weights(a: str, b: str) -> bool:
    """Whether two ``torchvision:`` detectors hold the same state-dict keys, so that one's file
    loads into the other (e.g. the MobileNetV3 FPN and its 320 px variant, which differ only in
    sizes)."""
    return a == b or builder_keys(a) == builder_keys(b)


def torchvision_builders_of(state_dict: Mapping[str, Any]) -> list[str]:
    """The ``torchvision:<builder>`` names whose model has exactly ``state_dict``'s keys (batch-norm
    counters aside; torchvision's old key names are renamed first, as loading does), in
    :data:`TORCHVISION_DETECTORS` order: a file saved with ``torch.save(model.state_dict())`` from
    one of the builders (two names for the MobileNetV3 pair, whose weights are the same). Empty
    when the keys are no builder's."""
    from hmkd.models.weights import upgrade_legacy_keys

    out = []
    for name, entry in TORCHVISION_DETECTORS.items():
        sd = dict(state_dict)
        upgrade_legacy_keys(_meta_model(entry.builder), sd)
        if {k for k in sd if not k.endswith(_COUNTER)} == builder_keys(name):
            out.append(name)
    return out


def coco_weights(detector: str) -> Any:
    """The ``<Builder>_Weights`` entry of ``torchvision:<builder>``'s COCO checkpoint (e.g.
    ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``): its metadata ships in the package, and nothing is
    downloaded unless its ``get_state_dict`` is called (hmkd never does)."""
    from torchvision.models import get_model_weights

    return get_model_weights(torchvision_entry(detector).builder).DEFAULT


def coco_categories(detector: str) -> list[str]:
    """torchvision's COCO names of each output ``0..90`` of ``torchvision:<builder>``'s COCO
    checkpoint, from the builder's weight metadata (:func:`coco_weights`, ``.meta["categories"]``).
    Entry 0 is ``__background__``, the ten unused COCO ids are ``N/A``; the others are COCO's
    category names at their category ids."""
    return list(coco_weights(detector).meta["categories"])


__all__ = [
    "PREFIX",
    "TORCHVISION_DETECTORS",
    "TorchvisionDetector",
    "build_torchvision_detector",
    "builder_keys",
    "coco_categories",
    "coco_weights",
    "detector_family",
    "freeze_body_layers",
    "is_torchvision",
    "same_weights",
    "set_body_norm",
    "torchvision_builders_of",
    "torchvision_entry",
]
