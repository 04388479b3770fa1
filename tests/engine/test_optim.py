"""Optimisers and the learning-rate schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from hmkd.config import TrainConfig
from hmkd.engine.optim import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients
from hmkd.errors import ConfigError


def _lrs(cfg: TrainConfig, n: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(cfg, [p])
    sched = build_scheduler(cfg, opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_cosine_hand_values():
    cfg = TrainConfig(iters=10, lr=0.1, warmup_iters=4, warmup_factor=0.2, schedule="cosine")
    lrs = _lrs(cfg, 11)
    for i in range(11):
        w = 0.2 * (1 - i / 4) + i / 4 if i < 4 else 1.0
        c = 0.5 * (1 + math.cos(math.pi * i / 10))
        assert lrs[i] == pytest.approx(0.1 * w * c, rel=1e-12), i
    assert lrs[0] == pytest.approx(0.02)  # 0.1 * warmup_factor
    assert lrs[2] == pytest.approx(0.1 * 0.6 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lrs[5] == pytest.approx(0.05)  # half-way through the cosine
    assert lrs[10] == pytest.approx(0.0, abs=1e-15)


def test_step_schedule_hand_values():
    cfg = TrainConfig(iters=10, lr=1.0, warmup_iters=2, warmup_factor=0.5, schedule="step", steps=[4, 7], gamma=0.1)
    lrs = _lrs(cfg, 10)
    expected = [0.5, 0.75, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_constant_schedule_and_no_warmup():
    assert _lrs(TrainConfig(iters=5, lr=0.3, warmup_iters=0, schedule="constant"), 5) == pytest.approx([0.3] * 5)
    s = WarmupSchedule(100, "constant", warmup_iters=10, warmup_factor=0.0)
    assert [s(i) for i in (0, 5, 10, 50)] == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_optimizer_kinds_and_bad_values():
    p = torch.nn.Parameter(torch.zeros(3))
    sgd = build_optimizer(TrainConfig(optimizer="sgd", lr=0.01, momentum=0.8, weight_decay=1e-4), [p])
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["weight_decay"] == 1e-4
    adamw = build_optimizer(TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05), [p])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="train.optimizer"):
        build_optimizer(TrainConfig(optimizer="lion"), [p])
    with pytest.raises(ConfigError, match="train.schedule"):
        WarmupSchedule(10, "poly")
    with pytest.raises(ConfigError, match="train.steps"):
        WarmupSchedule(10, "step", steps=[])


def test_schedule_state_survives_a_checkpoint():
    cfg = TrainConfig(iters=20, lr=0.1, warmup_iters=3, schedule="cosine")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg, [p])
    sched = build_scheduler(cfg, opt)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(cfg, [p])
    sched2 = build_scheduler(cfg, opt2)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_clip_gradients():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    assert clip_gradients([p], None) is None
    norm = clip_gradients([p], 1.5)
    assert float(norm) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.5, rel=1e-5)
