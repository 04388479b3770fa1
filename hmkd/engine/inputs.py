"""The models, label map and data set of the commands that take checkpoints as inputs
(``hmkd viz detections|heatmap``, ``hmkd export onnx``; ``hmkd eval`` uses
:func:`hmkd.models.checkpoint_info.config_from_checkpoint` directly).

With a config file, ``--weights LABEL=CKPT`` labels starting with ``teacher`` take its teacher
section and every other label its model section; each checkpoint that stores its own config must
fit that section (else a one-line error names both architectures). Without a config file, each
checkpoint brings its own architecture (``key=value`` overrides still apply to it, e.g.
``model.score_thresh=0.1``), and the data set is the one the first checkpoint was trained on, used
only when it is already on disk (nothing is generated).

The label map (category ids and names of labels ``1..K``) is the one the checkpoints store (they
must agree), else the data set's, else unknown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hmkd.config import Config, load_config, to_dict
from hmkd.errors import ConfigError, HMKDError
from hmkd.models.checkpoint_info import LabelMap, config_from_checkpoint, read_checkpoint_info

logger = logging.getLogger(__name__)

__all__ = ["ModelInputs", "model_inputs", "resolve_image_args", "val_set"]


@dataclass
class ModelInputs:
    """What :func:`model_inputs` resolved.

    Attributes:
        config: the run config (the config file's, else the first checkpoint's stored one).
        specs: ``[(label, (ModelConfig, ckpt))]`` for :func:`hmkd.viz.detections.as_model`.
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


def val_set(cfg: Config, *, generate: bool) -> Any | None:
    """The validation split of ``cfg.data``, or None when it cannot be read (logged). With
    ``generate=False`` a synthetic set that is not on disk yet is not generated (None)."""
    from hmkd.data import build_data, synthetic_exists

    if not generate and cfg.data.kind == "synthetic" and not synthetic_exists(cfg.data.root, **to_dict(cfg.data.synth)):
        logger.info("data set %s (synthetic) is not on disk; going on without it", cfg.data.root)
        return None
    try:
        return build_data(cfg, train=False)
    except HMKDError as e:
        logger.info("no data set at hand (%s); going on without it", e)
        return None


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
    from hmkd.viz.detections import specs_from_config

    if not weights:
        raise ConfigError("no --weights given")
    for label, path in weights:
        if not path:
            raise ConfigError(f"--weights {label}=: no checkpoint file after the '='")
    infos = {path: read_checkpoint_info(path) for _, path in weights if path}
    if config:
        cfg = load_config(config, list(overrides or []))
        dataset = val_set(cfg, generate=True) if need_data else None
    else:
        cfg = config_from_checkpoint(weights[0][1], overrides, info=infos[weights[0][1]])
        dataset = val_set(cfg, generate=False) if need_data else None
    if config:
        n = cfg.model.num_classes
        if n is None and dataset is not None:
            n = int(dataset.num_classes)
        if cfg.model.num_classes is None:
            cfg.model.num_classes = n
        if cfg.teacher is not None and cfg.teacher.num_classes is None:
            cfg.teacher.num_classes = n
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
    if stored:
        label_map, source = stored[0][1], f"checkpoint {stored[0][0]}"
    elif dataset is not None:
        label_map, source = LabelMap.from_dataset(dataset), f"data set {getattr(dataset, 'source', cfg.data.root)}"
    else:
        label_map, source = None, "none"
    if label_map is not None and n is not None and label_map.num_classes != n:
        raise ConfigError(f"the label map ({source}) has {label_map.num_classes} classes, the models {n}")
    return ModelInputs(cfg, specs, n, dataset, label_map, source)


def resolve_image_args(values: Sequence[str], dataset: Any | None) -> list[str]:
    """Image files of ``--images`` values: an existing file as it is; anything else a
    validation-set index or file name (:func:`hmkd.viz.attention.resolve_images`)."""
    out: list[str] = []
    for v in values:
        if os.path.isfile(v):
            out.append(v)
            continue
        if dataset is None or os.sep in v or "/" in v:
            raise ConfigError(f"--images {v}: image file not found"
                              + ("" if dataset is not None else " (and no data set at hand to look it up in)"))
        from hmkd.viz.attention import resolve_images

        (idx,) = resolve_images(dataset, [v])
        out.append(str(dataset.image_path(idx)))
    return out
