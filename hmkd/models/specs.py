"""Detectors given as specs, built and run: what the pictures, the speed bench, the ONNX export and
the commands that take checkpoints share to use their models.

:data:`ModelSpec` is a detector given as a module, a :class:`ModelConfig` or a ``(ModelConfig,
weights_path)`` pair; :func:`as_model` makes it an eval-mode detector (a checkpoint that stores
another architecture than the config is a one-line error naming both);
:func:`specs_from_config` turns ``--weights LABEL=CKPT`` pairs into specs (``teacher*`` labels take
the config's teacher architecture, every other label the student's, since a distilled student is a
student); :func:`infer_num_classes` reads a checkpoint's class count; :func:`run_detector` runs one
image through a detector at a score threshold (:func:`score_threshold`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Union

import torch
from torch import nn

from hmkd.config import Config, ModelConfig
from hmkd.errors import CheckpointError, ConfigError
from hmkd.models import build_model
from hmkd.models.checkpoint_info import (
    CheckpointInfo,
    check_fits,
    check_keys_fit,
    checkpoint_classes,
    load_detector_weights,
    read_checkpoint_info,
)

__all__ = [
    "ModelSpec",
    "as_model",
    "infer_num_classes",
    "run_detector",
    "score_threshold",
    "specs_from_config",
]

ModelSpec = Union[nn.Module, ModelConfig, tuple[ModelConfig, Union[str, None]]]
"""A detector given as a module, as a config (its own ``weights``), or as ``(config, weights path)``."""


def _classes_from_keys(cfg: ModelConfig, info: CheckpointInfo) -> int:
    """The class count (without background) a state dict's classifier shape tells."""
    from hmkd.models.torchvision_zoo import detector_family

    family = detector_family(cfg.detector)
    if family not in ("faster_rcnn", "mask_rcnn", "fcos", "retinanet"):
        raise ConfigError(f"unknown detector {cfg.detector!r}")
    n = checkpoint_classes(dataclasses.replace(info, model=None), cfg.detector)
    if n is None:
        key = ("roi_heads.box_predictor.cls_score.weight" if family in ("faster_rcnn", "mask_rcnn")
               else "head.classification_head.cls_logits.weight")
        check_keys_fit(info, cfg)
        if key in info.state_dict:
            raise CheckpointError(f"{info.path}: '{key}' has {info.state_dict[key].shape[0]} outputs, "
                                  "not a multiple of 9 anchors")
        raise CheckpointError(f"{info.path}: no '{key}'; is it a {cfg.detector} checkpoint?")
    return n


def infer_num_classes(cfg: ModelConfig, weights: str) -> int:
    """The class count (without background) of a detector checkpoint: the one its stored config
    gives, else read off its classifier shape."""
    info = read_checkpoint_info(weights)
    if info.model is not None and info.model.num_classes is not None:
        return int(info.model.num_classes)
    return _classes_from_keys(cfg, info)


def as_model(spec: ModelSpec, *, num_classes: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode detector on ``device`` from a :data:`ModelSpec`.

    For a config, the class count is ``cfg.num_classes``, else ``num_classes``, else what the
    weights file stores or its classifier's shape tells; weights given in the pair replace
    ``cfg.weights`` (``None`` keeps ``cfg.weights``). A weights file whose stored architecture
    differs from ``cfg`` raises :class:`CheckpointError` naming both
    (:func:`hmkd.models.checkpoint_info.check_fits`).
    """
    if isinstance(spec, nn.Module):
        return spec.eval().to(device)
    if isinstance(spec, ModelConfig):
        cfg, path = spec, spec.weights
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], ModelConfig):
        cfg, path = spec[0], spec[1] if spec[1] is not None else spec[0].weights
    else:
        raise ConfigError(f"a model must be an nn.Module, a ModelConfig or (ModelConfig, weights), got {type(spec).__name__}")
    n = cfg.num_classes if cfg.num_classes is not None else num_classes
    info = read_checkpoint_info(str(path)) if path else None
    if info is not None:
        check_fits(info, cfg, num_classes=n)
        if n is None:
            stored = info.model.num_classes if info.model is not None else None
            n = int(stored) if stored is not None else _classes_from_keys(cfg, info)
    if n is None:
        raise ConfigError("model.num_classes is not set, and no weights file or data set gives it")
    cfg = dataclasses.replace(cfg, weights=None, num_classes=n)
    if path:
        cfg = dataclasses.replace(cfg, backbone_weights=None)  # the full weights replace them anyway
    model = build_model(cfg, n)
    if info is not None:
        load_detector_weights(model, str(path), cfg, info=info)
    return model.eval().to(device)


def specs_from_config(
    cfg: Config,
    weights: Sequence[tuple[str, str | None]] | Mapping[str, str | None],
    *,
    num_classes: int | None = None,
) -> list[tuple[str, ModelSpec]]:
    """``[(label, ckpt), ...]`` -> ``[(label, (ModelConfig, ckpt)), ...]``.

    A label starting with ``teacher`` (any case) uses ``cfg.teacher``; any other label (``student``,
    ``hmkd``, ``fgd`` ...) uses ``cfg.model``: distilled students share the student's architecture.
    A checkpoint that stores another architecture than the section its label selects raises
    :class:`CheckpointError` naming both and the label rule (``num_classes``: the data set's count,
    when the config leaves it unset).
    """
    pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    out: list[tuple[str, ModelSpec]] = []
    for label, path in pairs:
        if label.lower().startswith("teacher"):
            if cfg.teacher is None:
                raise ConfigError(f"--weights {label}=...: the config has no 'teacher' model")
            section, mc = "teacher", cfg.teacher
            hint = f"; the label {label!r} selects the config's teacher section"
        else:
            section, mc = "model", cfg.model
            hint = f"; the label {label!r} selects the config's model section (a label starting with 'teacher' selects its teacher section)"
        if path and os.path.isfile(path):  # a missing file is named when the model is built
            check_fits(read_checkpoint_info(path), mc, section=section, num_classes=num_classes, hint=hint)
        out.append((label, (mc, path)))
    return out


@contextlib.contextmanager
def score_threshold(model: nn.Module, thresh: float) -> Iterator[None]:
    """Temporarily lower a torchvision detector's own score threshold to at most ``thresh``."""
    owner = model.roi_heads if hasattr(model, "roi_heads") else model
    old = getattr(owner, "score_thresh", None)
    if old is not None and thresh < old:
        owner.score_thresh = thresh
    try:
        yield
    finally:
        if old is not None:
            owner.score_thresh = old


def run_detector(model: nn.Module, image: torch.Tensor, *, score_thresh: float | None = None) -> dict[str, torch.Tensor]:
    """One image through an eval-mode detector; boxes/scores/labels on the CPU (boxes in image pixels)."""
    device = next(model.parameters()).device
    ctx = score_threshold(model, score_thresh) if score_thresh is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        out = model([image.to(device)])[0]
    return {k: out[k].detach().cpu() for k in ("boxes", "scores", "labels")}
