"""The public method table and constructors: what is listed, who needs a teacher, keyword-only detectors,
and which methods bring their own optimiser."""

from __future__ import annotations

import pytest
import torch

import hmkd
from hmkd.distill import DESCRIPTIONS, METHODS, Distiller, build_distiller, method_class, needs_teacher
from hmkd.errors import ConfigError

BUILT_IN = ["none", "fitnet", "fgd", "icd", "hmkd"]
SMALL = {"hidden": 32, "heads": 4}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    kw = dict(num_classes=3, min_size=128, max_size=128)
    return (hmkd.build_detector("faster_rcnn", "resnet18", fpn_channels=32, **kw),
            hmkd.build_detector("faster_rcnn", "resnet18", fpn_channels=64, **kw))


def test_all_five_methods_are_listed_with_a_description() -> None:
    assert list(METHODS)[: len(BUILT_IN)] == BUILT_IN
    assert set(DESCRIPTIONS) == set(METHODS)
    for name in BUILT_IN:
        cls = method_class(name)
        assert issubclass(cls, Distiller) and cls.name == name and DESCRIPTIONS[name]
    assert hmkd.METHODS is METHODS


def test_needs_teacher() -> None:
    assert not needs_teacher("none")
    assert all(needs_teacher(m) for m in ("fitnet", "fgd", "icd", "hmkd"))
    with pytest.raises(ConfigError, match=r"unknown method 'kd' \(known: none, fitnet, fgd, icd, hmkd"):
        needs_teacher("kd")


def test_student_and_teacher_are_keyword_only(pair) -> None:
    student, teacher = pair
    with pytest.raises(TypeError):
        build_distiller("fitnet", student, teacher)  # type: ignore[misc]
    with pytest.raises(TypeError):
        hmkd.HMKD(teacher, student)  # type: ignore[misc]
    with pytest.raises(TypeError):
        hmkd.distiller("fitnet", teacher, student)  # type: ignore[misc]
    for name in BUILT_IN:
        with pytest.raises(TypeError):
            method_class(name)(student, teacher)  # type: ignore[misc]
    # ... and by keyword they work
    d = method_class("fitnet")(student=student, teacher=teacher)
    assert d.student is student and d.teacher.backbone is teacher.backbone


def test_only_decoder_methods_have_extra_optimisers(pair) -> None:
    student, teacher = pair
    for name in ("none", "fitnet", "fgd"):
        d = build_distiller(name, student=student, teacher=teacher if name != "none" else None)
        assert d.extra_optimizers() == [] and d.extra_modules() == {}
    for name in ("icd", "hmkd"):
        # a decoder that learns during distillation (HMKD's default keeps its fitted decoder frozen)
        learns = {"decoder_training": "joint"} if name == "hmkd" else {}
        opts = {**SMALL, **learns, "decoder_lr": 3e-4, "decoder_weight_decay": 0.02, "decoder_clip": 5.0}
        d = build_distiller(name, student=student, teacher=teacher, options=opts)
        extra = d.extra_optimizers()
        assert [(n, type(o), c) for n, o, c in extra] == [("decoder", torch.optim.AdamW, 5.0)]
        group = extra[0][1].param_groups[0]
        assert group["lr"] == 3e-4 and group["weight_decay"] == 0.02
        # over every module the method trains with it (ICD: the decoder and the student-side projection)
        assert {id(p) for p in group["params"]} == {id(p) for m in d.extra_modules().values() for p in m.parameters()}
        assert len(d.extra_schedulers(10)) == 1  # the decoder's schedule (ICD cosine, HMKD constant)
        assert d.extra_optimizers() is extra  # built once: the trainer and step_extra_optimizers share it
        no_clip = build_distiller(name, student=student, teacher=teacher, options={**SMALL, **learns, "decoder_clip": None})
        assert no_clip.extra_optimizers()[0][2] is None


def test_register_checks_the_contract_when_the_method_is_defined() -> None:
    from dataclasses import dataclass

    from hmkd.distill import METHODS, Distiller, register

    @dataclass
    class PlainOptions:  # not a MethodOptions: its values would escape validation
        weight: float = 1.0

    class Bad(Distiller):
        Options = PlainOptions

    with pytest.raises(TypeError, match="Options must derive from MethodOptions"):
        register("bad_options", "test-only")(Bad)
    with pytest.raises(TypeError, match="is not a Distiller subclass"):
        register("not_a_distiller", "test-only")(PlainOptions)
    assert "bad_options" not in METHODS and "not_a_distiller" not in METHODS
