"""The README's library example runs verbatim, and a torchvision-built student works with every method."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision

import hmkd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- api-example:start -->\s*```python\n(.*?)```\s*<!-- api-example:end -->", text, re.S)
    assert m, "README lost its api-example block"
    return m.group(1)


def test_readme_example_runs_verbatim(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md:api-example", "exec"), scope)
    student = scope["student"]
    assert os.path.isfile("runs/api-example/student.pth")
    sd = torch.load("runs/api-example/student.pth", weights_only=True)
    fresh = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=scope["data"].num_classes + 1)
    fresh.load_state_dict(sd)  # a plain torchvision checkpoint: nothing of the distiller inside
    assert any(k.startswith("distill.") for k in scope["losses"])
    assert any(k.startswith("aux.") for k in scope["losses"])
    assert student.training


@pytest.mark.parametrize("method", ["none", "fitnet", "fgd", "icd", "hmkd"])
def test_torchvision_built_student_with_every_method(method: str) -> None:
    torch.manual_seed(0)
    student = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=128, max_size=128,
        rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, box_batch_size_per_image=32)
    teacher = hmkd.build_detector("faster_rcnn", "resnet18", num_classes=3, fpn_channels=64, min_size=128, max_size=128)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opts = {"hidden": 32, "heads": 4} if method in ("hmkd", "icd") else {}
    kd = hmkd.distiller(method, teacher=teacher if method != "none" else None, student=student, **opts)
    opt = torch.optim.SGD(kd.student_parameters() + kd.distiller_parameters(), lr=1e-3)
    kd.train()
    images = [torch.rand(3, 100, 120), torch.rand(3, 120, 100)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 25.0, 22.0], [40.0, 40.0, 90.0, 80.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 50.0, 15.0, 60.0]]), "labels": torch.tensor([2])}]
    for _ in range(2):
        losses = kd(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        kd.step_extra_optimizers()
    if method != "none":
        assert any(k.startswith("distill.") for k in losses)
    for k, v in teacher.state_dict().items():
        assert torch.equal(before[k], v)
