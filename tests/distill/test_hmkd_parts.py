"""HMKD's ``small_area`` option, and the named profiler ranges of HMKD's and ICD's steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hmkd.distill import build_distiller
from hmkd.distill.hmkd import PROFILE_PARTS
from hmkd.distill.icd import PROFILE_PARTS as ICD_PARTS
from hmkd.distill.inquiry import inquiry_loss

# the decoder trained on jointly over the whole key map (the full-map reading these tests are about; the
# default, a frozen fitted decoder attending in windows, is tests/distill/test_attention_window.py's)
SMALL = {"hidden": 32, "heads": 4, "decoder_training": "joint", "attention_window": None}


def _run(d, images, targets, iteration=0):
    """One step's losses and the DistillInputs the method saw."""
    seen = {}
    orig = d.distill_losses

    def spy(inputs, it):
        seen["inputs"] = inputs
        return orig(inputs, it)

    d.distill_losses = spy
    d.train()
    losses = d(images, targets, iteration=iteration)
    return losses, seen["inputs"]


@pytest.mark.parametrize("small_area,flags", [(1024.0, [[True, True, False], [True]]),
                                              (100.0, [[False, True, False], [False]]),
                                              (1e12, [[True, True, True], [True]])])
def test_small_area_decides_which_objects_are_small(small_area, flags, shared_pair, make_batch) -> None:
    student, teacher = shared_pair  # objects of 560, 80, 5400 and 150 px in the original images
    d = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "small_area": small_area})
    with torch.no_grad():
        _, inputs = _run(d, *make_batch())
    assert [s.tolist() for s in inputs.small] == flags


def test_small_area_zero_leaves_no_small_object_terms(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "small_area": 0})
    losses, inputs = _run(d, *make_batch())
    assert not any(s.any() for s in inputs.small)
    # the same terms as always (a step's dict does not change shape with its content) ...
    assert sorted(losses) == sorted(
        [k for k in losses if k.startswith("student.")]
        + ["distill.others_p2", "distill.others_p3", "distill.others_p4", "distill.inquiry_p3",
           "distill.small_fg_p2", "aux.identification_p3", "aux.localisation_p3", "aux.attention_p3",
           "distill.small_attn_p2", "metric.in_box_p2", "distill.bg_p2", "distill.bg_p3", "distill.bg_p4"])
    assert all(torch.isfinite(v) for v in losses.values())
    # ... but nothing from small objects: no real inquiry, so no attention term and no localisation
    # (the decoder still learns to call each image's one fake inquiry fake, as ICD's does); no
    # small-object foreground (the untrained head, prior 0.01 < t = 0.5, proposes no candidate)
    for k in ("distill.small_attn_p2", "aux.localisation_p3", "aux.attention_p3", "metric.in_box_p2",
              "distill.small_fg_p2"):
        assert losses[k].item() == 0.0, k
    assert losses["aux.identification_p3"].item() > 0.0
    # the Inquiry Head still learns, towards an empty map: its focal loss against all-zero targets
    logits = d.inquiry_heads["P3"](inputs.student.features["P3"])
    want = inquiry_loss(logits, torch.zeros_like(logits[:, 0]))
    assert losses["distill.inquiry_p3"].item() > 0 and torch.allclose(losses["distill.inquiry_p3"], want)
    assert losses["distill.others_p2"].item() > 0  # the other objects are still distilled
    sum(losses.values()).backward()
    grads = [p.grad for p in list(student.parameters()) + d.distiller_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_every_object_small_matches_inquiries_all(make_pair, make_batch) -> None:
    """With every object small, the decoder's inquiries are those of ``inquiries: all``."""
    student, teacher = make_pair()
    images, targets = make_batch()
    torch.manual_seed(3)
    d_small = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "small_area": 1e12})
    torch.manual_seed(3)
    d_all = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "inquiries": "all"})
    with torch.no_grad():
        torch.manual_seed(0)
        a, _ = _run(d_small, images, targets)
        torch.manual_seed(0)
        b, _ = _run(d_all, images, targets)
    for k in ("distill.small_attn_p2", "aux.identification_p3", "aux.localisation_p3"):
        assert torch.equal(a[k], b[k]), k
    assert not math.isclose(a["distill.small_fg_p2"].item(), b["distill.small_fg_p2"].item())


def _ranges(prof, prefix: str) -> list:
    return sorted((e for e in prof.events() if e.name.startswith(prefix)), key=lambda e: e.time_range.start)


def test_hmkd_step_records_every_part_in_order(shared_pair, make_batch) -> None:
    assert PROFILE_PARTS == ("adapters", "masks", "inquiry_head", "decoder_aux", "decoder_attention", "others",
                             "small_fg", "attention_term", "gcblock_bg")
    student, teacher = shared_pair
    d = build_distiller("hmkd", student=student, teacher=teacher, options=SMALL)
    d.train()
    images, targets = make_batch()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        losses = d(images, targets, iteration=0)
    ranges = _ranges(prof, "hmkd.")
    assert [e.name for e in ranges] == [f"hmkd.{p}" for p in PROFILE_PARTS]
    assert all(e.cpu_children for e in ranges), "every part runs some operator inside its range"
    assert any(k.startswith("aux.") for k in losses) and "distill.small_attn_p2" in losses


def test_icd_step_records_its_parts(shared_pair, make_batch) -> None:
    assert ICD_PARTS == ("decoder_aux", "decoder_attention", "attention_term")
    student, teacher = shared_pair
    d = build_distiller("icd", student=student, teacher=teacher, options={"hidden": 32, "heads": 4})
    d.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        d(*make_batch(), iteration=0)
    ranges = _ranges(prof, "icd.")
    assert [e.name for e in ranges] == [f"icd.{p}" for p in ICD_PARTS]
    assert all(e.cpu_children for e in ranges)


def _grads(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_hmkd_decoder_terms_reach_exactly_their_parameters(make_pair, make_batch) -> None:
    """The decoder's task trains every decoder parameter and nothing else; the attention term trains
    the student-side projection, the finer level's adapter and the student, never the decoder."""
    student, teacher = make_pair()
    d = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "inquiries": "all"})
    d.train()
    losses = d(*make_batch(), iteration=10**6)
    dec = d.decoders["P3"]
    assert dec.encoding == "hmkd" and dec.query_feature and dec.max_inquiries == 100
    (losses["aux.identification_p3"] + losses["aux.localisation_p3"]).backward(retain_graph=True)
    assert all(_grads(dec))
    others = [m for n, m in d.named_children() if n != "decoders"]
    assert not any(g for m in others for g in _grads(m))
    d.zero_grad(set_to_none=True)
    losses["distill.small_attn_p2"].backward(retain_graph=True)
    assert all(_grads(d.value_proj["P3"])) and all(_grads(d.adapters["P2"])) and any(_grads(student.backbone.fpn))
    assert not any(_grads(dec)) and not any(_grads(d.adapters["P3"])) and not any(_grads(d.gc))
    assert not any(_grads(d.inquiry_heads)) and not any(_grads(student.roi_heads))


def test_attention_term_false_drops_the_matching_and_its_decoder(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    d = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "attention_term": False})
    assert len(d.decoders) == 0 and len(d.value_proj) == 0
    assert d.make_extra_optimizers() == []
    losses, _ = _run(d, *make_batch())
    assert not any(k.startswith(("aux.", "metric.")) or "small_attn" in k for k in losses)
    # the other terms stay: others, the Inquiry Head, the small-object foreground, the background
    assert {"distill.inquiry_p3", "distill.small_fg_p2", "distill.others_p2", "distill.bg_p2"} <= set(losses)


def test_small_foreground_false_drops_that_term_only(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    images, targets = make_batch()
    out = {}
    for on in (True, False):
        torch.manual_seed(0)  # the same distiller modules (adapters, decoder, heads) both times
        d = build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "small_foreground": on})
        torch.manual_seed(1)  # the same fakes and jitter
        with torch.no_grad():
            out[on], _ = _run(d, images, targets)
    assert set(out[True]) - set(out[False]) == {"distill.small_fg_p2"}
    assert out[True]["distill.small_fg_p2"] > 0
    for k, v in out[False].items():  # every other term as it was
        assert torch.allclose(v, out[True][k], rtol=1e-5, atol=1e-6), k


def test_student_value_projection_of_some_cells_is_those_of_the_whole_map() -> None:
    from hmkd.distill.matching.projection import StudentValueProjection

    torch.manual_seed(0)
    proj = StudentValueProjection(8, hidden=16, heads=4)
    x = torch.randn(2, 8, 3, 5)
    cells = torch.tensor([[0, 7, 14], [3, 3, 9]])
    full = proj(x)  # [2, 4, 15, 4]
    some = proj(x, cells)
    assert some.shape == (2, 4, 3, 4)
    for b in range(2):
        assert torch.allclose(some[b], full[b][:, cells[b]], atol=1e-6)


def test_attention_cells_keeps_the_most_attended_cells_only(make_pair, make_batch) -> None:
    student, teacher = make_pair()
    images, targets = make_batch()
    out = {}
    for k in (None, 10**6, 8):
        torch.manual_seed(0)
        d = build_distiller("hmkd", student=student, teacher=teacher,
                            options={**SMALL, "inquiries": "all", "attention_cells": k})
        with torch.no_grad():
            out[k], _ = _run(d, images, targets)
    # more cells than the map has: the exact sum; 8 cells: part of it, and the share kept is logged
    assert out[10**6]["distill.small_attn_p2"].item() == pytest.approx(out[None]["distill.small_attn_p2"].item(), rel=1e-6)
    assert "metric.attention_kept_p2" not in out[None]
    kept = out[8]["metric.attention_kept_p2"].item()
    assert 0.0 < kept < 1.0
    assert 0.0 < out[8]["distill.small_attn_p2"].item() < out[None]["distill.small_attn_p2"].item()
    with pytest.raises(Exception, match="attention_cells"):
        build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "attention_cells": 0})
