"""``model.detector: torchvision:<builder>``: torchvision's own FPN detectors inside hmkd.

For every torchvision FPN detection builder, a torchvision model built with ``weights=None``
(random weights, nothing downloaded), its state dict saved to a file and loaded into hmkd's
detector through ``model.weights`` gives exactly the same boxes, scores, labels (and masks) in
eval mode and exactly the same training losses on the same batch. The preset files
``configs/torchvision/<builder>.yaml`` are what the hmkd side is built from.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from hmkd.config import load_config
from hmkd.errors import CheckpointError, ConfigError
from hmkd.models import DetectorTap, build_detector, build_model, load_weights
from hmkd.models.torchvision_zoo import TORCHVISION_DETECTORS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILDERS = [e.builder for e in TORCHVISION_DETECTORS.values()]
SIZE = dict(min_size=128, max_size=160)
N_CLASSES = 4  # object classes; torchvision's num_classes counts the background too
# fewer proposals and sampled RoIs than torchvision's defaults keep the R-CNN tests at a few seconds;
# the same values go to both sides (through hmkd's config keys on ours)
RCNN_SMALL = dict(rpn_pre_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_train=50,
                  rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)


def preset(builder: str) -> str:
    return os.path.join(ROOT, "configs", "torchvision", f"{builder}.yaml")


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.rand(3, 150, 128, generator=g), torch.rand(3, 128, 160, generator=g)]


def targets(family: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for boxes, labels, (h, w) in (
        ([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 120.0, 70.0]], [1, 3], (150, 128)),
        ([[5.0, 5.0, 40.0, 50.0]], [4], (128, 160)),
    ):
        t = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}
        if family == "mask_rcnn":
            masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes):
                m[int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2] = 1
            t["masks"] = masks
        out.append(t)
    return out


def small(builder: str) -> dict:
    family = TORCHVISION_DETECTORS[f"torchvision:{builder}"].family
    if family in ("faster_rcnn", "mask_rcnn"):
        # Mask R-CNN pastes every detection's mask into the image, one by one: 20 are enough
        return dict(SIZE, **RCNN_SMALL, box_detections_per_img=20 if family == "mask_rcnn" else 100)
    return dict(SIZE)


def reference(builder: str) -> nn.Module:
    """torchvision's own model, random weights; batch-norm statistics and affine parameters made
    non-trivial (so that a wrong eps or a missing statistic would show) and the one-stage class
    biases zeroed (so that every threshold passes and there are detections to compare)."""
    torch.manual_seed(0)
    model = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=N_CLASSES + 1, **small(builder))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)
        for name, p in model.named_parameters():
            if name.endswith("cls_logits.bias"):
                p.zero_()
    return model


def frozen_like_torchvision(model: nn.Module, eps: float | None) -> nn.Module:
    """A copy of ``model`` whose backbone body's BatchNorm2d layers are torchvision's FrozenBatchNorm2d
    (default eps 1e-5, or ``eps``), as torchvision's builders make them when given weights."""
    model = copy.deepcopy(model)
    for parent in list(model.backbone.body.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features) if eps is None else FrozenBatchNorm2d(child.num_features, eps)
                frozen.load_state_dict(child.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked itself
                setattr(parent, name, frozen)
    return model


def hmkd_model(builder: str, weights: str, *overrides: str) -> nn.Module:
    hmkd_key = {"box_detections_per_img": "detections_per_img"}  # the other keys share torchvision's names
    sizes = [f"model.{hmkd_key.get(k, k)}={v}" for k, v in small(builder).items()]
    cfg = load_config(preset(builder), [*sizes, f"model.weights={weights}", *overrides])
    return build_model(cfg.model, N_CLASSES)


def assert_same_detections(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("builder", BUILDERS)
def test_torchvision_state_dict_gives_torchvisions_outputs_and_losses(builder, tmp_path):
    entry = TORCHVISION_DETECTORS[f"torchvision:{builder}"]
    ref = reference(builder)
    path = str(tmp_path / "tv.pth")
    torch.save(ref.state_dict(), path)
    ims = images()

    # the model torchvision's builder makes with weights=None: batch norm everywhere, all layers trained
    ours = hmkd_model(builder, path, "model.norm=bn", "model.norm_eps=null", "model.trainable_backbone_layers=null")
    assert type(ours) is type(ref)
    ref.eval(), ours.eval()
    with torch.no_grad():
        expected = ref(ims)
        assert_same_detections(ours(ims), expected)
    assert sum(len(d["boxes"]) for d in expected) > 0, "nothing detected: the comparison would be empty"

    # the preset as it is (torchvision's pretrained-weight setting): the same as torchvision's
    # model with FrozenBatchNorm2d at the checkpoint's eps
    as_preset = hmkd_model(builder, path).eval()
    if entry.norm == "frozen_bn":
        body_norms = {type(m) for m in as_preset.backbone.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}
        assert body_norms == {FrozenBatchNorm2d}
        eps = {m.eps for m in as_preset.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)}
        assert eps == {1e-5 if entry.norm_eps is None else entry.norm_eps}
        with torch.no_grad():
            assert_same_detections(as_preset(ims), frozen_like_torchvision(ref, entry.norm_eps).eval()(ims))
    else:
        with torch.no_grad():
            assert_same_detections(as_preset(ims), expected)
    assert [k for k, p in as_preset.named_parameters() if not p.requires_grad], "trainable_backbone_layers: 3 froze nothing"

    # training losses on the same batch (same random stream for the R-CNN samplers)
    ref.train(), ours.train()
    batch = targets(entry.family)
    torch.manual_seed(5)
    want = ref(ims, copy.deepcopy(batch))
    torch.manual_seed(5)
    got = ours(ims, copy.deepcopy(batch))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _settings(model: nn.Module) -> dict:
    """What a detector's own settings are: sizes, anchors, proposal counts, thresholds."""
    out = {"min_size": model.transform.min_size, "max_size": model.transform.max_size}
    ag = model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator
    out.update(sizes=ag.sizes, ratios=ag.aspect_ratios)
    if hasattr(model, "rpn"):
        rpn, rh = model.rpn, model.roi_heads
        out.update(pre=rpn._pre_nms_top_n, post=rpn._post_nms_top_n, rpn_score=rpn.score_thresh, rpn_nms=rpn.nms_thresh,
                   rpn_batch=rpn.fg_bg_sampler.batch_size_per_image, batch=rh.fg_bg_sampler.batch_size_per_image,
                   score=rh.score_thresh, nms=rh.nms_thresh, dets=rh.detections_per_img)
    else:
        out.update(score=model.score_thresh, nms=model.nms_thresh, dets=model.detections_per_img,
                   topk=model.topk_candidates, radius=getattr(model, "center_sampling_radius", None))
    return out


@pytest.mark.parametrize("builder", BUILDERS)
def test_preset_is_torchvisions_architecture_and_settings(builder):
    """The preset file, unchanged, against torchvision's builder with its own defaults: the same
    modules (the body's BatchNorm2d frozen where torchvision's checkpoint has it frozen), the same
    state-dict keys, sizes, anchors, proposal counts and thresholds."""
    entry = TORCHVISION_DETECTORS[f"torchvision:{builder}"]
    with torch.device("meta"):
        theirs = getattr(tvd, builder)(weights=None, weights_backbone=None)  # 91 outputs: COCO
        ours = build_model(load_config(preset(builder)).model, 90)
    assert _settings(ours) == _settings(theirs)
    counter = "num_batches_tracked"
    assert [k for k in ours.state_dict() if counter not in k] == [k for k in theirs.state_dict() if counter not in k]
    want = {n: type(m).__name__ for n, m in theirs.named_modules()}
    if entry.norm == "frozen_bn":
        want.update({n: "FrozenBatchNorm2d" for n, m in theirs.named_modules()
                     if n.startswith("backbone.body.") and isinstance(m, nn.BatchNorm2d)})
    assert {n: type(m).__name__ for n, m in ours.named_modules()} == want


@pytest.mark.parametrize("builder", BUILDERS)
def test_levels_are_named_by_stride_for_the_distillers(builder):
    entry = TORCHVISION_DETECTORS[f"torchvision:{builder}"]
    torch.manual_seed(0)
    model = build_detector(f"torchvision:{builder}", num_classes=2, norm="frozen_bn", min_size=256, max_size=256,
                           rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=10, detections_per_img=5).eval()
    with torch.no_grad():
        res = DetectorTap(model)([torch.rand(3, 256, 256)])
    assert list(res.features) == entry.levels == model.backbone.levels
    for level, f in res.features.items():
        assert res.tensors.shape[-1] // f.shape[-1] == 2 ** int(level[1:]), level


def test_trainable_backbone_layers_follow_torchvisions_own_rule():
    # ResNet-50: torchvision's _resnet_fpn_extractor; MobileNetV3: _mobilenet_extractor
    for layers in (0, 3, 5):
        ours = build_detector("torchvision:fcos_resnet50_fpn", num_classes=2, norm="bn", trainable_backbone_layers=layers)
        theirs = _resnet_fpn_extractor(resnet50(), layers)
        assert {k for k, p in ours.backbone.body.named_parameters() if p.requires_grad} == {
            k for k, p in theirs.body.named_parameters() if p.requires_grad
        }
    for layers in (0, 3, 6):
        ours = build_detector(
            "torchvision:fasterrcnn_mobilenet_v3_large_fpn", num_classes=2, norm="bn", trainable_backbone_layers=layers
        )
        theirs = _mobilenet_extractor(mobilenet_v3_large(), True, layers)
        assert {k for k, p in ours.backbone.body.named_parameters() if p.requires_grad} == {
            k for k, p in theirs.body.named_parameters() if p.requires_grad
        }
    with pytest.raises(ConfigError, match=r"trainable_backbone_layers must be in 0\.\.5"):
        build_detector("torchvision:retinanet_resnet50_fpn", num_classes=2, norm="bn", trainable_backbone_layers=6)


def test_one_line_errors_for_a_torchvision_detector():
    with pytest.raises(ConfigError) as e:
        build_detector("torchvision:ssd300_vgg16", num_classes=2, norm="bn")
    assert "unknown torchvision builder 'torchvision:ssd300_vgg16'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_detector("torchvision:fcos_resnet50_fpn", num_classes=2)  # norm gn: hmkd's default, not torchvision's
    msg = str(e.value)
    assert "model.norm: 'gn' does not apply to torchvision:fcos_resnet50_fpn" in msg and "frozen_bn" in msg and "\n" not in msg


def test_old_torchvision_key_names_and_frozen_bn_files_load(tmp_path):
    """torchvision's 2019 COCO checkpoints use the heads' and FPN's old key names (renamed on load
    by torchvision's own ``_load_from_state_dict``) and, saved from FrozenBatchNorm2d, carry no
    ``num_batches_tracked``; both load into a BatchNorm2d model, giving the same outputs."""
    ref = reference("maskrcnn_resnet50_fpn").eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    old = {}
    for k, v in sd.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        k = k.replace("backbone.fpn.inner_blocks.0.0.", "backbone.fpn.inner_blocks.0.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        old[k] = v
    assert "rpn.head.conv.weight" in old and "roi_heads.mask_head.mask_fcn1.weight" in old
    path = str(tmp_path / "old.pth")
    torch.save(old, path)
    ours = hmkd_model("maskrcnn_resnet50_fpn", path, "model.norm=bn", "model.norm_eps=null").eval()
    with torch.no_grad():
        assert_same_detections(ours(images()), ref(images()))


def test_another_class_count_names_the_way_out_or_skips_the_class_layers(tmp_path, caplog):
    """A torchvision COCO model (91 outputs) as the starting point of a 4-class detector."""
    torch.manual_seed(0)
    coco = tvd.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91, **SIZE)
    path = str(tmp_path / "coco.pth")
    torch.save(coco.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        hmkd_model("retinanet_resnet50_fpn_v2", path)
    msg = str(e.value)
    assert "\n" not in msg and "shape mismatch: head.classification_head.cls_logits.weight" in msg
    assert "the file has 90 classes + background: set num_classes: 90" in msg and "weights_skip_classes: true" in msg
    with caplog.at_level(logging.WARNING, logger="hmkd.models.weights"):
        model = hmkd_model("retinanet_resnet50_fpn_v2", path, "model.weights_skip_classes=true")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "(819 outputs in the file, 45 here)" not in warnings[0]  # classes, not anchors x classes
    assert "(91 outputs in the file, 5 here)" in warnings[0]
    assert "head.classification_head.cls_logits.weight, head.classification_head.cls_logits.bias" in warnings[0]
    theirs, own = coco.state_dict(), model.state_dict()
    for k in own:
        if "cls_logits" in k:
            assert own[k].shape != theirs[k].shape
        else:
            assert torch.equal(own[k], theirs[k]), k
    # anything else that differs is still an error, skip or not
    other = {k: v for k, v in coco.state_dict().items() if "regression_head.bbox_reg" not in k}
    torch.save(other, path)
    with pytest.raises(CheckpointError, match="missing keys: head.regression_head.bbox_reg"):
        hmkd_model("retinanet_resnet50_fpn_v2", path, "model.weights_skip_classes=true")


def test_hmkd_faster_rcnn_r50_with_frozen_bn_loads_the_num_batches_tracked_of_a_torchvision_file(tmp_path):
    """hmkd's own ResNet-50 Faster R-CNN with frozen_bn takes a torchvision fasterrcnn_resnet50_fpn
    state dict (BatchNorm2d, with num_batches_tracked), as the README says."""
    torch.manual_seed(0)
    tv = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **SIZE)
    path = str(tmp_path / "tv.pth")
    torch.save(tv.state_dict(), path)
    assert any(k.endswith("num_batches_tracked") for k in tv.state_dict())
    ours = build_detector("faster_rcnn", "resnet50", num_classes=2, norm="frozen_bn", **SIZE)
    load_weights(ours, path)
    assert torch.equal(ours.state_dict()["backbone.body.layer1.0.bn1.running_var"], tv.state_dict()["backbone.body.layer1.0.bn1.running_var"])


def test_norm_eps_and_trainable_layers_on_hmkds_own_detectors():
    model = build_detector("faster_rcnn", "resnet18", num_classes=2, fpn_channels=32, norm="frozen_bn", norm_eps=0.0,
                           trainable_backbone_layers=3)
    assert {m.eps for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    trained = {k.split(".")[0] for k, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    with pytest.raises(ConfigError, match="model.norm_eps applies to batch norm"):
        build_detector("fcos", "resnet18", num_classes=2, norm="gn", norm_eps=1e-3)
    with pytest.raises(ConfigError, match="trainable_backbone_layers applies to ResNet backbones"):
        build_detector("fcos", "mobilenet_v2", num_classes=2, trainable_backbone_layers=2)
