"""Typed run configuration: YAML files validated into dataclasses, with ``key=value`` overrides.

One YAML file fully describes a run; the resolved config is saved beside its outputs
(``config.yaml``). An unknown key, a wrong type or a missing file is a one-line
:class:`~hmkd.errors.ConfigError` naming where the key came from (the file, its ``_base_``, or the
command line) and the key, with the nearest valid key when there is one, e.g.
``config.yaml: unknown key 'teacher.backbon' (did you mean 'teacher.backbone'?)`` or
``command line: unknown key 'train.lrr' (did you mean 'train.lr'?)``. Every number and name is
range-checked when the config is read: each field declares what it accepts
(:func:`hmkd.allowed.allowed`), and a value outside it is one line naming the source, the key and the
range (``command line: model.fpn_channels must be >= 1, got 0``). ``distill.method`` must be a
registered method and ``distill.options`` are checked against its own options here too.
Every key is documented in ``docs/CONFIG.md`` (``hmkd config show`` prints a resolved config with
each key's default and allowed values).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from hmkd.allowed import allowed, check_fields
from hmkd.errors import ConfigError
from hmkd.utils import atomic_open


#: ``model.backbone_weights: pretrain``: the backbone stand-in for ImageNet weights (hmkd.training.pretrain)
PRETRAIN_BACKBONE = "pretrain"

# -- the names the config's enumerated keys accept ------------------------------------------------
# What each name does lives above this layer (hmkd.models, hmkd.data, hmkd.engine, hmkd.distill),
# which imports this module; tests/config/test_config_ranges.py checks these equal those registries.
DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
#: the builders of ``torchvision:<builder>`` (hmkd.models.torchvision_zoo.TORCHVISION_DETECTORS)
TORCHVISION_BUILDERS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "vovnet19", "vovnet39", "vovnet57")
NORMS = ("gn", "bn", "frozen_bn")
LEVELS = ("P2", "P3", "P4", "P5", "P6", "P7")
DATASETS = ("coco", "visdrone", "synthetic")
LABEL_MAPS = ("contiguous", "category_id")
SYNTH_PRESETS = ("default", "aitod", "pretrain", "hard", "paper_size")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
INIT_PARTS = ("none", "neck", "neck_head")
#: torch.manual_seed takes seeds up to 2^64 - 1
_SEED = dict(ge=0, le=2**64 - 1, words="an integer in 0..2^64-1", doc="integer in 0..2^64-1")
#: FCOS's head (torchvision's FCOSHead) normalises with GroupNorm(32, fpn_channels)
FCOS_GROUPS = 32


@dataclass
class ModelConfig:
    """A detector (see :func:`hmkd.models.build_detector`); ``weights`` is a local file or None.
    Each key's range is declared with :func:`~hmkd.allowed.allowed` and checked when the config is read."""

    detector: str = allowed("fcos", one_of=DETECTORS + tuple(f"torchvision:{b}" for b in TORCHVISION_BUILDERS),
                            doc=" | ".join(DETECTORS) + " | torchvision:<builder>")
    backbone: str = allowed("resnet18", one_of=BACKBONES)
    num_classes: int | None = allowed(None, ge=1)  # None: taken from the data set
    fpn_channels: int = allowed(256, ge=1, note=f"fcos: a multiple of {FCOS_GROUPS}")  # check_config
    levels: list[str] | None = allowed(None, one_of=LEVELS, nonempty=True, unique=True, noun="FPN levels")  # None: the detector's default
    norm: str = allowed("gn", one_of=NORMS)
    # a list: multi-scale training (random per image), eval at the last
    min_size: int | list[int] = allowed(800, ge=1, nonempty=True, noun="sizes")
    max_size: int = allowed(1333, ge=1)
    anchor_scale: float | None = allowed(None, gt=0)
    head_convs: int = allowed(4, ge=0)
    rpn_pre_nms_top_n_train: int = allowed(2000, ge=1)
    rpn_pre_nms_top_n_test: int = allowed(1000, ge=1)
    rpn_post_nms_top_n_train: int = allowed(2000, ge=1)
    rpn_post_nms_top_n_test: int = allowed(1000, ge=1)
    box_batch_size_per_image: int = allowed(512, ge=1)
    score_thresh: float = allowed(0.05, ge=0, lt=1)
    nms_thresh: float | None = allowed(None, ge=0, le=1)
    detections_per_img: int = allowed(100, ge=1)
    topk_candidates: int = allowed(1000, ge=1)
    weights: str | None = None
    # weights for the backbone body only: a file (ImageNet-style), or "pretrain": the stand-in
    # pretrained on another synthetic task by the config's pretrain section (hmkd.training.pretrain)
    backbone_weights: str | None = None
    # eps of the backbone body's batch norms (bn / frozen_bn); None: the layer's own (torchvision's
    # v1 ResNet-50 COCO checkpoints need 0.0, as torchvision sets after loading them)
    norm_eps: float | None = allowed(None, ge=0)
    # None: every layer trains; k: all but the body's last k stages frozen, torchvision's rule
    # (ResNets have 5 stages, torchvision's MobileNet builders 6: the builder checks its own)
    trainable_backbone_layers: int | None = allowed(None, ge=0, le=6, note="ResNets: <= 5")
    # true: `weights` may come from another class set: every tensor but the class-dependent layers
    # (classifier, box regressor, mask logits) is loaded, those are named in one warning
    weights_skip_classes: bool = False


@dataclass
class SynthConfig:
    """Parameters of the synthetic generator (used when ``data.kind == 'synthetic'``): the one place
    their defaults live (:func:`hmkd.data.synthetic.generate_synthetic` and ``hmkd data synth`` use it);
    any other key of a preset can be overridden in ``generate_synthetic``'s keyword arguments."""

    n_train: int = allowed(1000, ge=0)
    n_val: int = allowed(200, ge=0)
    # an int: a square image's side; [height, width]: any other shape. 16: the generator's smallest side
    size: int | list[int] = allowed(320, ge=16, length=2, noun="sides (height, width)",
                                    doc="integer >= 16 or [height, width] of integers >= 16")
    seed: int = allowed(0, ge=0)
    preset: str = allowed("default", one_of=SYNTH_PRESETS)


@dataclass
class DataConfig:
    """Where the data is. ``kind``: coco | visdrone | synthetic."""

    kind: str = allowed("synthetic", one_of=DATASETS)
    root: str = "data/synth"
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    batch_size: int = allowed(4, ge=1)
    eval_batch_size: int = allowed(4, ge=1)
    workers: int = allowed(0, ge=0)
    hflip: bool = True  # multi-scale training: give model.min_size a list of sizes
    with_masks: bool = False
    # labels the detector sees: contiguous (1..K in sorted category-id order) or category_id (the
    # data set's own ids, as torchvision's COCO checkpoints expect: 91 outputs on COCO)
    label_map: str = allowed("contiguous", one_of=LABEL_MAPS)
    synth: SynthConfig = field(default_factory=SynthConfig)
    check_images: bool = True  # before iteration 1, read every image's header (hmkd.data.check)


@dataclass
class TrainConfig:
    """Iteration-based schedule, optimiser and bookkeeping."""

    iters: int = allowed(1000, ge=0)
    optimizer: str = allowed("adamw", one_of=OPTIMIZERS)
    lr: float = allowed(1e-3, gt=0)
    momentum: float = allowed(0.9, ge=0, lt=1)
    weight_decay: float = allowed(1e-4, ge=0)
    warmup_iters: int = allowed(100, ge=0)
    warmup_factor: float = allowed(0.001, ge=0, le=1)
    schedule: str = allowed("cosine", one_of=SCHEDULES)
    # for step: iterations where lr *= gamma
    steps: list[int] = allowed(factory=list, ge=1, noun="iterations", note="non-empty for schedule step")
    gamma: float = allowed(0.1, gt=0)
    clip_grad: float | None = allowed(10.0, gt=0)
    amp: bool = False
    eval_period: int = allowed(0, ge=0)  # 0: only at the end
    ckpt_period: int = allowed(200, ge=0)
    log_period: int = allowed(20, ge=0)
    tensorboard: bool = False
    keep_last_checkpoint: bool = False  # keep last_checkpoint.pth (the resume state) after a finished run


@dataclass
class DistillConfig:
    """Which distiller trains the student; ``options`` are validated by the method's own options type."""

    # a registered method (hmkd.distill.registry), checked by check_method_options
    method: str = allowed("none", registry="methods")
    options: dict[str, Any] = field(default_factory=dict)
    # precision of the frozen teacher's forward: float32 (exact) | bfloat16 | float16. Lower
    # precision makes the teacher pass cheaper (bf16 on a CPU with AVX512-BF16: ~1.8x) at the price
    # of rounded targets (bf16: features within a few % relative of float32); see the README.
    teacher_dtype: str = allowed("float32", one_of=TEACHER_DTYPES)
    # the student's FPN (neck) and detection head (neck_head) copied from the teacher before the
    # first step (not on resume): none | neck | neck_head; null = the method's authors' default
    # (fgd, icd: neck_head; none, fitnet, hmkd: none). See hmkd.models.weights.init_from_teacher.
    init_student: str | None = allowed(None, one_of=INIT_PARTS)


@dataclass
class EvalConfig:
    """Evaluation on the val split: COCO's metrics (maxDets 100) always, and AI-TOD's size buckets
    (very tiny < 8^2, tiny 8^2-16^2, small 16^2-32^2, medium >= 32^2 px^2) with ``aitod``."""

    aitod: bool = True
    # detections per image AI-TOD's numbers score (AI-TOD's toolkit: 1500, VisDrone's: 500); a
    # detector emits at most model.detections_per_img of them
    max_dets: int = allowed(1500, ge=100)


@dataclass
class PretrainConfig:
    """The stand-in for ImageNet pretraining (``model.backbone_weights: pretrain``): the backbone is
    trained once, as part of a detector, on a synthetic set of other classes (its own seed and the
    ``pretrain`` preset) and cached by these settings (:mod:`hmkd.training.pretrain`)."""

    synth: SynthConfig = field(default_factory=lambda: SynthConfig(n_train=1000, n_val=50, size=256, seed=1000,
                                                                   preset="pretrain"))
    iters: int = allowed(1000, ge=1)
    batch_size: int = allowed(4, ge=1)
    lr: float = allowed(1e-3, gt=0)
    seed: int = allowed(1000, **_SEED)


@dataclass
class Config:
    """A whole run."""

    name: str = "run"
    seed: int = allowed(0, **_SEED)
    device: str = allowed("auto", pattern=r"auto|cpu|cuda(:\d+)?", words="auto, cpu, cuda or cuda:N",
                          doc="auto | cpu | cuda | cuda:N")  # as hmkd.engine.distributed.resolve_device reads it
    output_dir: str | None = None  # default runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


COMMAND_LINE = "command line"
"""How an error names a key that came from a ``key=value`` override."""


def _where(key: str, src: str, origins: Mapping[str, str] | None) -> str:
    """The source of ``key`` (``a.b[2].c``): the longest prefix ``origins`` knows, else ``src``."""
    if not origins:
        return src
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for n in range(len(parts), 0, -1):
        hit = origins.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return src


def unknown_key_message(key: str, name: str, known: list[str]) -> str:
    """``unknown key 'train.lrr' (did you mean 'train.lr'?)``: the nearest of ``known`` (same
    section) when one is close, else the list of known keys. ``key`` is the full dotted key,
    ``name`` its last part."""
    prefix = key[: len(key) - len(name)]
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if near:
        return f"unknown key '{key}' (did you mean '{prefix}{near[0]}'?)"
    return f"unknown key '{key}' (known: {', '.join(known)})"


def _coerce(value: Any, tp: Any, key: str, src: str, origins: Mapping[str, str] | None = None) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    where = _where(key, src, origins)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # a mapping meant for a section, or a list meant for a list: its own errors (an unknown
        # key inside it, a wrong item) say more than "must be X or Y"
        for a in args:
            if (isinstance(value, dict) and (dataclasses.is_dataclass(a) or typing.get_origin(a) is dict)) or (
                isinstance(value, (list, tuple)) and typing.get_origin(a) is list
            ):
                return _coerce(value, a, key, src, origins)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src, origins)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return from_dict(tp, value, src=src, prefix=f"{key}.", origins=origins)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", src, origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


def from_dict(
    cls: type,
    data: dict[str, Any] | None,
    *,
    src: str = "config",
    prefix: str = "",
    origins: Mapping[str, str] | None = None,
) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors.

    ``src`` names the source in messages; ``origins`` (dotted key -> source, e.g. ``"command
    line"`` for an override) names a key's own source where it differs. An unknown key is
    reported with the nearest known key of its section (``difflib``). Unknown keys are reported
    first, then the values are checked in the dataclass's field order (``model`` before
    ``teacher``, which inherits from it).
    """
    data = data or {}
    if not isinstance(data, dict):
        where = _where(prefix.rstrip("."), src, origins)
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in hints:
            key = f"{prefix}{k}"
            raise ConfigError(f"{_where(key, src, origins)}: {unknown_key_message(key, str(k), names)}")
    kwargs = {k: _coerce(data[k], hints[k], f"{prefix}{k}", src, origins) for k in names if k in data}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "model.levels=[P2,P3]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge of ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _node_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a nested mapping, sections included (``model``, ``model.detector`` ...)."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out.extend(_node_keys(v, f"{key}."))
    return out


def load_config(
    path: str | None, overrides: list[str] | None = None, *, overrides_source: str = COMMAND_LINE
) -> Config:
    """Read a YAML config (``_base_: other.yaml`` inherits, relative to the file) and apply overrides.

    Errors name where the offending key came from: the file that set it (a ``_base_`` file for an
    inherited key) or ``overrides_source`` (default ``"command line"``) for an override. The
    method's ``distill.options`` are checked here too (unknown names, types, meaningless values),
    so that a typo there is found before any data is read.
    """
    origins: dict[str, str] = {}
    raw = _read_yaml(path, origins=origins) if path else {}
    if overrides:
        over = parse_overrides(overrides)
        raw = merge(raw, over)
        for key in _node_keys(over):  # sections too: a whole section may be given (teacher={...})
            origins[key] = overrides_source
    if isinstance(raw.get("teacher"), dict) and isinstance(raw.get("model", {}), dict):
        # the teacher inherits every model key it does not set (but never the student's weights)
        inherited = {
            k: v for k, v in raw.get("model", {}).items() if k not in ("weights", "backbone_weights", "weights_skip_classes")
        }
        for k in inherited:
            if k not in raw["teacher"] and f"model.{k}" in origins:
                origins[f"teacher.{k}"] = origins[f"model.{k}"]
        raw["teacher"] = merge(inherited, raw["teacher"])
    src = path or "config"
    cfg = from_dict(Config, raw, src=src, origins=origins)
    check_config(cfg, src=src, origins=origins)
    check_method_options(cfg, src=src, origins=origins)
    return cfg


def check_method_options(cfg: Config, *, src: str = "config", origins: Mapping[str, str] | None = None) -> None:
    """Check ``distill.method`` (a registered method) and ``distill.options`` against its options:
    unknown names with the nearest valid one, wrong types, out-of-range values (the ranges its
    ``Options`` dataclass declares) and meaningless combinations (its ``check()``), as one-line
    :class:`ConfigError` naming where the key came from (:func:`parse_method_options` does it)."""
    parse_method_options(cfg.distill.method, cfg.distill.options, src=src, origins=origins)


# -- the methods' options: a table the distillation registry fills ----------------------------------
#: ``{method: its options dataclass}``, in registration order: the names ``distill.method`` accepts
#: and what each one's ``distill.options`` are read into. :func:`hmkd.distill.registry.register`
#: fills it (with :func:`register_method_options`) when a method is defined; ``import hmkd`` imports
#: :mod:`hmkd.distill`, which registers the built-in methods, before any config can be read.
METHOD_OPTIONS: dict[str, type] = {}


def register_method_options(method: str, options_type: type) -> None:
    """Record ``options_type`` as what ``distill.options`` of ``method`` are read into."""
    METHOD_OPTIONS[method] = options_type


def _options_type(method: str, src: str, origins: Mapping[str, str] | None) -> type:
    """The options dataclass of the registered ``method``; one-line ConfigError if there is none."""
    if not METHOD_OPTIONS:  # not even ``none``: hmkd.distill.registry was never imported
        raise RuntimeError("hmkd.config: no distillation method is registered: hmkd.distill.registry registers "
                           "them when it is imported (import hmkd or hmkd.distill before reading a config)")
    cls = METHOD_OPTIONS.get(method)
    if cls is None:
        near = difflib.get_close_matches(method, list(METHOD_OPTIONS), n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{_where('distill.method', src, origins)}: distill.method must be one of "
                          f"{', '.join(METHOD_OPTIONS)}, got {method!r}{hint}")
    return cls


def parse_method_options(
    method: str | type,
    options: Mapping[str, Any] | None,
    *,
    src: str = "config",
    origins: Mapping[str, str] | None = None,
    check: bool = True,
) -> Any:
    """The one place a method's ``distill.options`` mapping becomes its options object.

    ``method``: a registered method's name (else a one-line ConfigError ``distill.method must be one
    of ...`` naming the registered ones) or an options dataclass itself (a Distiller's ``Options``,
    registered or not). ``options`` are read into it by :func:`from_dict`: an unknown name (with the
    nearest valid one) or a wrong type is a one-line ConfigError naming ``distill.options.KEY`` and
    where it came from (``src``, ``origins`` as in :func:`from_dict`). With ``check`` the values are
    checked too: the ranges the fields declare (:func:`hmkd.allowed.check_fields`), then the
    relations its ``check()`` adds, every refusal prefixed with where the key came from. Without,
    the caller checks (:class:`hmkd.distill.base.Distiller` runs the object's ``check()``, which names
    no source) or only wants the defaults filled in.
    """
    cls = method if isinstance(method, type) else _options_type(method, src, origins)
    opts = from_dict(cls, dict(options or {}), src=src, prefix="distill.options.", origins=origins)
    if check:
        where = _source_of(src, origins)
        check_fields(opts, "distill.options.", where=where)
        relations = getattr(opts, "check", None)
        if callable(relations):
            try:
                relations()
            except ConfigError as e:  # a relation between options: named by the key it names
                text = str(e)
                key = re.match(r"distill\.options\.\w+", text)
                raise ConfigError(f"{where(key.group(0) if key else 'distill.options')}: {text}") from None
    return opts


def _source_of(src: str | None, origins: Mapping[str, str] | None):
    """``key -> where it came from`` for :func:`hmkd.allowed.check_fields` (None: name no source)."""
    if src is None:
        return None
    return lambda key: _where(key, src, origins)


def _read_yaml(path: str, _seen: tuple[str, ...] = (), *, origins: dict[str, str] | None = None) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("_base_", None)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        raw = merge(_read_yaml(base_path, _seen + (path,), origins=origins), _own(raw, path, origins))
    else:
        _own(raw, path, origins)
    return raw


def _own(raw: dict[str, Any], path: str, origins: dict[str, str] | None) -> dict[str, Any]:
    """Record ``path`` as the source of every key ``raw`` sets; returns ``raw``."""
    if origins is not None:
        for key in _node_keys(raw):
            origins[key] = path
    return raw


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# -- checks and resolution before a run --------------------------------------------------------
def check_config(cfg: Config, *, src: str | None = None, origins: Mapping[str, str] | None = None) -> None:
    """Every key's declared range (:func:`hmkd.allowed.allowed` on the fields above: counts, sizes,
    thresholds, rates, names), then the ranges one key sets for another; the first refusal is a
    one-line :class:`ConfigError` ``KEY must be WHAT, got VALUE``, prefixed with where the key came
    from (``src``, ``origins`` as in :func:`from_dict`) when given. :func:`load_config` runs it; the
    trainer runs it again for a config built in code."""
    where = _source_of(src, origins)

    def refuse(key: str, message: str) -> None:
        at = where(key) if where is not None else None
        raise ConfigError(f"{at}: {message}" if at else message)

    check_fields(cfg, where=where)
    for name, m in (("model", cfg.model), ("teacher", cfg.teacher)):
        if m is not None and m.detector == "fcos" and m.fpn_channels % FCOS_GROUPS:
            refuse(f"{name}.fpn_channels", f"{name}.fpn_channels must be a multiple of {FCOS_GROUPS} for detector fcos "
                   f"(its head's GroupNorm has {FCOS_GROUPS} groups), got {m.fpn_channels}")
    if cfg.train.schedule == "step" and not cfg.train.steps:
        refuse("train.steps", f"train.steps must be a non-empty list when train.schedule is step, got {cfg.train.steps}")


def resolve_config(cfg: Config, output_dir: str, num_classes: int) -> Config:
    """A copy of ``cfg`` as the run uses it: ``output_dir`` and the student's and teacher's
    ``num_classes`` filled in (what ``config.yaml`` and the checkpoints record; a teacher that sets
    its own keeps it)."""
    out = copy.deepcopy(cfg)
    out.output_dir = output_dir
    out.model = dataclasses.replace(out.model, num_classes=num_classes)
    if out.teacher is not None and out.teacher.num_classes is None:
        out.teacher = dataclasses.replace(out.teacher, num_classes=num_classes)
    return out


def model_kwargs(cfg: ModelConfig, num_classes: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`hmkd.models.build_detector` from a model config."""
    d = to_dict(cfg)
    d.pop("weights")
    d.pop("backbone_weights")
    d.pop("weights_skip_classes")
    n = d.pop("num_classes")
    n = n if n is not None else num_classes
    if n is None:
        raise ConfigError("model.num_classes is not set and no data set gives it")
    d["num_classes"] = n
    return d
