"""Every number and name of every config section, and of every method's options, has a declared
range (hmkd.allowed), and a value outside it is refused when the config is read: one line naming the
source, the key and the range. The cases are generated from the declarations, so a new key is
covered (or, without a declaration, fails the first test). No model is built: the checks run at read time.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

import hmkd.config as config
from hmkd.allowed import Allowed, declared
from hmkd.cli import main
from hmkd.config import Config, load_config
from hmkd.distill import METHODS
from hmkd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
BUILTIN = [m for m, cls in METHODS.items() if cls.__module__.startswith("hmkd.")]

# Strings that are not names from a set: run names, paths, and decoder_fit (none | auto | a file,
# checked by DecoderOptions.check). Any other string field must declare its names.
FREE_TEXT = {
    "name", "output_dir", "model.weights", "model.backbone_weights", "data.root", "data.train_images",
    "data.train_ann", "data.val_images", "data.val_ann", "distill.options.decoder_fit",
}


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _leaves(tp: Any) -> set[Any]:
    """The scalar types an annotation holds (``int | list[int] | None`` -> {int})."""
    out = set()
    for a in _args(tp):
        if typing.get_origin(a) is list:
            out |= _leaves(typing.get_args(a)[0])
        elif a is not type(None):
            out.add(a)
    return out


def _fields(cls: type, prefix: str) -> list[tuple[str, Any, Allowed | None]]:
    """``(key, annotation, declaration)`` of every leaf field of ``cls`` (sections walked; the
    teacher section is ModelConfig, walked as ``model``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sections = [a for a in _args(tp) if dataclasses.is_dataclass(a)]
        if sections:
            if f.name != "teacher":
                out += _fields(sections[0], f"{prefix}{f.name}.")
            continue
        out.append((f"{prefix}{f.name}", tp, declared(cls, f.name)))
    return out


CONFIG_FIELDS = _fields(Config, "")
OPTION_FIELDS = {m: _fields(METHODS[m].Options, "distill.options.") for m in BUILTIN}


def test_every_number_and_name_has_a_declared_range() -> None:
    """A new numeric key, or a string key that is not free text, without ``allowed(...)`` fails here."""
    missing = []
    for where, fields in [("config", CONFIG_FIELDS), *OPTION_FIELDS.items()]:
        for key, tp, spec in fields:
            leaves = _leaves(tp)
            if spec is None and (leaves & {int, float} or (str in leaves and key not in FREE_TEXT)):
                missing.append(f"{where}: {key}")
    assert missing == []
    assert any(spec is not None for _, _, spec in CONFIG_FIELDS)
    # and the free-text list names only keys that exist
    keys = {k for k, _, _ in CONFIG_FIELDS} | {k for fields in OPTION_FIELDS.values() for k, _, _ in fields}
    assert FREE_TEXT <= keys


# -- values outside each declaration ---------------------------------------------------------------
def _bad_scalars(spec: Allowed, leaf: Any) -> list[Any]:
    if spec.one_of is not None or spec.pattern is not None or spec.registry is not None:
        return ["not-a-name"]
    out: list[Any] = []
    step = 1 if leaf is int else 0.5
    if spec.ge is not None:
        out.append(spec.ge - step)
    if spec.gt is not None:
        out.append(spec.gt)
    if spec.le is not None:
        out.append(spec.le + step)
    if spec.lt is not None:
        out.append(spec.lt)
    if spec.multiple_of is not None:
        out.append((spec.ge or spec.multiple_of) + 1)
    if leaf is float:
        out += [math.nan, math.inf]
    return [v if leaf is int else float(v) for v in out]


def _good_scalar(spec: Allowed, leaf: Any) -> Any:
    if spec.one_of is not None:
        return spec.one_of[0]
    low = spec.ge if spec.ge is not None else (spec.gt + 1 if spec.gt is not None else 1)
    return leaf(low)


def bad_values(spec: Allowed, tp: Any) -> list[Any]:
    """Values of ``tp``'s form that ``spec`` refuses: each bound crossed, a non-finite float, an
    unknown name; for a list, a bad entry, and the list rules broken."""
    out: list[Any] = []
    for a in _args(tp):
        if typing.get_origin(a) is list:
            leaf = typing.get_args(a)[0]
            n = spec.length or 1
            good = _good_scalar(spec, leaf)
            out += [[good] * (n - 1) + [b] for b in _bad_scalars(spec, leaf)]
            if spec.nonempty:
                out.append([])
            if spec.unique:
                out.append([good, good])
            if spec.length is not None:
                out.append([good] * (spec.length + 1))
            if spec.ordered and leaf in (int, float):
                out.append([good + 2] + [good] * (n - 1))
        elif a is not type(None):
            out += _bad_scalars(spec, a)
    return out


def _yaml(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _cases() -> list[tuple[str, list[str], Any, Allowed]]:
    cases = []
    for key, tp, spec in CONFIG_FIELDS:
        if spec is None:
            continue
        keys = [key] + (["teacher." + key[len("model."):]] if key.startswith("model.") else [])
        for k in keys:
            for v in bad_values(spec, tp):
                cases.append((k, [], v, spec))
    for method, fields in OPTION_FIELDS.items():
        for key, tp, spec in fields:
            if spec is not None:
                cases += [(key, [f"distill.method={method}"], v, spec) for v in bad_values(spec, tp)]
    return cases


CASES = _cases()


@pytest.mark.parametrize("key, extra, value, spec", CASES,
                         ids=[f"{(e[0].split('=')[1] + ':') if e else ''}{k}={_yaml(v)}" for k, e, v, _ in CASES])
def test_a_value_outside_its_range_is_one_line_naming_the_key(key, extra, value, spec) -> None:
    override = f"{key}={_yaml(value)}"
    with pytest.raises(ConfigError) as e:
        load_config(None, [*extra, override])
    msg = str(e.value)
    assert "\n" not in msg
    m = re.fullmatch(rf"command line: {re.escape(key)}(\[\d+\])? must be (.+), got (.+)", msg)
    assert m, msg
    what = m.group(2)
    if not isinstance(value, list) and spec.one_of is None and spec.registry is None:
        assert what in {spec.words, spec.bounds_text(), "a finite number"}, msg


def test_every_declared_key_and_option_is_walked() -> None:
    walked = {k for k, _, _, _ in CASES}
    declared_keys = {k for k, _, s in CONFIG_FIELDS if s is not None}
    declared_keys |= {k for fields in OPTION_FIELDS.values() for k, _, s in fields if s is not None}
    assert declared_keys <= walked
    assert len(CASES) > 150


# -- sources, the command line, the teacher ----------------------------------------------------------
def test_the_error_names_the_file_that_set_the_value(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model:\n  score_thresh: 2\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\ntrain:\n  iters: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "run.yaml"))
    assert str(e.value) == f"{tmp_path / 'base.yaml'}: model.score_thresh must be >= 0 and < 1, got 2.0"
    # a teacher key inherited from the model is reported where the model's was written
    (tmp_path / "t.yaml").write_text("model:\n  detections_per_img: 0\nteacher:\n  weights: t.pth\n")
    with pytest.raises(ConfigError, match=r"t.yaml: model.detections_per_img must be >= 1, got 0$"):
        load_config(str(tmp_path / "t.yaml"))
    (tmp_path / "o.yaml").write_text("distill:\n  method: hmkd\n  options: {hidden: 32, heads: 3}\n")
    with pytest.raises(ConfigError) as e:  # a relation between options: the source of the key it names
        load_config(str(tmp_path / "o.yaml"))
    assert str(e.value) == f"{tmp_path / 'o.yaml'}: distill.options.heads must be a divisor of hidden (32), got 3"


#: values that crashed inside torchvision (a traceback while training) or ran silently doing
#: nothing, before they were refused at read time; measured on fcos/retinanet/faster_rcnn, resnet18
MEASURED = [
    ("model.fpn_channels=0", "model.fpn_channels must be >= 1, got 0"),  # ZeroDivisionError at build
    # FCOS's head is GroupNorm(32, C): ValueError at build
    ("model.fpn_channels=48", "model.fpn_channels must be a multiple of 32 for detector fcos (its head's GroupNorm has 32 groups), got 48"),
    ("model.min_size=0", "model.min_size must be >= 1, got 0"),  # RuntimeError in the resize
    ("model.min_size=[0,128]", "model.min_size[0] must be >= 1, got 0"),
    ("model.max_size=0", "model.max_size must be >= 1, got 0"),  # RuntimeError in the resize
    ("model.detections_per_img=0", "model.detections_per_img must be >= 1, got 0"),  # ran, no detections
    ("model.score_thresh=2", "model.score_thresh must be >= 0 and < 1, got 2.0"),  # ran, no detections
    ("model.topk_candidates=0", "model.topk_candidates must be >= 1, got 0"),  # ran, no detections
    ("model.rpn_post_nms_top_n_test=0", "model.rpn_post_nms_top_n_test must be >= 1, got 0"),  # ran, no detections
    ("model.anchor_scale=0", "model.anchor_scale must be > 0, got 0.0"),  # ran, no detections
    ("teacher.fpn_channels=0", "teacher.fpn_channels must be >= 1, got 0"),
    ("train.schedule=step", "train.steps must be a non-empty list when train.schedule is step, got []"),
]


@pytest.mark.parametrize("override, message", MEASURED, ids=[o for o, _ in MEASURED])
def test_values_that_failed_inside_torchvision_are_config_errors(override, message, capsys) -> None:
    cfg = str(REPO / "configs" / "synth" / "student_r18.yaml")
    assert main(["config", "show", cfg, override]) == 2
    assert capsys.readouterr().err.strip() == f"hmkd: error: command line: {message}"


def test_unknown_names_are_refused_with_the_nearest() -> None:
    for override, message in [
        ("model.backbone=resnet5", "model.backbone must be one of resnet18, resnet34, resnet50, resnet101, mobilenet_v2, "
                                   "vovnet19, vovnet39, vovnet57, got 'resnet5' (did you mean 'resnet50'?)"),
        # every registered method (a test module may register one of its own, e.g. test_trainer's toy_test)
        ("distill.method=hmdk", f"distill.method must be one of {', '.join(METHODS)}, got 'hmdk' (did you mean 'hmkd'?)"),
        ("device=gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("model.levels=[P3,P9]", "model.levels must be a list of FPN levels (P2, P3, P4, P5, P6, P7), got 'P9'"),
        ("model.levels=[]", "model.levels must be a non-empty list of FPN levels (leave it out for the default), got []"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert str(e.value).startswith("command line: ") and str(e.value).endswith(message), str(e.value)


EDGES = [
    ["model.head_convs=0"],  # FCOS with no tower convs runs (measured)
    ["model.nms_thresh=0"], ["model.nms_thresh=1"], ["model.score_thresh=0"], ["model.norm_eps=0"],
    ["model.fpn_channels=64"], ["model.min_size=[1,2]"], ["model.anchor_scale=0.5"],
    ["model.detector=retinanet", "model.fpn_channels=48"],  # only FCOS's head needs a multiple of 32
    ["model.detector=torchvision:fasterrcnn_mobilenet_v3_large_fpn", "model.trainable_backbone_layers=6"],
    ["train.momentum=0"], ["train.warmup_factor=0"], ["train.warmup_factor=1"], ["train.weight_decay=0"],
    ["train.clip_grad=null"], ["train.schedule=step", "train.steps=[5,3]"], ["data.workers=0"], ["data.synth.n_val=0"],
    ["data.synth.size=16"], ["eval.max_dets=100"], ["seed=18446744073709551615"], ["device=CUDA:1"], ["device=cpu"],
    ["distill.init_student=null"],
    ["distill.method=hmkd", "distill.options.inquiry_threshold=0.99", "distill.options.displacement=[0,0]"],
    ["distill.method=icd", "distill.options.max_inquiries=1", "distill.options.decoder_clip=null"],
]


@pytest.mark.parametrize("overrides", EDGES, ids=[" ".join(e) for e in EDGES])
def test_values_at_the_edge_of_a_range_are_accepted(overrides) -> None:
    load_config(None, overrides)


SHIPPED = sorted(glob.glob(str(REPO / "configs" / "**" / "*.yaml"), recursive=True))


def test_every_shipped_config_is_within_range() -> None:
    assert len(SHIPPED) > 30
    for path in SHIPPED:
        load_config(path)


# -- the names declared here are the registries' ---------------------------------------------------
def test_declared_names_are_those_of_the_registries() -> None:
    from hmkd.data import DATASETS
    from hmkd.data.coco import LABEL_MAPS
    from hmkd.data.synthetic import PRESETS
    from hmkd.distill.base import TEACHER_DTYPES
    from hmkd.engine.optim import OPTIMIZERS, SCHEDULES
    from hmkd.models import DETECTORS
    from hmkd.models.backbones import BACKBONES, LEVELS, NORMS
    from hmkd.models.torchvision_zoo import TORCHVISION_DETECTORS
    from hmkd.models.weights import INIT_PARTS

    assert config.DETECTORS == tuple(DETECTORS)
    assert tuple(f"torchvision:{b}" for b in config.TORCHVISION_BUILDERS) == tuple(TORCHVISION_DETECTORS)
    assert config.BACKBONES == tuple(BACKBONES)
    assert config.NORMS == tuple(NORMS) and config.LEVELS == tuple(LEVELS)
    assert config.DATASETS == tuple(DATASETS) and config.LABEL_MAPS == tuple(LABEL_MAPS)
    assert config.SYNTH_PRESETS == tuple(PRESETS)
    assert config.OPTIMIZERS == tuple(OPTIMIZERS) and config.SCHEDULES == tuple(SCHEDULES)
    assert config.TEACHER_DTYPES == tuple(TEACHER_DTYPES) and config.INIT_PARTS == tuple(INIT_PARTS)


def test_a_distiller_built_in_code_checks_the_same_declarations() -> None:
    """The declarations are the options' own: ``check()`` refuses without a config (no source named)."""
    for method, fields in OPTION_FIELDS.items():
        for key, tp, spec in fields:
            if spec is None:
                continue
            value = bad_values(spec, tp)[0]
            opts = METHODS[method].Options(**{key.split(".")[-1]: value})
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[\d+\])? must be "):
                opts.check()
