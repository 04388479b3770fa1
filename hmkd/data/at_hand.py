"""The data set a command has at hand: whether the config names one at all
(:func:`names_no_data_set`), and its validation split when it can be read (:func:`val_set`)."""

from __future__ import annotations

import logging
from typing import Any

from hmkd.config import Config, to_dict
from hmkd.errors import HMKDError

logger = logging.getLogger(__name__)

__all__ = ["names_no_data_set", "val_set"]


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
