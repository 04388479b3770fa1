"""What a checkpoint says about itself, for the commands that take one as input (``eval``, ``viz``,
``export``): the architecture its weights were trained as, the data set's label map, and a one-line
error when it does not fit a config.

hmkd checkpoints (``model_final.pth``, ``model_best.pth``, ``last_checkpoint.pth``) store the run's
resolved config under ``config``; its ``model`` section is the detector whose weights are under
``model`` (a teacher trained with ``hmkd train`` is that run's ``model`` too). Checkpoints written
since the label map was added also store ``label_map``: ``{"category_ids": [...], "names": [...]}``,
entry ``i`` being output label ``i + 1``. Older checkpoints, and bare state dicts (torchvision's or
anyone's), have neither: they still load, and what they cannot tell comes from the config.

* :func:`read_checkpoint_info` reads the file (memory-mapped, so the tensors are not read) into a
  :class:`CheckpointInfo`.
* :func:`check_fits` compares the stored architecture with a config's and raises
  ``w.pth: checkpoint is fcos/resnet50, config says fcos/resnet18 (model.backbone)``; for a
  ``torchvision:`` detector only the builder and the class count (what fixes its weights).
* :func:`load_detector_weights` loads the weights after that check; a bare state dict that does not
  fit is described by its keys (:func:`check_keys_fit`: :func:`guess_arch`, and for a
  ``torchvision:`` config the builder whose keys it has) when they tell another architecture.
* :func:`checkpoint_classes`: the class count a file stores or its classifier's shape tells.
* :class:`LabelMap`: the categories behind labels ``1..K``, also COCO's from torchvision's weight
  metadata (:meth:`LabelMap.torchvision_coco`).
* :func:`config_from_checkpoint` rebuilds a run config from the stored one, so that a config file is
  optional for those commands.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hmkd.config import Config, ModelConfig, from_dict, merge, parse_overrides
from hmkd.errors import CheckpointError, ConfigError
from hmkd.models.weights import load_weights, read_torch_file

logger = logging.getLogger(__name__)

#: Model keys that change the weights' shapes or names (the others: sizes, thresholds, anchors).
ARCH_KEYS = ("detector", "backbone", "num_classes", "fpn_channels", "levels", "norm", "head_convs")

__all__ = [
    "ARCH_KEYS",
    "CheckpointInfo",
    "LabelMap",
    "arch_name",
    "check_fits",
    "check_keys_fit",
    "checkpoint_classes",
    "config_from_checkpoint",
    "guess_arch",
    "load_detector_weights",
    "read_checkpoint_info",
]


@dataclass(frozen=True)
class LabelMap:
    """The data set's categories behind a detector's output labels ``1..K``.

    ``category_ids[i]`` and ``names[i]`` belong to label ``i + 1`` (0 is the background, never
    output). A label that is no category (with ``data.label_map: category_id``, the labels between
    two category ids, e.g. torchvision's ten unused COCO ids) has category id None and name ``N/A``.
    """

    category_ids: tuple[int | None, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise ValueError(f"label map: {len(self.category_ids)} category ids but {len(self.names)} names")

    @property
    def num_classes(self) -> int:
        """K, the labels ``1..K`` (those without a category included)."""
        return len(self.category_ids)

    def name(self, label: int) -> str:
        """The name of output label ``label`` (``c<label>`` outside ``1..K``)."""
        return self.names[label - 1] if 1 <= label <= len(self.names) else f"c{label}"

    def category_id(self, label: int) -> int | None:
        return self.category_ids[label - 1] if 1 <= label <= len(self.category_ids) else None

    def to_dict(self) -> dict[str, list]:
        """What checkpoints store: ``{"category_ids": [...], "names": [...]}`` (null: no category)."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    def by_label(self) -> dict[str, dict[str, Any]]:
        """``{"1": {"category_id": 3, "name": "disc"}, ...}`` (the ONNX metadata's ``label_map``),
        for the labels that are categories."""
        return {str(i + 1): {"category_id": c, "name": n}
                for i, (c, n) in enumerate(zip(self.category_ids, self.names)) if c is not None}

    def lines(self) -> list[str]:
        """``["1 -> category 3 'disc'", ...]`` for a console summary (labels that are categories)."""
        return [f"{i + 1} -> category {c} {n!r}" for i, (c, n) in enumerate(zip(self.category_ids, self.names))
                if c is not None]

    def padded(self, num_classes: int) -> "LabelMap":
        """This map with labels up to ``num_classes``, the added ones without a category (``N/A``):
        a model with more outputs than a ``category_id`` data set's largest id."""
        extra = max(0, num_classes - self.num_classes)
        return LabelMap(self.category_ids + (None,) * extra, self.names + ("N/A",) * extra)

    @classmethod
    def by_category_id(cls, ids: Sequence[int], names: Sequence[str]) -> "LabelMap":
        """The map of ``data.label_map: category_id``: label ``c`` is category ``c`` (named
        ``names[ids.index(c)]``) for ``c`` in ``1..max(ids)``, the labels between ids are ``N/A``."""
        by_id = {int(c): str(n) for c, n in zip(ids, names)}
        top = max(by_id, default=0)
        return cls(tuple(c if c in by_id else None for c in range(1, top + 1)),
                   tuple(by_id.get(c, "N/A") for c in range(1, top + 1)))

    @classmethod
    def from_dataset(cls, dataset: Any) -> "LabelMap":
        """The map of an hmkd data set (:class:`~hmkd.data.CocoDetection`: ``cat_ids``,
        ``class_names``, and ``label_map``: with ``category_id`` the labels are the ids)."""
        ids = [int(c) for c in dataset.cat_ids]
        names = list(getattr(dataset, "class_names", []))[1:]  # [0] is the background
        if len(names) != len(ids):
            names = [f"class_{c}" for c in ids]
        if getattr(dataset, "label_map", "contiguous") == "category_id":
            return cls.by_category_id(ids, names)
        return cls(tuple(ids), tuple(str(n) for n in names))

    @classmethod
    def torchvision_coco(cls, detector: str) -> "LabelMap":
        """COCO's 90 labels as torchvision's COCO checkpoints output them (label = COCO category id,
        ``data.label_map: category_id``), named from the builder's weight metadata
        (:func:`hmkd.models.torchvision_zoo.coco_categories`; offline). Its ``__background__`` and
        ``N/A`` entries are not categories. ``detector``: a ``torchvision:`` name (another
        detector takes ``fasterrcnn_resnet50_fpn``'s list, the same for every builder)."""
        from hmkd.models.torchvision_zoo import coco_categories, is_torchvision

        cats = coco_categories(detector if is_torchvision(detector) else "torchvision:fasterrcnn_resnet50_fpn")
        ids = [i for i, n in enumerate(cats) if i > 0 and n not in ("__background__", "N/A")]
        return cls.by_category_id(ids, [cats[i] for i in ids])

    @classmethod
    def from_dict(cls, data: Any, source: str = "label map") -> "LabelMap":
        """Inverse of :meth:`to_dict`; a malformed entry is a one-line :class:`CheckpointError`."""
        try:
            ids = [None if c is None else int(c) for c in data["category_ids"]]
            names = [str(n) for n in data["names"]]
            return cls(tuple(ids), tuple(names))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: malformed label_map ({type(e).__name__}: {e})") from None


@dataclass
class CheckpointInfo:
    """What :func:`read_checkpoint_info` found in a weights file.

    Attributes:
        path: the file.
        config: the stored run config (a dict), or None (an older or foreign file).
        model: its ``model`` section as a :class:`ModelConfig` (the weights' architecture), or None.
        label_map: the stored :class:`LabelMap`, or None.
        state_dict: the weights (memory-mapped where the file allows it), ``module.`` prefixes removed.
    """

    path: str
    config: dict[str, Any] | None
    model: ModelConfig | None
    label_map: LabelMap | None
    state_dict: dict[str, torch.Tensor]

    @property
    def arch(self) -> str | None:
        """``"fcos/resnet50"`` when the file stores its config (else None)."""
        return arch_name(self.model) if self.model is not None else None


def _known(cls: type, data: Mapping[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    """``data`` without the keys ``cls`` (a config dataclass) does not have, recursively; the dropped
    keys are appended to ``dropped`` (a file written by another hmkd version may have some)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k not in hints:
            dropped.append(f"{where}{k}")
            continue
        tp = hints[k]
        sub = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        out[k] = _known(sub, v, f"{where}{k}.", dropped) if sub is not None and isinstance(v, Mapping) else v
    return out


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read a weights file: an hmkd checkpoint (``model`` + ``config`` [+ ``label_map``]) or a bare
    state dict (``state_dict`` wrappers too). Raises :class:`CheckpointError` (one line) when the
    file is missing, unreadable or holds no state dict."""
    path = os.fspath(path)
    obj = read_torch_file(path, mmap=True)
    config = label_map = model = None
    sd: Any = obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = obj["model"]
        if isinstance(obj.get("config"), dict):
            config = obj["config"]
        if obj.get("label_map") is not None:
            label_map = LabelMap.from_dict(obj["label_map"], path)
            data = config.get("data") if isinstance(config, dict) else None
            ids = label_map.category_ids
            if (isinstance(data, Mapping) and data.get("label_map") == "category_id" and None not in ids
                    and list(ids) != list(range(1, len(ids) + 1))):
                # written before the map had a slot per label: one entry per category, in id order
                label_map = LabelMap.by_category_id(ids, label_map.names)
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected a dict of tensors or an hmkd checkpoint)")
    if config is not None and isinstance(config.get("model"), Mapping):
        dropped: list[str] = []
        section = _known(ModelConfig, config["model"], "model.", dropped)
        if dropped:
            logger.warning("%s: ignoring stored config keys this version does not know: %s", path, ", ".join(dropped))
        try:
            model = from_dict(ModelConfig, section, src=f"{path} (stored config)", prefix="model.")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    return CheckpointInfo(path, config, model, label_map, {k.removeprefix("module."): v for k, v in sd.items()})


# -- architectures ------------------------------------------------------------------------------
def _levels(mc: Any) -> list[str]:
    from hmkd.models.detectors import DEFAULT_LEVELS

    lv = _get(mc, "levels")
    return list(lv) if lv else list(DEFAULT_LEVELS.get(_get(mc, "detector"), []))


def _get(mc: Any, key: str) -> Any:
    return mc.get(key) if isinstance(mc, Mapping) else getattr(mc, key, None)


def arch_name(mc: ModelConfig | Mapping[str, Any]) -> str:
    """``"fcos/resnet50"``: a model config's detector and backbone; a ``torchvision:`` detector
    alone (its builder fixes the backbone, ``model.backbone`` is not used)."""
    from hmkd.models.torchvision_zoo import is_torchvision

    det = _get(mc, "detector")
    return str(det) if is_torchvision(det) else f"{det}/{_get(mc, 'backbone')}"


def _value(mc: Any, key: str, num_classes: int | None = None) -> Any:
    if key == "levels":
        return _levels(mc)
    if key == "num_classes":
        n = _get(mc, key)
        return n if n is not None else num_classes
    return _get(mc, key)


def _show(key: str, value: Any) -> str:
    if key == "levels":
        return "levels " + "-".join([value[0], value[-1]]) if len(value) > 1 else f"levels {value}"
    if key == "num_classes":
        return f"{value} classes"
    return f"{key} {value}"


def check_fits(
    info: CheckpointInfo,
    model: ModelConfig,
    *,
    section: str = "model",
    num_classes: int | None = None,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointError` when the architecture ``info`` stores differs from ``model``'s
    in any of :data:`ARCH_KEYS`, e.g. ``w.pth: checkpoint is fcos/resnet50, config says
    fcos/resnet18 (model.backbone)``. ``num_classes`` stands for ``model.num_classes`` when that is
    None (the data set's count); a file without a stored config passes (its keys will tell).
    ``hint`` is appended to the message."""
    from hmkd.models.torchvision_zoo import is_torchvision, same_weights

    stored = info.model
    if stored is None:
        return
    tv_mine, tv_theirs = is_torchvision(model.detector), is_torchvision(_get(stored, "detector"))
    # a torchvision: detector's weights are fixed by its builder and the class count: the hmkd-only
    # keys (backbone, fpn_channels, levels, head_convs) are not used, and its norm (bn | frozen_bn)
    # changes no tensor (only num_batches_tracked counters, which loading tolerates)
    keys = ("detector", "num_classes") if tv_mine or tv_theirs else ARCH_KEYS
    diffs = []
    for key in keys:
        mine, theirs = _value(model, key, num_classes), _value(stored, key)
        if mine is None or theirs is None:
            continue
        if key == "detector" and tv_mine and tv_theirs and same_weights(mine, theirs):
            continue
        if mine != theirs:
            diffs.append((key, theirs, mine))
    if not diffs:
        return
    ck, cf = arch_name(stored), arch_name(model)
    extra = [(k, a, b) for k, a, b in diffs if k not in ("detector", "backbone")]
    if extra:
        ck += " with " + ", ".join(_show(k, a) for k, a, _ in extra)
        cf += " with " + ", ".join(_show(k, b) for k, _, b in extra)
    keys = ", ".join(f"{section}.{k}" for k, _, _ in diffs)
    raise CheckpointError(f"{info.path}: checkpoint is {ck}, config says {cf} ({keys}){hint}")


def guess_arch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The detector, backbone and class count a bare state dict's keys and shapes tell (those it
    tells; an empty dict when it is no hmkd/torchvision FPN detector)."""
    keys = set(state_dict)
    out: dict[str, Any] = {}
    if any(k.startswith("roi_heads.mask_predictor.") for k in keys):
        out["detector"] = "mask_rcnn"
    elif "roi_heads.box_predictor.cls_score.weight" in keys:
        out["detector"] = "faster_rcnn"
    elif "head.regression_head.bbox_ctrness.weight" in keys:
        out["detector"] = "fcos"
    elif "head.classification_head.cls_logits.weight" in keys:
        out["detector"] = "retinanet"

    def blocks(layer: str) -> int:
        return len({k.split(".")[3] for k in keys if k.startswith(f"backbone.body.{layer}.")})

    if "backbone.body.layer1.0.conv3.weight" in keys:
        out["backbone"] = {6: "resnet50", 23: "resnet101"}.get(blocks("layer3"), "resnet (bottleneck)")
    elif "backbone.body.layer1.0.conv1.weight" in keys:
        out["backbone"] = {2: "resnet18", 6: "resnet34"}.get(blocks("layer3"), "resnet (basic blocks)")
    elif any(k.startswith("backbone.body.stages.") for k in keys):
        out["backbone"] = "mobilenet_v2"
    elif any(k.startswith("backbone.body.model.") for k in keys):
        out["backbone"] = "vovnet"
    elif "backbone.body.0.0.weight" in keys and "backbone.body.16.0.weight" in keys:
        out["backbone"] = "mobilenet_v3_large"  # torchvision's MobileNetV3 FPN body: numbered blocks
    return out


def load_detector_weights(
    model: nn.Module,
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    info: CheckpointInfo | None = None,
    section: str = "model",
    hint: str = "",
) -> CheckpointInfo:
    """Load ``path`` into ``model`` (built from ``config``) after :func:`check_fits`; returns the
    file's :class:`CheckpointInfo`. A file without a stored config that does not fit, and whose keys
    tell another detector or backbone, raises ``checkpoint is retinanet/resnet18 (read off its keys),
    config says fcos/resnet18``; otherwise the key-level message of
    :func:`hmkd.models.load_weights`."""
    path = os.fspath(path)
    info = info or read_checkpoint_info(path)
    check_fits(info, config, section=section, hint=hint)
    try:
        load_weights(model, path)
    except CheckpointError:
        if info.model is None:
            check_keys_fit(info, config, section=section, hint=hint)
        raise
    return info


def check_keys_fit(info: CheckpointInfo, config: ModelConfig, *, section: str = "model", hint: str = "") -> None:
    """Raise ``checkpoint is retinanet/resnet18 (read off its keys), config says fcos/resnet18
    (model.detector)`` when the keys of a file that stores no config tell another detector or
    backbone than ``config``'s; pass otherwise (the caller's key-level message then says more).

    For a ``torchvision:`` config only the builder counts (``model.backbone`` and the other
    hmkd-only keys are not used): a file with exactly the keys of that builder's model passes; a
    file with another builder's keys
    (:func:`~hmkd.models.torchvision_zoo.torchvision_builders_of`) is named as that builder, one
    whose family or body read off its keys (:func:`guess_arch`) differs as those, both with
    ``model.detector``."""
    from hmkd.models.torchvision_zoo import is_torchvision, torchvision_builders_of, torchvision_entry

    guess = guess_arch(info.state_dict)
    if is_torchvision(config.detector):
        builders = torchvision_builders_of(info.state_dict)
        if config.detector in builders:
            return
        entry = torchvision_entry(config.detector)
        if builders:
            ck = " or ".join(builders)
        elif (guess.get("detector", entry.family) != entry.family
              or guess.get("backbone", entry.backbone) != entry.backbone):
            ck = f"{guess.get('detector', '?')}/{guess.get('backbone', '?')}"
        else:
            return
        raise CheckpointError(
            f"{info.path}: checkpoint is {ck} (read off its keys), config says {config.detector} ({section}.detector){hint}"
        )
    differ = [k for k in ("detector", "backbone") if k in guess and guess[k] != getattr(config, k)]
    if not differ:
        return
    ck = f"{guess.get('detector', '?')}/{guess.get('backbone', '?')}"
    keys = ", ".join(f"{section}.{k}" for k in differ)
    raise CheckpointError(
        f"{info.path}: checkpoint is {ck} (read off its keys), config says {arch_name(config)} ({keys}){hint}"
    )


def checkpoint_classes(info: CheckpointInfo, detector: str) -> int | None:
    """The class count (without background) of a weights file: the one its stored config gives,
    else read off its classifier's shape as a ``detector`` (an hmkd or ``torchvision:`` name) has
    it; None when the file has no such classifier."""
    from hmkd.models.torchvision_zoo import detector_family

    if info.model is not None and info.model.num_classes is not None:
        return int(info.model.num_classes)
    family = detector_family(detector)
    if family in ("faster_rcnn", "mask_rcnn"):
        key, per_loc = "roi_heads.box_predictor.cls_score.weight", 1
    elif family in ("fcos", "retinanet"):
        key, per_loc = "head.classification_head.cls_logits.weight", 9 if family == "retinanet" else 1  # 3 x 3 anchors
    else:
        return None
    w = info.state_dict.get(key)
    if w is None or w.shape[0] % per_loc:
        return None
    return int(w.shape[0]) // per_loc - 1


# -- a run config from the stored one -----------------------------------------------------------
def config_from_checkpoint(path: str | os.PathLike, overrides: Sequence[str] | None = None, *,
                           info: CheckpointInfo | None = None) -> Config:
    """The run config a checkpoint stores, with ``key=value`` ``overrides`` applied (what a config
    file would give). The teacher and distillation sections are dropped (the weights are the
    ``model``'s), and so are keys this version does not know. A file that stores no config is a
    :class:`ConfigError` asking for a config file."""
    path = os.fspath(path)
    info = info or read_checkpoint_info(path)
    if info.config is None:
        raise ConfigError(
            f"{path}: stores no config (a bare state dict or an older file); give a config file naming its architecture"
        )
    raw = {k: v for k, v in info.config.items() if k not in ("teacher", "distill", "output_dir")}
    dropped: list[str] = []
    raw = _known(Config, raw, "", dropped)
    if dropped:
        logger.warning("%s: ignoring stored config keys this version does not know: %s", path, ", ".join(dropped))
    if overrides:
        raw = merge(raw, parse_overrides(list(overrides)))
    return from_dict(Config, raw, src=f"{path} (stored config)")

