"""A teacher with its own class set: every method reads only the teacher's backbone + FPN, so a
COCO-91 torchvision teacher distils a student on any class set (one log line says so); a method
that ran the teacher's head would refuse."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hmkd.distill import build_distiller
from hmkd.distill.base import Distiller
from hmkd.errors import ConfigError
from hmkd.models import build_detector

TINY = dict(min_size=160, max_size=160, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
            rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=32)
METHODS = ("fitnet", "fgd", "icd", "hmkd")


@pytest.fixture(scope="module")
def coco_teacher():
    """torchvision's fasterrcnn_resnet50_fpn_v2 with COCO's 91 outputs (random weights)."""
    torch.manual_seed(0)
    return build_detector("torchvision:fasterrcnn_resnet50_fpn_v2", num_classes=90, norm="bn", **TINY)


def _student(num_classes=3):
    torch.manual_seed(1)
    return build_detector("faster_rcnn", "resnet18", num_classes=num_classes, fpn_channels=32, **TINY)


@pytest.mark.parametrize("method", METHODS)
def test_a_coco_teacher_distils_a_three_class_student(method, coco_teacher, make_batch, caplog):
    options = {"hidden": 32, "heads": 4} if method in ("hmkd", "icd") else {}
    with caplog.at_level(logging.INFO, logger="hmkd.distill.base"):
        d = build_distiller(method, student=_student(), teacher=coco_teacher, options=options)
    lines = [r.getMessage() for r in caplog.records if r.name == "hmkd.distill.base"]
    assert lines == [f"teacher has 90 classes, the student 3: method {method!r} uses only the teacher's backbone + FPN, "
                     "so the class sets need not match"]
    assert d.num_classes == 3 and d.common_levels == ["P2", "P3", "P4", "P5", "P6"]
    d.train()
    images, targets = make_batch()
    losses = d(images, targets, iteration=10**6)
    terms = {k: v for k, v in losses.items() if k.startswith("distill.")}
    assert terms and all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(terms.values()).backward()
    assert d.student.backbone.body.conv1.weight.grad is not None


def test_same_classes_say_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="hmkd.distill.base"):
        build_distiller("fitnet", student=_student(3), teacher=_student(3))
    assert not [r for r in caplog.records if r.name == "hmkd.distill.base"]


class _HeadReader(Distiller):
    """A method that would run the teacher's detection head (none of hmkd's does)."""

    name = "head_reader"
    needs_teacher = True
    uses_teacher_head = True


def test_a_method_that_needs_the_teachers_head_still_refuses():
    _HeadReader(student=_student(3), teacher=_student(3))  # same classes: fine
    with pytest.raises(ConfigError) as e:
        _HeadReader(student=_student(3), teacher=_student(5))
    msg = str(e.value)
    assert msg == ("teacher has 5 classes but the student has 3: method 'head_reader' uses the teacher's detection head, "
                   "so both must be trained on the same label set")
