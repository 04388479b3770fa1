"""Hand-value and gradient checks of hmkd.distill.fitnet.FitNetLoss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hmkd.distill.fitnet import FitNetLoss


def test_identity_adapter_hand_value():
    loss_fn = FitNetLoss(2, 2, weight=3.0)
    assert isinstance(loss_fn.adapter, nn.Identity)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).view(1, 2, 2, 2)
    t = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, -2.0]).view(1, 2, 2, 2)
    # squared diffs: 1, 4, 4, 4, 1, 0, 0, 4 -> sum 18, mean 18/8 = 2.25, x3 = 6.75
    assert loss_fn(s, t).item() == pytest.approx(6.75)


def test_conv_adapter_hand_value():
    loss_fn = FitNetLoss(1, 2)
    assert isinstance(loss_fn.adapter, nn.Conv2d)
    with torch.no_grad():
        loss_fn.adapter.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        loss_fn.adapter.bias.copy_(torch.tensor([0.5, 0.0]))
    s = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    t = torch.zeros(1, 2, 1, 2)
    # adapted: ch0 = 2x+0.5 -> 2.5, 6.5 ; ch1 = -x -> -1, -3 ; squares 6.25+42.25+1+9 = 58.5 ; /4
    assert loss_fn(s, t).item() == pytest.approx(58.5 / 4)


def test_gradient_reaches_student_and_adapter_not_teacher():
    torch.manual_seed(0)
    loss_fn = FitNetLoss(3, 4, weight=0.5)
    s = torch.randn(2, 3, 5, 6, requires_grad=True)
    t = torch.randn(2, 4, 5, 6, requires_grad=True)  # even if a caller forgot no_grad
    t_before = t.detach().clone()
    loss_fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert loss_fn.adapter.weight.grad is not None and loss_fn.adapter.weight.grad.abs().sum() > 0
    assert t.grad is None
    assert torch.equal(t.detach(), t_before)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="teacher shape"):
        FitNetLoss(2, 2)(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 3))
