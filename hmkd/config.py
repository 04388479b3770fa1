"""Typed run configuration: YAML files validated into dataclasses, with ``key=value`` overrides.

One YAML file fully describes a run; the resolved config is saved beside its outputs
(``config.yaml``). An unknown key, a wrong type or a missing file is a one-line
:class:`~hmkd.errors.ConfigError` naming the key, e.g. ``config.yaml: unknown key 'train.lrr'``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from hmkd.errors import ConfigError
from hmkd.utils import atomic_open


@dataclass
class ModelConfig:
    """A detector (see :func:`hmkd.models.build_detector`); ``weights`` is a local file or None."""

    detector: str = "fcos"
    backbone: str = "resnet18"
    num_classes: int | None = None  # None: taken from the data set
    fpn_channels: int = 256
    levels: list[str] | None = None  # None: the detector's default
    norm: str = "gn"
    min_size: int | list[int] = 800  # a list: multi-scale training (random per image), eval at the last
    max_size: int = 1333
    anchor_scale: float | None = None
    head_convs: int = 4
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    score_thresh: float = 0.05
    nms_thresh: float | None = None
    detections_per_img: int = 100
    topk_candidates: int = 1000
    weights: str | None = None
    backbone_weights: str | None = None  # ImageNet-style weights for the backbone body only
    # eps of the backbone body's batch norms (bn / frozen_bn); None: the layer's own (torchvision's
    # v1 ResNet-50 COCO checkpoints need 0.0, as torchvision sets after loading them)
    norm_eps: float | None = None
    # None: every layer trains; k: all but the body's last k stages frozen, torchvision's rule
    trainable_backbone_layers: int | None = None
    # true: `weights` may come from another class set: every tensor but the class-dependent layers
    # (classifier, box regressor, mask logits) is loaded, those are named in one warning
    weights_skip_classes: bool = False


@dataclass
class SynthConfig:
    """Parameters of the synthetic generator (used when ``data.kind == 'synthetic'``): the one place
    their defaults live (:func:`hmkd.data.synthetic.generate_synthetic` and ``hmkd data synth`` use it);
    any other key of a preset can be overridden in ``generate_synthetic``'s keyword arguments."""

    n_train: int = 1000
    n_val: int = 200
    size: int = 320
    seed: int = 0
    preset: str = "default"


@dataclass
class DataConfig:
    """Where the data is. ``kind``: coco | visdrone | synthetic."""

    kind: str = "synthetic"
    root: str = "data/synth"
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    batch_size: int = 4
    eval_batch_size: int = 4
    workers: int = 0
    hflip: bool = True  # multi-scale training: give model.min_size a list of sizes
    with_masks: bool = False
    # labels the detector sees: contiguous (1..K in sorted category-id order) or category_id (the
    # data set's own ids, as torchvision's COCO checkpoints expect: 91 outputs on COCO)
    label_map: str = "contiguous"
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class TrainConfig:
    """Iteration-based schedule, optimiser and bookkeeping."""

    iters: int = 1000
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "cosine"  # cosine | step | constant
    steps: list[int] = field(default_factory=list)  # for step: iterations where lr *= gamma
    gamma: float = 0.1
    clip_grad: float | None = 10.0
    amp: bool = False
    eval_period: int = 0  # 0: only at the end
    ckpt_period: int = 200
    log_period: int = 20
    tensorboard: bool = False


@dataclass
class DistillConfig:
    """Which distiller trains the student; ``options`` are validated by the method's own options type."""

    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    # precision of the frozen teacher's forward: float32 (exact) | bfloat16 | float16. Lower
    # precision makes the teacher pass cheaper (bf16 on a CPU with AVX512-BF16: ~1.8x) at the price
    # of rounded targets (bf16: features within a few % relative of float32); see the README.
    teacher_dtype: str = "float32"
    # the student's FPN (neck) and detection head (neck_head) copied from the teacher before the
    # first step (not on resume): none | neck | neck_head; null = the method's authors' default
    # (fgd, icd: neck_head; none, fitnet, hmkd: none). See hmkd.models.weights.init_from_teacher.
    init_student: str | None = None


@dataclass
class Config:
    """A whole run."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str | None = None  # default runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{src}: {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key} must be a mapping, got {value!r}")
        return from_dict(tp, value, src=src, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{src}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{src}: {key} must be a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any] | None, *, src: str = "config", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            raise ConfigError(f"{src}: unknown key '{prefix}{k}' (known: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}", src)
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


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``_base_: other.yaml`` inherits, relative to the file) and apply overrides."""
    raw = _read_yaml(path) if path else {}
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
    if isinstance(raw.get("teacher"), dict) and isinstance(raw.get("model", {}), dict):
        # the teacher inherits every model key it does not set (but never the student's weights)
        inherited = {
            k: v for k, v in raw.get("model", {}).items() if k not in ("weights", "backbone_weights", "weights_skip_classes")
        }
        raw["teacher"] = merge(inherited, raw["teacher"])
    return from_dict(Config, raw, src=path or "config")


def _read_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
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
        raw = merge(_read_yaml(base_path, _seen + (path,)), raw)
    return raw


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# -- checks and resolution before a run --------------------------------------------------------
def check_config(cfg: Config) -> None:
    """Range checks a run needs before anything is built: counts and periods not negative, batch
    sizes at least 1, the optimiser's numbers finite (one-line :class:`ConfigError` naming the key)."""
    t, d = cfg.train, cfg.data
    for key, value, low in (
        ("train.iters", t.iters, 0),
        ("train.eval_period", t.eval_period, 0),
        ("train.ckpt_period", t.ckpt_period, 0),
        ("train.log_period", t.log_period, 0),
        ("train.warmup_iters", t.warmup_iters, 0),
        ("data.batch_size", d.batch_size, 1),
        ("data.eval_batch_size", d.eval_batch_size, 1),
        ("data.workers", d.workers, 0),
    ):
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if cfg.distill.init_student not in (None, "none", "neck", "neck_head"):
        raise ConfigError(f"distill.init_student must be none, neck or neck_head, got {cfg.distill.init_student!r}")
    for key, value in (
        ("train.lr", t.lr), ("train.momentum", t.momentum), ("train.weight_decay", t.weight_decay),
        ("train.warmup_factor", t.warmup_factor), ("train.gamma", t.gamma), ("train.clip_grad", t.clip_grad),
    ):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")


def is_mask_model(cfg: Config) -> bool:
    """Whether the run's detector predicts masks (its data needs masks, its evaluation scores segm)."""
    from hmkd.models.torchvision_zoo import detector_family

    return detector_family(cfg.model.detector) == "mask_rcnn"


def resolve_num_classes(cfg: Config, dataset: Any) -> int:
    """The number of classes of ``dataset`` (its ``num_classes``), checked against
    ``model.num_classes`` where the config sets it. ``teacher.num_classes`` may differ (e.g. 90 for a
    COCO teacher): distillation uses only the teacher's backbone + FPN."""
    n_data = int(dataset.num_classes)
    n = cfg.model.num_classes
    if n is not None and n != n_data:
        raise ConfigError(f"model.num_classes is {n} but the data set has {n_data} classes")
    return n_data


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
