"""Tiny detectors and one small batch for the distiller tests (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from hmkd.models import build_detector

TINY = dict(min_size=160, max_size=160, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
            rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=32)


def _pair(detector: str = "faster_rcnn", levels=None, num_classes: int = 3):
    """A ResNet-18 student (32 FPN channels) and a ResNet-34 teacher (64), seeded."""
    torch.manual_seed(0)
    student = build_detector(detector, "resnet18", num_classes=num_classes, fpn_channels=32, levels=levels, **TINY)
    teacher = build_detector(detector, "resnet34", num_classes=num_classes, fpn_channels=64, levels=levels, **TINY)
    return student, teacher


def _batch():
    """Two images; objects of 560, 80 and 5400 px (image 0) and 150 px (image 1) before resizing."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 120, 150, generator=g), torch.rand(3, 140, 110, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 40.0], [60.0, 50.0, 70.0, 58.0], [80.0, 20.0, 140.0, 110.0]]),
         "labels": torch.tensor([1, 2, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 20.0, 15.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


@pytest.fixture
def tiny_kwargs():
    """build_detector keywords of a tiny, fast detector."""
    return dict(TINY)


@pytest.fixture
def make_pair():
    """``make_pair(detector="faster_rcnn", levels=None)`` -> fresh (student, teacher)."""
    return _pair


@pytest.fixture
def make_batch():
    """``make_batch()`` -> (images, targets)."""
    return _batch


@pytest.fixture(scope="module")
def shared_pair():
    """One (student, teacher) for a whole test module, for tests that only build distillers."""
    return _pair()
