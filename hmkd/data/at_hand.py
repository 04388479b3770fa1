"""The data set a command has at hand: whether the config names one at all
(:func:`names_no_data_set`), its validation split when it can be read (:func:`val_set`), and the
class count of a run's models from what is at hand (:func:`class_count`, the one rule training, the
commands' configs and the commands that take checkpoints follow; :func:`fill_class_count`)."""

from __future__ import annotations

import logging
from typing import Any

from hmkd.config import Config, to_dict
from hmkd.errors import ConfigError, HMKDError

logger = logging.getLogger(__name__)

__all__ = ["class_count", "fill_class_count", "names_no_data_set", "resolve_num_classes", "val_set"]


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


def names_no_data_set(cfg: Config) -> bool:
    """Whether ``cfg`` leaves every ``data`` key at its default: the config file and the overrides
    name no data set. The default synthetic set is then what an hmkd detector of that config was
    trained on, but it is no ``torchvision:`` checkpoint's data set (the presets set no ``data``)."""
    from hmkd.config import DataConfig

    return cfg.data == DataConfig()


def resolve_num_classes(cfg: Config, dataset: Any) -> int:
    """The number of classes of ``dataset`` (its ``num_classes``), checked against
    ``model.num_classes`` where the config sets it. ``teacher.num_classes`` may differ (e.g. 90 for a
    COCO teacher): distillation uses only the teacher's backbone + FPN."""
    n_data = int(dataset.num_classes)
    n = cfg.model.num_classes
    if n is not None and n != n_data:
        raise ConfigError(f"model.num_classes is {n} but the data set has {n_data} classes")
    return n_data


def class_count(cfg: Config, dataset: Any | None = None, checkpoint: int | None = None, *,
                check: bool = False) -> int | None:
    """The class count (without background) of ``cfg``'s model, from what is at hand:

    1. ``model.num_classes`` where the config sets it; with ``check`` (training) it must equal the
       data set's count, else the one-line :class:`ConfigError` of
       :func:`resolve_num_classes`;
    2. else the data set's ``num_classes``; with ``data.label_map: category_id`` (labels are
       category ids) a ``checkpoint`` with more classes keeps its count (COCO's 90 outputs on a
       part of COCO; logged);
    3. else the ``checkpoint``'s count (stored or read off its classifier);
    4. else None (nothing tells it).
    """
    n = cfg.model.num_classes
    if dataset is not None and check:
        resolve_num_classes(cfg, dataset)  # the config's count must be the data set's
    if n is not None:
        return n
    if dataset is not None:
        n = int(dataset.num_classes)
        if getattr(dataset, "label_map", None) == "category_id" and checkpoint is not None and checkpoint > n:
            # labels are category ids: a model with more outputs (COCO's 90 on a part of COCO) fits
            logger.info("the checkpoint has %d classes, the data set's category ids go up to %d; labels above "
                        "are no category of it", checkpoint, n)
            n = checkpoint
        return n
    return checkpoint


def fill_class_count(cfg: Config, n: int | None) -> None:
    """Set ``model.num_classes`` and ``teacher.num_classes`` to ``n`` where the config leaves them
    unset (a teacher that sets its own keeps it)."""
    if cfg.model.num_classes is None:
        cfg.model.num_classes = n
    if cfg.teacher is not None and cfg.teacher.num_classes is None:
        cfg.teacher.num_classes = n
