"""What the commands read from their arguments: the config (:func:`load_cfg`), ``--weights
[NAME=]CKPT`` (:func:`named_weights`), ``--images`` words (:func:`check_image_words`,
:func:`resolve_image_args`), the optional config file of ``eval`` / ``viz`` / ``export``
(:func:`config_or_override`), and the models, label map and data set of the commands that take
checkpoints as inputs (:func:`model_inputs`: ``hmkd viz detections|heatmap``, ``hmkd export onnx``;
``hmkd eval`` uses :func:`hmkd.models.checkpoint_info.config_from_checkpoint` directly).

With a config file, ``--weights LABEL=CKPT`` labels starting with ``teacher`` take its teacher
section and every other label its model section; each checkpoint that stores its own config must
fit that section (else a one-line error names both architectures). Without a config file, each
checkpoint brings its own architecture (``key=value`` overrides still apply to it, e.g.
``model.score_thresh=0.1``), and the data set is the one the first checkpoint was trained on, used
only when it is already on disk (nothing is generated).

A config that leaves every ``data`` key at its default names no data set
(:func:`hmkd.data.at_hand.names_no_data_set`): with a ``torchvision:`` section and a bare checkpoint
(torchvision's file, no stored config), its default synthetic set is not the checkpoint's, so it is
not generated, and used only when on disk with the checkpoint's class count. A data set the config
names is used, generated if synthetic; with ``data.label_map: category_id`` a checkpoint with more
classes than its largest category id keeps its count (COCO's 90 on a part of COCO).

The label map (category ids and names of labels ``1..K``) is the one the checkpoints store (they
must agree), else the data set's, else, for torchvision's 90 COCO classes (a ``torchvision:``
detector or ``data.label_map: category_id``), COCO's from torchvision's weight metadata
(:meth:`LabelMap.torchvision_coco`, offline), else unknown. One log line says where it came from.
The models themselves are built with :func:`hmkd.models.specs.as_model`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hmkd.config import Config, load_config
from hmkd.data.at_hand import class_count, fill_class_count, names_no_data_set, val_set
from hmkd.data.image_files import resolve_images
from hmkd.errors import ConfigError, HMKDError
from hmkd.models.checkpoint_info import (
    CheckpointInfo,
    LabelMap,
    checkpoint_classes,
    config_from_checkpoint,
    read_checkpoint_info,
)
from hmkd.models.specs import specs_from_config
from hmkd.models.torchvision_zoo import is_torchvision

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_CLASSES",
    "OVERRIDE_PLACE",
    "ModelInputs",
    "check_image_words",
    "config_or_override",
    "load_cfg",
    "model_inputs",
    "named_weights",
    "resolve_image_args",
]

#: The classes of torchvision's COCO checkpoints (91 outputs with the background).
COCO_CLASSES = 90

OVERRIDE_PLACE = ("the words after --weights or --images up to the next option are its values: "
                  "give key=value overrides before --weights, or after a one-value option such as --out DIR")


def load_cfg(args: argparse.Namespace, *, need_classes: bool = False):
    """The config of a command; with ``need_classes``, ``model.num_classes`` (and the teacher's)
    filled from the data set when the config leaves it unset (:func:`hmkd.data.at_hand.class_count`)."""
    from hmkd.config import load_config

    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    if need_classes and cfg.model.num_classes is None:
        try:
            from hmkd.data import build_data

            dataset = build_data(cfg, train=False)
        except HMKDError:
            dataset = None  # no data set at hand: the weights files may still tell
        fill_class_count(cfg, class_count(cfg, dataset))
    return cfg


def config_or_override(args: argparse.Namespace) -> None:
    """eval / viz / export take the config file optionally: with none given, argparse hands the
    first ``key=value`` override to ``config``; move it back."""
    c = args.config
    if c is not None and "=" in c and not os.path.isfile(c):
        args.overrides = [c, *(args.overrides or [])]
        args.config = None


def named_weights(items: Sequence[str] | None) -> list[tuple[str, str]]:
    """``--weights`` values as ``[(name, checkpoint file)]``, in the order given.

    ``NAME=CKPT`` keeps its name; a bare ``CKPT`` (also one whose path holds a ``=``) is named
    after its file (``t.pth`` -> ``t``), or after its folder where two files share a name
    (``runs/student/model_final.pth`` -> ``student``), then numbered. Every checkpoint must be an
    existing file: a missing one is a one-line :class:`ConfigError` naming it, which says where
    ``key=value`` overrides go when the word has a ``=`` (one typed among the checkpoints).
    """
    pairs: list[tuple[str | None, str, str]] = []  # (given name or None, path, word)
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or os.path.isfile(item):
            name, path = "", item
        if not path:
            raise ConfigError(f"--weights {item}: no checkpoint file after the '='")
        if not os.path.isfile(path):
            hint = f" ({OVERRIDE_PLACE})" if sep and not os.path.isfile(item) else ""
            raise ConfigError(f"--weights {item}: checkpoint file not found: {path}{hint}")
        pairs.append((name or None, path, item))
    given = [n for n, _, _ in pairs if n is not None]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ConfigError(f"--weights: the name {twice[0]!r} is given to two checkpoints; name each one differently")
    stems = [os.path.splitext(os.path.basename(p))[0] for n, p, _ in pairs if n is None]
    taken = set(given)
    out = []
    for name, path, _ in pairs:
        if name is None:
            stem = os.path.splitext(os.path.basename(path))[0] or "model"
            folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
            name = stem if stems.count(stem) == 1 and stem not in taken else folder or stem
            base, k = name, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out.append((name, path))
    return out


def check_image_words(values: Sequence[str]) -> None:
    """``--images`` takes the words up to the next option: a ``key=value`` word among them that is
    no file is an override typed in the wrong place (one line saying where overrides go)."""
    for v in values:
        if "=" in v and not os.path.isfile(v):
            raise ConfigError(f"--images {v}: image file not found ({OVERRIDE_PLACE})")


@dataclass
class ModelInputs:
    """What :func:`model_inputs` resolved.

    Attributes:
        config: the run config (the config file's, else the first checkpoint's stored one).
        specs: ``[(label, (ModelConfig, ckpt))]`` for :func:`as_model`.
        num_classes: the class count when known (config, data set or checkpoint), else None.
        dataset: the validation split when at hand, else None.
        label_map: the :class:`LabelMap` of labels ``1..K``, or None when nothing tells it.
        label_map_source: where it came from (``checkpoint PATH``, ``data set SOURCE`` or ``none``).
    """

    config: Config
    specs: list[tuple[str, Any]]
    num_classes: int | None
    dataset: Any | None
    label_map: LabelMap | None
    label_map_source: str


def _torchvision_preset_alone(cfg: Config, weights: Sequence[tuple[str, str]],
                              infos: Mapping[str, CheckpointInfo]) -> bool:
    """A config that names no data set, with a ``torchvision:`` section for a checkpoint that
    stores no config (a bare torchvision file): its default synthetic set is not that file's."""
    if not names_no_data_set(cfg):
        return False
    for label, path in weights:
        mc = cfg.teacher if label.lower().startswith("teacher") and cfg.teacher is not None else cfg.model
        if is_torchvision(mc.detector) and infos[path].config is None:
            return True
    return False


def _checkpoint_count(cfg: Config, weights: Sequence[tuple[str, str]], infos: Mapping[str, CheckpointInfo]) -> int | None:
    """The class count of the first checkpoint of the config's model section (else the first one),
    stored or read off its classifier; None when it tells none."""
    model_ones = [(lb, p) for lb, p in weights if not lb.lower().startswith("teacher")]
    label, path = (model_ones or list(weights))[0]
    mc = cfg.teacher if label.lower().startswith("teacher") and cfg.teacher is not None else cfg.model
    return checkpoint_classes(infos[path], mc.detector)


def model_inputs(
    config: str | None,
    overrides: Sequence[str] | None,
    weights: Sequence[tuple[str, str]],
    *,
    need_data: bool = True,
) -> ModelInputs:
    """Resolve a command's models (see the module docstring). ``need_data``: look for the
    validation set (for names, ground truth and image indices); without it only the checkpoints
    and the config are read."""
    if not weights:
        raise ConfigError("no --weights given")
    for label, path in weights:
        if not path:
            raise ConfigError(f"--weights {label}=: no checkpoint file after the '='")
    infos = {path: read_checkpoint_info(path) for _, path in weights if path}
    unnamed = False
    if config:
        cfg = load_config(config, list(overrides or []))
        unnamed = _torchvision_preset_alone(cfg, weights, infos)
        if unnamed:
            logger.info("%s names no data set (every data key at its default): the default synthetic set is "
                        "no torchvision checkpoint's, so it is not generated, and used only if on disk with the "
                        "checkpoint's class count", config)
        dataset = val_set(cfg, generate=not unnamed) if need_data else None
    else:
        cfg = config_from_checkpoint(weights[0][1], overrides, info=infos[weights[0][1]])
        dataset = val_set(cfg, generate=False) if need_data else None
    if config:
        k = _checkpoint_count(cfg, weights, infos) if cfg.model.num_classes is None else None
        n = class_count(cfg, None if unnamed else dataset, k)
        if unnamed and dataset is not None and n is not None and int(dataset.num_classes) != n:
            logger.info("the default data set %s has %d classes, the checkpoints %d; not using it",
                        cfg.data.root, dataset.num_classes, n)
            dataset = None
        fill_class_count(cfg, n)
        specs = specs_from_config(cfg, list(weights), num_classes=n)
    else:
        specs, n = [], None
        for label, path in weights:
            own = cfg if path == weights[0][1] else config_from_checkpoint(path, overrides, info=infos[path])
            specs.append((label, (own.model, path)))
            k = own.model.num_classes
            if n is not None and k is not None and k != n:
                raise ConfigError(
                    f"{path}: has {k} classes, {weights[0][1]} has {n}; side by side they need the same classes"
                )
            n = n if n is not None else k
        if dataset is not None and n is not None and int(dataset.num_classes) != n:
            logger.warning("the data set in %s has %d classes, the checkpoints %d; not using it",
                           cfg.data.root, dataset.num_classes, n)
            dataset = None
    stored = [(p, i.label_map) for p, i in infos.items() if i.label_map is not None]
    for p, lm in stored[1:]:
        if lm.category_ids != stored[0][1].category_ids:
            raise ConfigError(
                f"{p}: was trained on categories {list(lm.category_ids)}, {stored[0][0]} on "
                f"{list(stored[0][1].category_ids)}; side by side they need the same categories"
            )
    detector = specs[0][1][0].detector if specs else cfg.model.detector
    if stored:
        label_map, source = stored[0][1], f"checkpoint {stored[0][0]}"
    elif dataset is not None:
        label_map, source = LabelMap.from_dataset(dataset), f"data set {getattr(dataset, 'source', cfg.data.root)}"
        if getattr(dataset, "label_map", None) == "category_id" and n is not None and n > label_map.num_classes:
            label_map = label_map.padded(n)
    elif n == COCO_CLASSES and (is_torchvision(detector) or cfg.data.label_map == "category_id"):
        from hmkd.models.torchvision_zoo import coco_weights

        label_map = LabelMap.torchvision_coco(detector)
        tv = detector if is_torchvision(detector) else "torchvision:fasterrcnn_resnet50_fpn"
        source = f"torchvision's weight metadata ({coco_weights(tv)}.meta['categories']; label = COCO category id)"
    else:
        label_map, source = None, "none"
    if label_map is not None and n is not None and label_map.num_classes != n:
        raise ConfigError(f"the label map ({source}) has {label_map.num_classes} classes, the models {n}")
    if label_map is not None:
        logger.info("label names: %d labels from %s", label_map.num_classes, source)
    return ModelInputs(cfg, specs, n, dataset, label_map, source)


def resolve_image_args(values: Sequence[str], dataset: Any | None) -> list[str]:
    """Image files of ``--images`` values: an existing file as it is; anything else a
    validation-set index or file name (:func:`hmkd.data.image_files.resolve_images`)."""
    out: list[str] = []
    for v in values:
        if os.path.isfile(v):
            out.append(v)
            continue
        if dataset is None or os.sep in v or "/" in v:
            raise ConfigError(f"--images {v}: image file not found"
                              + ("" if dataset is not None else " (and no data set at hand to look it up in)"))
        (idx,) = resolve_images(dataset, [v])
        out.append(str(dataset.image_path(idx)))
    return out
