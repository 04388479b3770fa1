"""hmkd.models.init_from_teacher: the student starts from the teacher's FPN (and detection head),
tensor by tensor where the shapes match (FGD's init_student, ICD's PRELOAD_FPN / PRELOAD_HEAD)."""

from __future__ import annotations

import logging

import pytest
import torch

from hmkd.errors import ConfigError
from hmkd.models import build_detector, init_from_teacher

SMALL = dict(fpn_channels=32, levels=["P3", "P4", "P5"], min_size=64, max_size=64, head_convs=1)
RCNN = dict(fpn_channels=32, min_size=64, max_size=64)


def _pair(detector="fcos", s_backbone="resnet18", t_backbone="resnet50", s_classes=3, t_classes=3, **kw):
    kwargs = dict(SMALL if detector in ("fcos", "retinanet") else RCNN)
    if detector == "retinanet":
        kwargs.pop("head_convs")
    kwargs.update(kw)
    torch.manual_seed(0)
    student = build_detector(detector, s_backbone, num_classes=s_classes, **kwargs)
    torch.manual_seed(1)
    teacher = build_detector(detector, t_backbone, num_classes=t_classes, **kwargs)
    return student, teacher


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_neck_head_copies_matching_tensors_exactly_and_skips_the_rest(caplog):
    student, teacher = _pair()  # R18 student (C3..C5: 128, 256, 512), R50 teacher (512, 1024, 2048)
    before = _clone(student.state_dict())
    t_sd = teacher.state_dict()
    with caplog.at_level(logging.WARNING, logger="hmkd.models.weights"):
        report = init_from_teacher(student, teacher, "neck_head")
    after = student.state_dict()
    assert report.copied, "nothing copied"
    for k in report.copied:
        assert k.startswith("backbone.fpn.") or k.startswith("head."), k
        assert torch.equal(after[k], t_sd[k]), k
    # every key of the FPN and the head was either copied or named as skipped
    parts = [k for k in after if k.startswith("backbone.fpn.") or k.startswith("head.")]
    assert sorted(report.copied + [k for k, _ in report.skipped]) == sorted(parts)
    # the lateral 1x1 convs differ in input channels: skipped, named, left as they were
    skipped = dict(report.skipped)
    for i, c in enumerate((128, 256, 512)):
        key = f"backbone.fpn.inner_blocks.{i}.0.weight"
        assert skipped[key] == f"({32}, {c * 4}, 1, 1) vs ({32}, {c}, 1, 1)"
        assert torch.equal(after[key], before[key])
    assert "backbone.fpn.layer_blocks.0.0.weight" in report.copied and "head.classification_head.cls_logits.weight" in report.copied
    # the backbone body is never touched
    body = [k for k in after if k.startswith("backbone.body.")]
    assert body and all(torch.equal(after[k], before[k]) for k in body)
    # one warning line: the count and the first names
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("init_student neck_head: 3 tensors skipped")
    assert "backbone.fpn.inner_blocks.0.0.weight" in warnings[0]
    assert report.summary().startswith(f"copied {len(report.copied)} tensors of the teacher's FPN and detection head")


def test_neck_copies_the_fpn_only():
    student, teacher = _pair(t_backbone="resnet34")  # same stage widths: every FPN tensor fits
    before = _clone(student.state_dict())
    report = init_from_teacher(student, teacher, "neck")
    after, t_sd = student.state_dict(), teacher.state_dict()
    fpn = [k for k in after if k.startswith("backbone.fpn.")]
    assert sorted(report.copied) == sorted(fpn) and not report.skipped
    assert all(torch.equal(after[k], t_sd[k]) for k in fpn)
    rest = [k for k in after if not k.startswith("backbone.fpn.")]
    assert all(torch.equal(after[k], before[k]) for k in rest)
    assert any(not torch.equal(after[k], t_sd[k]) for k in rest if k.startswith("head."))


def test_class_count_mismatch_skips_the_classifier_only():
    student, teacher = _pair("retinanet", t_backbone="resnet18", s_classes=3, t_classes=5)
    report = init_from_teacher(student, teacher, "neck_head")
    skipped = [k for k, _ in report.skipped]
    assert skipped == ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
    assert "head.regression_head.bbox_reg.weight" in report.copied


def test_two_stage_head_is_rpn_and_roi_heads():
    student, teacher = _pair("faster_rcnn", t_backbone="resnet18")
    report = init_from_teacher(student, teacher, "neck_head")
    assert not report.skipped
    tops = {k.split(".")[0] if not k.startswith("backbone.") else "backbone.fpn" for k in report.copied}
    assert tops == {"backbone.fpn", "rpn", "roi_heads"}
    t_sd = teacher.state_dict()
    assert all(torch.equal(student.state_dict()[k], t_sd[k]) for k in report.copied)


def test_refusals_are_one_line():
    student, teacher = _pair(t_backbone="resnet18")
    other, _ = _pair("retinanet", t_backbone="resnet18")
    with pytest.raises(ConfigError) as e:
        init_from_teacher(student, other, "neck_head")
    assert str(e.value) == ("distill.init_student: neck_head needs a teacher of the student's family, "
                            "got a RetinaNet teacher and a FCOS student (distill.init_student: none starts the "
                            "student as it is)")
    wide, _ = _pair(t_backbone="resnet18", fpn_channels=64)  # every FPN tensor is 64 wide, not 32
    with pytest.raises(ConfigError, match=r"^distill.init_student: nothing of the teacher's FPN fits the FCOS student"):
        init_from_teacher(student, wide, "neck")
    with pytest.raises(ConfigError, match="must be one of none, neck, neck_head, got 'all'"):
        init_from_teacher(student, teacher, "all")
    before = _clone(student.state_dict())
    report = init_from_teacher(student, teacher, "none")
    assert not report.copied and all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
