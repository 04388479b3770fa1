"""hmkd.engine.optim.clip_and_step, the one clip-and-step of the training step, the decoder fit and
Distiller.step_extra_optimizers: bit-identical to clipping every parameter list and then stepping
every optimiser by hand, with and without a GradScaler."""

from __future__ import annotations

import pytest
import torch

from hmkd.engine.optim import clip_and_step, optimizer_params


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in [*a.parameters(), *b.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(5, 4, generator=g)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, weight_decay=0.1)  # (AdamW would hide a clip)
    return a, b, x, opt_a, opt_b


def _loss(a, b, x):
    return (b(torch.relu(a(x))) ** 2).sum() * 10.0


def _state(*mods):
    return [p.detach().clone() for m in mods for p in m.parameters()]


@pytest.mark.parametrize("clips", [(0.5, 0.01), (None, 0.3), (0.0, None)])
def test_same_as_clipping_then_stepping_by_hand(clips):
    ca, cb = clips
    a, b, x, opt_a, opt_b = _setup()
    _loss(a, b, x).backward()
    clip_and_step([(opt_a, list(a.parameters()), ca), (opt_b, optimizer_params(opt_b), cb)])
    got = _state(a, b)

    a, b, x, opt_a, opt_b = _setup()
    _loss(a, b, x).backward()
    for params, clip in ((list(a.parameters()), ca), (list(b.parameters()), cb)):
        if clip:  # None or 0: no clipping
            torch.nn.utils.clip_grad_norm_(params, clip)
    opt_a.step()
    opt_b.step()
    want = _state(a, b)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    before = _state(*_setup()[:2])
    assert not all(torch.equal(g, w) for g, w in zip(got, before))  # the step moved the parameters


def test_under_a_grad_scaler_unscales_clips_steps_and_updates():
    a, b, x, opt_a, opt_b = _setup(1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(a, b, x)).backward()
    clip_and_step([(opt_a, optimizer_params(opt_a), 0.5), (opt_b, optimizer_params(opt_b), 0.01)], scaler)
    got, scale = _state(a, b), scaler.get_scale()

    a, b, x, opt_a, opt_b = _setup(1)
    ref = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref.scale(_loss(a, b, x)).backward()
    ref.unscale_(opt_a)
    ref.unscale_(opt_b)
    torch.nn.utils.clip_grad_norm_(list(a.parameters()), 0.5)
    torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.01)
    ref.step(opt_a)
    ref.step(opt_b)
    ref.update()
    assert all(torch.equal(g, w) for g, w in zip(got, _state(a, b)))
    assert scale == ref.get_scale()


def test_parameters_without_gradients_are_left_alone():
    a, b, x, opt_a, _ = _setup(2)
    opt_ab = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    a(x).sum().backward()  # b takes no gradient
    b_before = _state(b)
    clip_and_step([(opt_ab, optimizer_params(opt_ab), 1e-3)])
    assert all(torch.equal(g, w) for g, w in zip(_state(b), b_before))
    assert optimizer_params(opt_ab) == [*a.parameters(), *b.parameters()]
