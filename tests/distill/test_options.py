"""Every method's options: meaningless values are refused by one validation hook, with a one-line
ConfigError naming ``distill.options.KEY`` and the bad value; sensible edge values are accepted."""

from __future__ import annotations

import re

import pytest

import hmkd
from hmkd.distill import METHODS, build_distiller
from hmkd.distill.options import MethodOptions
from hmkd.errors import ConfigError

SMALL = {"hidden": 32, "heads": 4}  # a small decoder for hmkd / icd
LEVELS = "P2, P3, P4, P5, P6, P7"

# (method, options, the exact message)
REFUSED = [
    # HMKD
    ("hmkd", {"heads": 0}, "distill.options.heads must be >= 1, got 0"),
    ("hmkd", {"heads": -2}, "distill.options.heads must be >= 1, got -2"),
    ("hmkd", {"hidden": 32, "heads": 3}, "distill.options.heads must be a divisor of hidden (32), got 3"),
    ("hmkd", {"hidden": 40, "heads": 4}, "distill.options.hidden must be a positive multiple of 16, got 40"),
    ("hmkd", {"hidden": 0}, "distill.options.hidden must be a positive multiple of 16, got 0"),
    ("hmkd", {**SMALL, "fakes_per_real": -1}, "distill.options.fakes_per_real must be >= 0, got -1"),
    ("hmkd", {**SMALL, "decoder_lr": 0}, "distill.options.decoder_lr must be > 0, got 0.0"),
    ("hmkd", {**SMALL, "decoder_weight_decay": -1e-4}, "distill.options.decoder_weight_decay must be >= 0, got -0.0001"),
    ("hmkd", {**SMALL, "decoder_clip": 0}, "distill.options.decoder_clip must be > 0, got 0.0"),
    ("hmkd", {**SMALL, "warmup_iters": -1}, "distill.options.warmup_iters must be >= 0, got -1"),
    ("hmkd", {**SMALL, "aux_every": 0}, "distill.options.aux_every must be >= 1, got 0"),
    ("hmkd", {**SMALL, "inquiry_threshold": 0}, "distill.options.inquiry_threshold must be > 0 and < 1, got 0.0"),
    ("hmkd", {**SMALL, "inquiry_threshold": 1}, "distill.options.inquiry_threshold must be > 0 and < 1, got 1.0"),
    ("hmkd", {**SMALL, "inquiry_threshold": 1.5}, "distill.options.inquiry_threshold must be > 0 and < 1, got 1.5"),
    ("hmkd", {**SMALL, "inquiry_radius": 0}, "distill.options.inquiry_radius must be > 0, got 0.0"),
    ("hmkd", {**SMALL, "inquiry_weight": -1}, "distill.options.inquiry_weight must be >= 0, got -1.0"),
    ("hmkd", {**SMALL, "alpha": -1e-3}, "distill.options.alpha must be >= 0, got -0.001"),
    ("hmkd", {**SMALL, "beta": float("nan")}, "distill.options.beta must be a finite number, got nan"),
    ("hmkd", {**SMALL, "beta": float("inf")}, "distill.options.beta must be a finite number, got inf"),
    ("hmkd", {**SMALL, "others_bg_weight": -0.5}, "distill.options.others_bg_weight must be >= 0, got -0.5"),
    ("hmkd", {**SMALL, "small_area": -1}, "distill.options.small_area must be >= 0, got -1.0"),
    ("hmkd", {**SMALL, "inquiries": "big"}, "distill.options.inquiries must be one of small, all, got 'big'"),
    ("hmkd", {**SMALL, "bg_form": "mse"}, "distill.options.bg_form must be one of paper, fgd, got 'mse'"),
    ("hmkd", {**SMALL, "reduction": "avg"}, "distill.options.reduction must be one of sum, size_normalised, mean, got 'avg'"),
    ("hmkd", {**SMALL, "levels": ["P2", "P9"]}, f"distill.options.levels must be a list of FPN levels ({LEVELS}), got 'P9'"),
    ("hmkd", {**SMALL, "levels": []}, "distill.options.levels must be a non-empty list of FPN levels (leave it out for the default), got []"),
    ("hmkd", {**SMALL, "levels": ["P3", "P3"]}, "distill.options.levels must be a list without repeated levels, got ['P3', 'P3']"),
    ("hmkd", {**SMALL, "start_level": "P1"}, f"distill.options.start_level must be one of {LEVELS}, got 'P1'"),
    ("hmkd", {**SMALL, "pairs": ["p3"]}, f"distill.options.pairs must be a list of FPN levels ({LEVELS}), got 'p3'"),
    # ICD
    ("icd", {"heads": 0}, "distill.options.heads must be >= 1, got 0"),
    ("icd", {"hidden": 24, "heads": 4}, "distill.options.hidden must be a positive multiple of 16, got 24"),
    ("icd", {**SMALL, "weight": -1}, "distill.options.weight must be >= 0, got -1.0"),
    ("icd", {**SMALL, "fakes_per_real": -3}, "distill.options.fakes_per_real must be >= 0, got -3"),
    ("icd", {**SMALL, "decoder_lr": -1e-4}, "distill.options.decoder_lr must be > 0, got -0.0001"),
    ("icd", {**SMALL, "levels": ["P8"]}, f"distill.options.levels must be a list of FPN levels ({LEVELS}), got 'P8'"),
    ("icd", {**SMALL, "reduction": "sum"}, "distill.options.reduction must be one of image, batch, got 'sum'"),
    ("icd", {**SMALL, "bypass_iters": -1}, "distill.options.bypass_iters must be >= 0, got -1"),
    ("icd", {**SMALL, "encoding": "detr"}, "distill.options.encoding must be one of icd, hmkd, got 'detr'"),
    ("icd", {**SMALL, "max_inquiries": 0}, "distill.options.max_inquiries must be >= 1, got 0"),
    ("icd", {**SMALL, "jitter": -0.1}, "distill.options.jitter must be >= 0, got -0.1"),
    ("icd", {**SMALL, "decoder_schedule": "step"}, "distill.options.decoder_schedule must be one of constant, cosine, got 'step'"),
    # FGD
    ("fgd", {"overlap": "x"}, "distill.options.overlap must be one of max, min, got 'x'"),
    ("fgd", {"temperature": 0}, "distill.options.temperature must be > 0, got 0.0"),
    ("fgd", {"alpha": -5e-5}, "distill.options.alpha must be >= 0, got -5e-05"),
    ("fgd", {"lambda_": -1}, "distill.options.lambda_ must be >= 0, got -1.0"),
    ("fgd", {"scale": -2}, "distill.options.scale must be >= 0, got -2.0"),
    ("fgd", {"levels": []}, "distill.options.levels must be a non-empty list of FPN levels (leave it out for the default), got []"),
    ("fgd", {"box_rule": "centre"}, "distill.options.box_rule must be one of overlap, fgd, got 'centre'"),
    ("fgd", {"clip_grad": 0}, "distill.options.clip_grad must be > 0, got 0.0"),
    # FitNet
    ("fitnet", {"weight": -0.1}, "distill.options.weight must be >= 0, got -0.1"),
    ("fitnet", {"levels": ["P2", "X"]}, f"distill.options.levels must be a list of FPN levels ({LEVELS}), got 'X'"),
]


@pytest.mark.parametrize("method,options,message", REFUSED, ids=[f"{m}-{'-'.join(o)}" for m, o, _ in REFUSED])
def test_meaningless_values_are_refused_in_one_line(method, options, message, shared_pair) -> None:
    student, teacher = shared_pair
    with pytest.raises(ConfigError) as err:
        build_distiller(method, student=student, teacher=teacher, options=options)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_the_library_api_refuses_the_same_way(shared_pair) -> None:
    student, teacher = shared_pair
    with pytest.raises(ConfigError, match=re.escape("distill.options.heads must be >= 1, got 0")):
        hmkd.HMKD(teacher=teacher, student=student, heads=0)
    with pytest.raises(ConfigError, match=re.escape("distill.options.overlap must be one of max, min, got 'x'")):
        hmkd.distiller("fgd", teacher=teacher, student=student, overlap="x")


def test_levels_both_detectors_lack_are_refused_naming_the_key(shared_pair) -> None:
    student, teacher = shared_pair
    for method in ("fitnet", "fgd", "icd", "hmkd"):
        with pytest.raises(ConfigError, match=r"^distill\.options\.levels: level P7 is not produced by both detectors"):
            build_distiller(method, student=student, teacher=teacher, options={"levels": ["P2", "P7"], **(
                SMALL if method in ("hmkd", "icd") else {})})
    with pytest.raises(ConfigError, match=r"^distill\.options\.pairs P2 needs P2 and P1 in both detectors"):
        build_distiller("hmkd", student=student, teacher=teacher, options={**SMALL, "pairs": ["P3", "P2"]})


ACCEPTED = [
    ("hmkd", {**SMALL, "fakes_per_real": 0, "small_area": 0, "decoder_clip": None, "alpha": 0, "warmup_iters": 0,
              "inquiry_threshold": 0.99, "levels": ["P2", "P3"], "pairs": ["P3", "P4"]}),
    ("icd", {**SMALL, "weight": 0, "decoder_weight_decay": 0, "levels": ["P3"], "bypass_iters": 0, "reduction": "batch",
             "encoding": "hmkd", "padding_mask": False, "decoder_schedule": "constant", "max_inquiries": 1, "jitter": 0,
             "fakes_per_real": 0, "decoder_clip": None}),
    ("fgd", {"temperature": 0.1, "alpha": 0, "scale": 0, "overlap": "min", "box_rule": "overlap", "clip_grad": None}),
    ("fitnet", {"weight": 0, "levels": ["P4"]}),
]


@pytest.mark.parametrize("method,options", ACCEPTED, ids=[m for m, _ in ACCEPTED])
def test_edge_values_that_mean_something_are_accepted(method, options, shared_pair) -> None:
    student, teacher = shared_pair
    d = build_distiller(method, student=student, teacher=teacher, options=options)
    assert d.name == method


def test_every_method_validates_through_the_shared_hook() -> None:
    for name, cls in METHODS.items():
        assert issubclass(cls.Options, MethodOptions), name
    # the hook runs when a distiller is built, whoever builds it
    from hmkd.distill.hmkd import HMKDDistiller, HMKDOptions

    with pytest.raises(ConfigError, match="distill.options.heads must be >= 1"):
        HMKDDistiller(student=None, teacher=None, options=HMKDOptions(heads=0))  # refused before anything else
