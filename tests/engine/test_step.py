"""hmkd.training.step.train_step on a tiny real detector (CPU): what one training step does, in order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hmkd.config import ModelConfig
from hmkd.distill.base import Distiller
from hmkd.engine import distributed as du
from hmkd.training.step import train_step
from hmkd.errors import ConfigError, NonFiniteLossError
from hmkd.models import build_model

TINY = ModelConfig(detector="fcos", backbone="resnet18", fpn_channels=32, head_convs=1, levels=["P3", "P4", "P5", "P6"],
                   min_size=64, max_size=64, detections_per_img=10, topk_candidates=50)


class StepProbe(Distiller):
    """The ``none`` method plus an extra module (its own optimiser) whose ``aux.probe`` loss exists
    on even iterations only (as HMKD's ``aux_every``), and a NaN term on request."""

    name = "step_probe"

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student=student)
        self.probe = nn.Linear(4, 1)
        self.nan_at: int | None = None
        self.empty = False
        self._opts = [("probe", torch.optim.AdamW(self.probe.parameters(), lr=1e-2), 1.0)]

    def extra_modules(self):
        return {"probe": self.probe}

    def extra_optimizers(self):
        return self._opts

    def forward(self, images, targets, iteration=None):
        if self.empty:
            return {}
        losses = super().forward(images, targets, iteration)
        if iteration % 2 == 0:
            losses["aux.probe"] = (self.probe(torch.ones(1, 4)) - 1).pow(2).mean()
        if iteration == self.nan_at:
            losses["distill.bad"] = losses["aux.probe"] * float("nan")
        return losses


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0], [30.0, 30.0, 60.0, 50.0]]), "labels": torch.tensor([1, 2])}
               for _ in range(2)]
    return images, targets


@pytest.fixture()
def run():
    torch.manual_seed(0)
    distiller = StepProbe(build_model(TINY, 3)).train()
    main = distiller.student_parameters() + distiller.distiller_parameters()
    opt = torch.optim.SGD(main, lr=1.0, momentum=0.0)
    return distiller, opt, main


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, before):
    return [not torch.equal(p, b) for p, b in zip(params, before)]


def test_step_updates_parameters_clips_and_calls_the_clock_in_order(run):
    distiller, opt, main = run
    images, targets = _batch()
    before = _snapshot(main)
    probe_before = _snapshot(distiller.probe.parameters())
    seen = []

    def clock(phase):
        seen.append((phase, any(p.grad is not None for p in main), any(_changed(main, before))))

    values = train_step(distiller, opt, images, targets, 0, main_params=main, clip_grad=1e-3,
                        extra_optimizers=distiller.extra_optimizers(), ctx=du.DistContext(), clock=clock)
    # forward: no gradient yet; backward: gradients, weights untouched; optimizer: weights moved
    assert seen == [("forward", False, False), ("backward", True, False), ("optimizer", True, True)]
    assert list(values)[-1] == "total" and "aux.probe" in values
    assert any(k.startswith("student.") for k in values)
    assert all(isinstance(v, float) for v in values.values())
    assert values["total"] == pytest.approx(sum(v for k, v in values.items() if k != "total"), rel=1e-6)
    # clipped before the step: SGD(lr=1) moves the main parameters by exactly the clipped gradient
    step = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(main, before)])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert all(_changed(distiller.probe.parameters(), probe_before))  # the extra optimiser stepped


def test_nonfinite_loss_stops_before_any_parameter_or_gradient_is_touched(run):
    distiller, opt, main = run
    distiller.nan_at = 4
    images, targets = _batch()
    params = main + list(distiller.probe.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # a zero_grad would drop these
    before = _snapshot(params)
    seen = []
    with pytest.raises(NonFiniteLossError) as e:
        train_step(distiller, opt, images, targets, 4, main_params=main, clip_grad=1.0,
                   extra_optimizers=distiller.extra_optimizers(), clock=seen.append)
    msg = str(e.value)
    assert msg.startswith("non-finite loss at iteration 5: distill.bad=nan, total=nan;")
    assert "student." not in msg and "aux.probe" not in msg and "\n" not in msg
    assert seen == ["forward"]
    assert not any(_changed(params, before))
    assert all(p.grad is not None and bool((p.grad == 7.0).all()) for p in params)
    assert not opt.state and not distiller.extra_optimizers()[0][1].state


def test_extra_optimiser_without_gradients_is_skipped_under_a_grad_scaler(run):
    """GradScaler.step refuses an optimiser it saw no gradient of: on odd iterations the probe has
    none (its stale gradient is zeroed), so it must be neither unscaled nor stepped."""
    distiller, opt, main = run
    images, targets = _batch()
    scaler = torch.amp.GradScaler("cpu")
    extras = distiller.extra_optimizers()
    probe_opt = extras[0][1]
    train_step(distiller, opt, images, targets, 0, main_params=main, clip_grad=1.0, extra_optimizers=extras,
               scaler=scaler)
    steps = {int(s["step"]) for s in probe_opt.state.values()}
    assert steps == {1}
    probe_before = _snapshot(distiller.probe.parameters())
    main_before = _snapshot(main)
    values = train_step(distiller, opt, images, targets, 1, main_params=main, clip_grad=1.0, extra_optimizers=extras,
                        scaler=scaler)
    assert "aux.probe" not in values
    assert all(p.grad is None for p in distiller.probe.parameters())
    assert {int(s["step"]) for s in probe_opt.state.values()} == {1}
    assert not any(_changed(distiller.probe.parameters(), probe_before))
    assert any(_changed(main, main_before))


def test_no_loss_is_a_config_error(run):
    distiller, opt, main = run
    distiller.empty = True
    images, targets = _batch()
    with pytest.raises(ConfigError, match=r"method 'step_probe' returned no loss at iteration 3"):
        train_step(distiller, opt, images, targets, 2, main_params=main, clip_grad=None)
