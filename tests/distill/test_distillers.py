"""Every registered method: wiring, where gradients go, frozen teacher, and a few real steps."""

from __future__ import annotations

import pytest
import torch

from hmkd.distill import METHODS, build_distiller
from hmkd.distill.base import small_flags
from hmkd.distill.hmkd import REFERENCE_AREA
from hmkd.distill.losses import background_loss
from hmkd.errors import ConfigError


def _opts(method: str) -> dict:
    return {"hidden": 32, "heads": 4} if method in ("hmkd", "icd") else {}


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "none"))
def test_gradients_reach_student_and_distiller_never_teacher(method: str, make_pair, make_batch) -> None:
    student, teacher = make_pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = build_distiller(method, student=student, teacher=teacher, options=_opts(method))
    d.train()
    assert not teacher.training, "the teacher must stay in eval mode"
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in d.parameters() for q in teacher.parameters()), "teacher is not a sub-module"
    assert not any(k.startswith("_teacher") for k in d.state_dict())

    images, targets = make_batch()
    losses = d(images, targets, iteration=10**6)
    assert any(k.startswith("distill.") for k in losses)
    assert all(k.split(".")[0] in ("student", "distill", "aux", "metric") for k in losses)
    distill = sum(v for k, v in losses.items() if k.startswith("distill."))
    distill.backward(retain_graph=True)
    extra = {id(p) for m in d.extra_modules().values() for p in m.parameters()}
    decoder = {id(p) for p in d.extra_modules()["decoder"].parameters()} if extra else set()
    # distillation terms reach the student's backbone/FPN and the distiller's own modules ...
    assert student.backbone.body.conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # ... but never the (teacher-side) decoder, which only its auxiliary task trains
    assert all(p.grad is None for p in d.parameters() if id(p) in decoder)
    got = [p.grad is not None for p in d.distiller_parameters()]
    assert sum(got) >= 0.5 * len(got)

    d.zero_grad(set_to_none=True)
    aux = [v for k, v in losses.items() if k.startswith("aux.")]
    if aux:
        sum(aux).backward()
        assert all(p.grad is None for p in student.parameters()), "aux losses must not reach the student"
        assert any(p.grad is not None for p in d.parameters() if id(p) in decoder)
        assert all(p.grad is None for p in d.parameters() if id(p) not in decoder), "aux losses train the decoder only"
    for k, v in teacher.state_dict().items():
        assert torch.equal(before[k], v)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_three_optimiser_steps_keep_teacher_bit_identical(method: str, make_pair, make_batch) -> None:
    student, teacher = make_pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = build_distiller(method, student=student, teacher=teacher if method != "none" else None, options=_opts(method))
    d.train()
    opt = torch.optim.AdamW(d.student_parameters() + d.distiller_parameters(), lr=1e-3)
    images, targets = make_batch()
    s0 = student.backbone.body.conv1.weight.detach().clone()
    for it in range(3):
        losses = d(images, targets, iteration=it)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        for _, o, _ in d.extra_optimizers():
            o.zero_grad()
        total.backward()
        opt.step()
        for _, o, _ in d.extra_optimizers():
            o.step()
    assert not torch.equal(s0, student.backbone.body.conv1.weight)
    for k, v in teacher.state_dict().items():
        assert torch.equal(before[k], v), k


@pytest.fixture(scope="module")
def synth_batch(tmp_path_factory):
    """Two images (with masks) of a tiny data set made by our synthetic generator."""
    from hmkd.data import build_dataset

    root = str(tmp_path_factory.mktemp("synth"))
    data = build_dataset("synthetic", train=True, root=root, with_masks=True, hflip=False,
                         synth={"n_train": 2, "n_val": 1, "size": 160, "seed": 0})
    images, targets = zip(*(data[i] for i in range(2)))
    return list(images), list(targets), data.num_classes


@pytest.mark.parametrize("detector,levels", [("faster_rcnn", None), ("mask_rcnn", None), ("retinanet", None),
                                             ("fcos", ["P2", "P3", "P4", "P5", "P6", "P7"])])
def test_hmkd_steps_for_every_detector_kind_on_synthetic_data(detector: str, levels, synth_batch, make_pair) -> None:
    images, targets, k = synth_batch
    student, teacher = make_pair(detector, levels, num_classes=k)
    before = {n: v.clone() for n, v in teacher.state_dict().items()}
    d = build_distiller("hmkd", student=student, teacher=teacher, options={"hidden": 32, "heads": 4})
    opt = torch.optim.AdamW(d.student_parameters() + d.distiller_parameters(), lr=1e-3)
    d.train()
    finest = "p2" if levels or detector in ("faster_rcnn", "mask_rcnn") else "p3"
    for it in range(2):
        losses = d(images, targets, iteration=it)
        total = sum(losses.values())
        assert torch.isfinite(total)
        assert f"distill.small_attn_{finest}" in losses
        opt.zero_grad()
        total.backward()
        opt.step()
        d.step_extra_optimizers()
    for n, v in teacher.state_dict().items():
        assert torch.equal(before[n], v)


def test_hmkd_terms_follow_alpha_beta_and_reduction(make_pair, make_batch) -> None:
    """The logged terms are exactly alpha/beta times the component losses, with the stated scaling."""
    student, teacher = make_pair()
    images, targets = make_batch()
    base = {"hidden": 32, "heads": 4, "inquiry_head": False}
    torch.manual_seed(3)
    d1 = build_distiller("hmkd", student=student, teacher=teacher, options={**base, "reduction": "sum", "alpha": 1.0, "beta": 1.0})
    torch.manual_seed(3)
    d2 = build_distiller("hmkd", student=student, teacher=teacher, options={**base, "reduction": "sum", "alpha": 2.0, "beta": 3.0})
    torch.manual_seed(3)
    d3 = build_distiller("hmkd", student=student, teacher=teacher, options={**base, "reduction": "size_normalised", "alpha": 2.0, "beta": 3.0})
    with torch.no_grad():  # same seed before each call: identical sampling in RPN/ROI heads and decoder
        torch.manual_seed(0)
        l1 = d1(images, targets, iteration=0)
        torch.manual_seed(0)
        l2 = d2(images, targets, iteration=0)
        torch.manual_seed(0)
        l3 = d3(images, targets, iteration=0)
    for k in l1:
        if k.startswith("distill.bg"):
            assert torch.allclose(l2[k], 2.0 * l1[k], rtol=1e-5)
            # size_normalised rescales the pixel sum to an 800x1333 input; the padded batch is 160x160
            assert torch.allclose(l3[k], l2[k] * REFERENCE_AREA / (160 * 160), rtol=1e-4)
        elif k.startswith("distill."):
            assert torch.allclose(l2[k], 3.0 * l1[k], rtol=1e-5), k
            assert torch.allclose(l3[k], l2[k], rtol=1e-5), k  # channel sums do not depend on image size


def test_hmkd_bg_term_is_the_gcblock_loss_on_adapted_student(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("hmkd", student=student, teacher=teacher, options={"hidden": 32, "heads": 4, "reduction": "sum", "alpha": 1.0})
    d.train()
    images, targets = make_batch()
    captured = {}
    orig = d.distill_losses

    def spy(inputs, iteration):
        captured["inputs"] = inputs
        return orig(inputs, iteration)

    d.distill_losses = spy  # type: ignore[method-assign]
    losses = d(images, targets, iteration=0)
    inp = captured["inputs"]
    s2 = d.adapters["P2"](inp.student.features["P2"])
    want = background_loss(inp.teacher_features["P2"], s2, d.gc["P2"], form="paper", reduction="sum")
    assert torch.allclose(losses["distill.bg_p2"], want)


def test_hmkd_aux_every_skips_the_decoder_task_exactly_on_off_steps(make_pair, make_batch) -> None:
    """aux_every=3: the aux terms (the decoder's only training signal) come on iterations 0, 3, ...
    (and always during warm-up or without an iteration); on the other steps the distillation terms
    are those of an every-step distiller with the same weights, and no gradient reaches the decoder."""
    student, teacher = make_pair()
    images, targets = make_batch()
    base = {"hidden": 32, "heads": 4, "decoder_training": "joint"}
    torch.manual_seed(3)
    d1 = build_distiller("hmkd", student=student, teacher=teacher, options=base)
    torch.manual_seed(3)
    d3 = build_distiller("hmkd", student=student, teacher=teacher, options={**base, "aux_every": 3})
    d1.train(), d3.train()
    for it, want_aux in ((0, True), (1, False), (2, False), (3, True), (None, True)):
        torch.manual_seed(0)
        l1 = d1(images, targets, iteration=it)
        torch.manual_seed(0)
        l3 = d3(images, targets, iteration=it)
        aux = sorted(k for k in l3 if k.startswith("aux."))
        assert bool(aux) == want_aux, (it, aux)
        assert aux == [] or aux == sorted(k for k in l1 if k.startswith("aux."))
        assert [k for k in l3 if not k.startswith("aux.")] == [k for k in l1 if not k.startswith("aux.")]
        for k in (k for k in l1 if not k.startswith("aux.")):
            assert torch.allclose(l3[k], l1[k], rtol=1e-5, atol=1e-7), (it, k)
        d3.zero_grad(set_to_none=True)
        sum(l3.values()).backward()
        dec_grads = [p.grad is not None for p in d3.decoders.parameters()]
        assert any(dec_grads) == want_aux, it
        assert student.backbone.body.conv1.weight.grad is not None
        student.zero_grad(set_to_none=True)
    # warm-up: the decoder task every step, no attention term yet
    d3w = build_distiller("hmkd", student=student, teacher=teacher, options={**base, "aux_every": 3, "warmup_iters": 5})
    d3w.train()
    l = d3w(images, targets, iteration=1)
    assert any(k.startswith("aux.") for k in l) and not any("small_attn" in k for k in l)
    with pytest.raises(ConfigError, match="distill.options.aux_every must be >= 1, got 0"):
        build_distiller("hmkd", student=student, teacher=teacher, options={**base, "aux_every": 0})


@pytest.mark.parametrize("method", ["hmkd", "fitnet"])
def test_distiller_keeps_only_the_teacher_trunk(method: str, make_pair, make_batch) -> None:
    """The teacher's heads are never run; once the caller drops the detector they are freed."""
    import gc
    import weakref

    student, teacher = make_pair()
    heads = weakref.ref(teacher.roi_heads)
    backbone = teacher.backbone
    d = build_distiller(method, student=student, teacher=teacher, options=_opts(method))
    assert d.teacher.backbone is backbone and not d.teacher.training
    del teacher
    gc.collect()
    assert heads() is None
    images, targets = make_batch()
    assert any(k.startswith("distill.") for k in d(images, targets, iteration=0))


def test_small_flags_use_original_area() -> None:
    t = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]]), "area": torch.tensor([900.0, 2000.0])},
         {"boxes": torch.tensor([[0.0, 0.0, 31.0, 33.0], [0.0, 0.0, 33.0, 33.0]])}]
    a, b = small_flags(t)
    assert a.tolist() == [True, False]  # COCO's own area wins over the box
    assert b.tolist() == [True, False]  # 31*33 = 1023 < 1024 <= 33*33


def test_bad_options_are_one_line_errors(make_pair) -> None:
    student, teacher = make_pair()
    with pytest.raises(ConfigError, match="distill.options.headz"):
        build_distiller("hmkd", student=student, teacher=teacher, options={"headz": 3})
    with pytest.raises(ConfigError, match="reduction"):
        build_distiller("hmkd", student=student, teacher=teacher, options={"reduction": "avg"})
    with pytest.raises(ConfigError, match="start_level P2"):
        build_distiller("hmkd", student=student, teacher=teacher, options={"start_level": "P2", "hidden": 32, "heads": 4})
    with pytest.raises(ConfigError, match="unknown method 'kd'.*hmkd"):
        build_distiller("kd", student=student, teacher=teacher)
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_distiller("hmkd", student=student, teacher=None)


def test_teacher_in_bfloat16_gives_rounded_float32_targets(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d32 = build_distiller("hmkd", student=student, teacher=teacher, options=_opts("hmkd"))
    images, targets = make_batch()
    tensors = d32._tap(images, targets).tensors
    ref = d32.teacher_features(tensors)
    d32.set_teacher_dtype("bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in teacher.backbone.parameters())  # heads: never run, not kept
    low = d32.teacher_features(tensors)
    assert set(low) == set(ref)
    for k in ref:
        assert low[k].dtype == torch.float32 and low[k].shape == ref[k].shape
        rel = ((low[k] - ref[k]).norm() / ref[k].norm()).item()
        assert 0 < rel < 0.1, (k, rel)  # rounded (not identical), but the same maps
    d32.train()
    losses = d32(images, targets, iteration=10**6)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.backbone.parameters())


def test_teacher_dtype_bad_value_names_the_key(make_pair) -> None:
    student, teacher = make_pair()
    d = build_distiller("fitnet", student=student, teacher=teacher, options={})
    with pytest.raises(ConfigError, match="distill.teacher_dtype.*float64"):
        d.set_teacher_dtype("float64")
