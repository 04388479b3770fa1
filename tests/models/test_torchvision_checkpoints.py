"""What a torchvision checkpoint says about itself, and how it is compared with a config.

Bare torchvision state dicts are recognised by their keys as the builder they came from (the
models are built on the meta device: keys only, nothing allocated); a ``torchvision:`` config is
compared on what fixes its weights (the builder and the class count), never on hmkd-only keys such
as ``model.backbone``; COCO's category names come from torchvision's weight metadata, with label =
COCO category id and the unused ids as labels without a category.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torchvision.models import detection as tvd

from hmkd.config import ModelConfig
from hmkd.errors import CheckpointError
from hmkd.models.checkpoint_info import (
    CheckpointInfo,
    LabelMap,
    arch_name,
    check_fits,
    check_keys_fit,
    checkpoint_classes,
    guess_arch,
    read_checkpoint_info,
)
from hmkd.models.torchvision_zoo import (
    TORCHVISION_DETECTORS,
    coco_categories,
    same_weights,
    torchvision_builders_of,
)

NAMES = list(TORCHVISION_DETECTORS)
MOBILENETS = ["torchvision:fasterrcnn_mobilenet_v3_large_fpn", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"]


def meta_state_dict(builder: str, num_classes: int = 91) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=num_classes).state_dict()


def bare(name: str, sd: dict, path: str = "tv.pth") -> CheckpointInfo:
    return CheckpointInfo(path, None, None, None, sd)


@pytest.mark.parametrize("name", NAMES)
def test_a_bare_file_is_recognised_as_its_builder(name):
    entry = TORCHVISION_DETECTORS[name]
    sd = meta_state_dict(entry.builder)
    assert torchvision_builders_of(sd) == (MOBILENETS if name in MOBILENETS else [name])
    assert guess_arch(sd) == {"detector": entry.family, "backbone": entry.backbone}
    assert checkpoint_classes(bare(name, sd), name) == 90
    # the builder's own file passes, whatever the hmkd-only keys of the config say
    check_keys_fit(bare(name, sd), ModelConfig(detector=name, backbone="resnet18", fpn_channels=64, norm="bn"))
    # without the counters FrozenBatchNorm2d drops, it is the same builder
    assert name in torchvision_builders_of({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})


def test_another_builders_file_is_named_in_one_line():
    retina = bare("r", meta_state_dict("retinanet_resnet50_fpn"), "retina.pth")
    with pytest.raises(CheckpointError) as e:
        check_keys_fit(retina, ModelConfig(detector="torchvision:retinanet_resnet50_fpn_v2", norm="bn"), hint="!")
    assert str(e.value) == ("retina.pth: checkpoint is torchvision:retinanet_resnet50_fpn (read off its keys), "
                            "config says torchvision:retinanet_resnet50_fpn_v2 (model.detector)!")
    mobile = bare("m", meta_state_dict("fasterrcnn_mobilenet_v3_large_fpn"), "m.pth")
    with pytest.raises(CheckpointError, match=re.escape(
            "m.pth: checkpoint is torchvision:fasterrcnn_mobilenet_v3_large_fpn or "
            "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn (read off its keys), config says "
            "torchvision:fasterrcnn_resnet50_fpn (teacher.detector)")):
        check_keys_fit(mobile, ModelConfig(detector="torchvision:fasterrcnn_resnet50_fpn", norm="bn"), section="teacher")
    # the MobileNetV3 pair differ only in sizes: each one's file fits the other
    check_keys_fit(mobile, ModelConfig(detector=MOBILENETS[1], norm="bn"))
    assert same_weights(*MOBILENETS) and not same_weights(NAMES[0], NAMES[1])
    # an hmkd detector's file into a torchvision: config is named by its family and body
    from hmkd.models import build_detector

    own = build_detector("faster_rcnn", "resnet18", num_classes=3, fpn_channels=32, norm="bn")
    with pytest.raises(CheckpointError, match=re.escape(
            "own.pth: checkpoint is faster_rcnn/resnet18 (read off its keys), config says "
            "torchvision:fasterrcnn_resnet50_fpn (model.detector)")):
        check_keys_fit(bare("o", own.state_dict(), "own.pth"), ModelConfig(detector=NAMES[0], norm="bn"))


def test_a_stored_torchvision_config_is_compared_on_builder_and_classes(tmp_path):
    sd = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(91, 8)}
    stored = {"model": {"detector": "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "backbone": "resnet18",
                        "num_classes": 90, "norm": "bn", "fpn_channels": 256}}
    torch.save({"model": sd, "config": stored}, tmp_path / "tv.pth")
    info = read_checkpoint_info(tmp_path / "tv.pth")
    assert info.arch == "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    # hmkd-only keys and the norm (no tensor changes) are not compared; the same weights' builder fits
    check_fits(info, ModelConfig(detector=MOBILENETS[0], backbone="resnet50", fpn_channels=64, norm="frozen_bn"))
    with pytest.raises(CheckpointError, match=re.escape(
            "checkpoint is torchvision:fasterrcnn_mobilenet_v3_large_320_fpn with 90 classes, config says "
            "torchvision:fasterrcnn_mobilenet_v3_large_fpn with 6 classes (model.num_classes)")):
        check_fits(info, ModelConfig(detector=MOBILENETS[0], norm="bn"), num_classes=6)
    with pytest.raises(CheckpointError, match=re.escape(
            "checkpoint is torchvision:fasterrcnn_mobilenet_v3_large_320_fpn, config says faster_rcnn/resnet18 "
            "(model.detector)")):
        check_fits(info, ModelConfig(detector="faster_rcnn", backbone="resnet18", num_classes=90))
    assert arch_name(ModelConfig(detector="fcos", backbone="resnet34")) == "fcos/resnet34"


def test_cocos_names_from_torchvisions_metadata():
    cats = coco_categories("torchvision:fcos_resnet50_fpn")
    assert len(cats) == 91 and cats[0] == "__background__" and cats.count("N/A") == 10
    coco = LabelMap.torchvision_coco("torchvision:fcos_resnet50_fpn")
    assert coco.num_classes == 90 and coco.name(1) == "person" and coco.name(90) == "toothbrush"
    assert coco.category_id(12) is None and coco.name(12) == "N/A" and coco.category_id(13) == 13
    by_label = coco.by_label()
    assert len(by_label) == 80 and "12" not in by_label and by_label["18"] == {"category_id": 18, "name": "dog"}
    assert LabelMap.from_dict(json.loads(json.dumps(coco.to_dict()))) == coco  # JSON null: no category
    assert coco.padded(92).num_classes == 92 and coco.padded(92).name(92) == "N/A"


def test_category_id_label_maps_have_a_slot_per_label(tmp_path):
    class DataSet:  # what LabelMap reads of hmkd's CocoDetection
        cat_ids = [1, 3, 7]
        class_names = ["__background__", "car", "bike", "dog"]
        label_map = "category_id"

    lm = LabelMap.from_dataset(DataSet())
    assert lm.category_ids == (1, None, 3, None, None, None, 7) and lm.name(7) == "dog" and lm.name(2) == "N/A"
    DataSet.label_map = "contiguous"
    assert LabelMap.from_dataset(DataSet()).category_ids == (1, 3, 7)
    # a file written when the map had one entry per category reads as labels = ids
    sd = {"head.classification_head.cls_logits.weight": torch.zeros(8, 4)}
    torch.save({"model": sd, "config": {"model": {"detector": "fcos", "num_classes": 7},
                                        "data": {"label_map": "category_id"}},
                "label_map": {"category_ids": [1, 3, 7], "names": ["car", "bike", "dog"]}}, tmp_path / "old.pth")
    assert read_checkpoint_info(tmp_path / "old.pth").label_map == lm
