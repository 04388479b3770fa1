"""ICD as its authors run it: per-family defaults, no adapter, the decoder's optimiser over the
student-side projection too (cosine, joint clip 0.01), the bypass window, which inquiries the
distillation uses, and where each loss's gradient goes."""

from __future__ import annotations

import math

import pytest
import torch

from hmkd.distill import build_distiller
from hmkd.distill.losses import attention_weighted_mse
from hmkd.training.step import train_step

SMALL = {"hidden": 32, "heads": 4}


def _grads(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


@pytest.mark.parametrize("detector,levels,weight,cap", [("faster_rcnn", None, 3.0, 100), ("mask_rcnn", None, 3.0, 100),
                                                        ("retinanet", None, 8.0, 300)])
def test_defaults_per_detector_family(detector, levels, weight, cap, make_pair) -> None:
    student, teacher = make_pair(detector, levels)
    d = build_distiller("icd", student=student, teacher=teacher, options=SMALL)
    assert d.weight == weight and d.decoder.max_inquiries == cap
    assert d.levels == (["P2", "P3", "P4", "P5", "P6"] if "rcnn" in detector else ["P3", "P4", "P5", "P6", "P7"])
    dec = d.decoder
    assert (dec.encoding, dec.fakes_per_real, dec.jitter, dec.padding_mask) == ("icd", 5, 0.3, True)
    set_ = build_distiller("icd", student=student, teacher=teacher,
                           options={**SMALL, "weight": 1.5, "max_inquiries": 7, "levels": ["P4"]})
    assert set_.weight == 1.5 and set_.decoder.max_inquiries == 7 and set_.levels == ["P4"]


def test_no_adapter_and_one_decoder_optimiser_with_the_projection(shared_pair) -> None:
    student, teacher = shared_pair  # student FPN 32 channels, teacher 64
    d = build_distiller("icd", student=student, teacher=teacher, options=SMALL)
    assert not hasattr(d, "adapters") and d.value_proj.proj.in_features == 32 and d.decoder.in_channels == 64
    assert d.distiller_parameters() == []  # nothing of ICD is trained by the student's optimiser
    (name, opt, clip), = d.extra_optimizers()
    assert name == "decoder" and isinstance(opt, torch.optim.AdamW) and clip == 0.01
    group = opt.param_groups[0]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 1e-4
    want = {id(p) for m in (d.decoder, d.value_proj) for p in m.parameters()}
    assert {id(p) for p in group["params"]} == want
    assert set(d.extra_modules()) == {"decoder", "value_proj"}
    # cosine to 0 over the run, no warm-up
    (sname, sched), = d.extra_schedulers(4)
    assert sname == "decoder" and d.total_iters == 4 and d.extra_schedulers(4)[0][1] is sched
    lrs = []
    for _ in range(5):
        lrs.append(group["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)])
    with pytest.raises(ValueError, match="already built for 4"):
        d.extra_schedulers(8)


def test_bypass_window_default_is_the_authors_share_of_the_run(shared_pair) -> None:
    student, teacher = shared_pair

    def bypass(total, **opts):
        d = build_distiller("icd", student=student, teacher=teacher, options={**SMALL, **opts})
        if total is not None:
            d.extra_schedulers(total)
        return d.bypass_iters

    assert bypass(None) == 1000  # not told the run length: the authors' 90k-iteration run
    assert bypass(90_000) == 1000 and bypass(360) == 4 and bypass(45) == 0 and bypass(270_000) == 3000
    assert bypass(360, bypass_iters=1000) == 1000 and bypass(None, bypass_iters=0) == 0


def _spied(d):
    """Record the decoder's AuxOutput and the queries its attention pass sees."""
    seen: dict = {}
    aux_task, attend = d.decoder.aux_task, d.decoder.attend

    def aux_spy(*a, **k):
        seen["aux"] = aux_task(*a, **k)
        return seen["aux"]

    def attend_spy(queries, kv):
        seen["queries"], seen["kv"] = queries, kv
        seen["m"] = attend(queries, kv)
        return seen["m"]

    d.decoder.aux_task, d.decoder.attend = aux_spy, attend_spy
    orig = d.distill_losses

    def losses_spy(inputs, it):
        seen["inputs"] = inputs
        return orig(inputs, it)

    d.distill_losses = losses_spy
    return seen


def test_distillation_uses_this_steps_jittered_real_inquiries(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("icd", student=student, teacher=teacher, options=SMALL)
    d.train()
    seen = _spied(d)
    losses = d(*make_batch(), iteration=10**6)
    aux = seen["aux"]
    queries, real = aux.real_queries()
    assert torch.equal(seen["queries"], queries)  # the aux task's own (jittered) inquiries, real rows
    assert real.tolist() == [[True, True, True], [True, False, False]]  # image 1's fakes excluded
    assert aux.valid.sum() == 4 + 20  # 5 fakes per object
    inputs = seen["inputs"]
    v_s = d.value_proj([inputs.student.features[l] for l in d.levels])
    want = 3.0 * attention_weighted_mse(seen["m"], v_s, seen["kv"].values, real, reduction="image")
    assert torch.allclose(losses["distill.icd"], want)
    batch = build_distiller("icd", student=student, teacher=teacher, options={**SMALL, "reduction": "batch"})
    assert batch.options.reduction == "batch"


@pytest.mark.parametrize("iteration,student_learns", [(1, False), (2, True)])
def test_bypass_window_trains_the_projection_only(iteration, student_learns, make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("icd", student=student, teacher=teacher, options={**SMALL, "bypass_iters": 2})
    d.train()
    losses = d(*make_batch(), iteration=iteration)
    assert losses["distill.icd"] > 0  # computed (and weighted) inside the window too
    losses["distill.icd"].backward()
    assert all(_grads(d.value_proj))
    assert any(_grads(student.backbone.fpn)) == student_learns
    assert (student.backbone.body.conv1.weight.grad is not None) == student_learns
    assert not any(_grads(d.decoder))  # never the decoder: m and the teacher values are targets


def test_each_loss_reaches_exactly_its_parameters(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("icd", student=student, teacher=teacher, options=SMALL)
    d.train()
    losses = d(*make_batch(), iteration=10**6)
    assert sorted(k for k in losses if not k.startswith("student.")) == [
        "aux.identification", "aux.localisation", "distill.icd"]
    (losses["aux.identification"] + losses["aux.localisation"]).backward(retain_graph=True)
    assert all(_grads(d.decoder))  # every decoder parameter, and nothing else
    assert not any(_grads(d.value_proj)) and not any(_grads(student))
    d.zero_grad(set_to_none=True)
    losses["distill.icd"].backward(retain_graph=True)
    assert all(_grads(d.value_proj)) and any(_grads(student.backbone.fpn))
    assert not any(_grads(d.decoder)) and not any(_grads(student.roi_heads))
    assert all(p.grad is None for p in teacher.parameters())


def test_train_step_clips_the_decoder_and_projection_jointly(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("icd", student=student, teacher=teacher, options=SMALL)
    d.train()
    main = d.student_parameters() + d.distiller_parameters()
    opt = torch.optim.SGD(main, lr=0.0)
    extras = d.extra_optimizers()
    (_, dec_opt, _), = extras
    before = [p.detach().clone() for p in d.value_proj.parameters()]
    train_step(d, opt, *make_batch(), 10**6, main_params=main, clip_grad=None, extra_optimizers=extras)
    params = [p for g in dec_opt.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm <= 0.01 * (1 + 1e-5)
    assert {id(p) for p in d.value_proj.parameters()} <= {id(p) for p in params}
    assert not any(torch.equal(a, b) for a, b in zip(before, d.value_proj.parameters()))  # AdamW stepped it


def test_other_readings_run(make_pair, make_batch) -> None:
    """The MegEngine per-batch reduction, HMKD's encoding, no padding mask, an absolute bypass."""
    student, teacher = make_pair("retinanet")
    opts = {**SMALL, "reduction": "batch", "encoding": "hmkd", "padding_mask": False, "bypass_iters": 1000,
            "decoder_schedule": "constant", "fakes_per_real": 3, "max_inquiries": 6}
    d = build_distiller("icd", student=student, teacher=teacher, options=opts)
    d.train()
    seen = _spied(d)
    d.extra_schedulers(360)
    assert d.bypass_iters == 1000 and d.decoder.encoding == "hmkd" and d.weight == 8.0
    losses = d(*make_batch(), iteration=0)
    assert seen["kv"].pad is None and seen["aux"].valid.sum(1).tolist() == [6, 4]  # 3 + 3 (cap 6), 1 + 3
    assert all(torch.isfinite(v) for v in losses.values())
    losses["distill.icd"].backward()
    assert all(_grads(d.value_proj)) and not any(_grads(student.backbone.fpn))  # inside the bypass
