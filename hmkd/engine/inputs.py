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

Also what those commands share to use the models: :func:`as_model` (a model, a
:class:`ModelConfig` or a ``(ModelConfig, weights_path)`` pair to an eval-mode detector; a
checkpoint that stores another architecture than the config is a one-line error naming both),
:func:`specs_from_config` (``--weights LABEL=CKPT`` pairs to model specs: ``teacher*`` labels take
the config's teacher architecture, every other label the student's, since a distilled student is a
student), :func:`load_image` (a file to a ``[3, H, W]`` float tensor in ``[0, 1]``) and
:func:`run_detector` (one image through a detector, at a score threshold).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from hmkd.config import Config, ModelConfig, load_config, to_dict
from hmkd.errors import CheckpointError, ConfigError, HMKDError
from hmkd.models import build_model
from hmkd.models.checkpoint_info import (
    CheckpointInfo,
    LabelMap,
    check_fits,
    check_keys_fit,
    config_from_checkpoint,
    load_detector_weights,
    read_checkpoint_info,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ModelInputs",
    "ModelSpec",
    "as_model",
    "infer_num_classes",
    "load_image",
    "model_inputs",
    "resolve_image_args",
    "run_detector",
    "score_threshold",
    "specs_from_config",
    "val_set",
]

ModelSpec = Union[nn.Module, ModelConfig, tuple[ModelConfig, Union[str, None]]]
"""A detector given as a module, as a config (its own ``weights``), or as ``(config, weights path)``."""




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


# --------------------------------------------------------------------------- using the models


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as RGB float ``[3, H, W]`` in ``[0, 1]``; ``size=(H, W)`` resizes it (bilinear)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: image file not found")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None:
                im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except OSError as e:
        raise ConfigError(f"{path}: not a readable image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _classes_from_keys(cfg: ModelConfig, info: CheckpointInfo) -> int:
    """The class count (without background) a state dict's classifier shape tells."""
    from hmkd.models.torchvision_zoo import detector_family

    sd, weights = info.state_dict, info.path
    family = detector_family(cfg.detector)
    if family in ("faster_rcnn", "mask_rcnn"):
        key, per_loc = "roi_heads.box_predictor.cls_score.weight", 1
    elif family == "fcos":
        key, per_loc = "head.classification_head.cls_logits.weight", 1
    elif family == "retinanet":
        key, per_loc = "head.classification_head.cls_logits.weight", 9  # 3 octaves x 3 ratios
    else:
        raise ConfigError(f"unknown detector {cfg.detector!r}")
    if key not in sd:
        check_keys_fit(info, cfg)
        raise CheckpointError(f"{weights}: no '{key}'; is it a {cfg.detector} checkpoint?")
    n = sd[key].shape[0]
    if n % per_loc:
        raise CheckpointError(f"{weights}: '{key}' has {n} outputs, not a multiple of {per_loc} anchors")
    return n // per_loc - 1


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
