"""The models, label map and data set of the commands that take checkpoints as inputs
(``hmkd viz detections|heatmap``, ``hmkd export onnx``; ``hmkd eval`` uses
:func:`hmkd.models.checkpoint_info.config_from_checkpoint` directly).

With a config file, ``--weights LABEL=CKPT`` labels starting with ``teacher`` take its teacher
section and every other label its model section; each checkpoint that stores its own config must
fit that section (else a one-line error names both architectures). Without a config file, each
checkpoint brings its own architecture (``key=value`` overrides still apply to it, e.g.
``model.score_thresh=0.1``), and the data set is the one the first checkpoint was trained on, used
only when it is already on disk (nothing is generated).

A config that leaves every ``data`` key at its default names no data set
(:func:`names_no_data_set`): with a ``torchvision:`` section and a bare checkpoint (torchvision's
file, no stored config), its default synthetic set is not the checkpoint's, so it is not generated,
and used only when on disk with the checkpoint's class count. A data set the config names is used,
generated if synthetic; with ``data.label_map: category_id`` a checkpoint with more classes than its
largest category id keeps its count (COCO's 90 on a part of COCO).

The label map (category ids and names of labels ``1..K``) is the one the checkpoints store (they
must agree), else the data set's, else, for torchvision's 90 COCO classes (a ``torchvision:``
detector or ``data.label_map: category_id``), COCO's from torchvision's weight metadata
(:meth:`LabelMap.torchvision_coco`, offline), else unknown. One log line says where it came from.

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
from hmkd.models.torchvision_zoo import is_torchvision
from hmkd.models.checkpoint_info import (
    CheckpointInfo,
    LabelMap,
    check_fits,
    check_keys_fit,
    checkpoint_classes,
    config_from_checkpoint,
    load_detector_weights,
    read_checkpoint_info,
)

logger = logging.getLogger(__name__)

#: The classes of torchvision's COCO checkpoints (91 outputs with the background).
COCO_CLASSES = 90

__all__ = [
    "ModelInputs",
    "ModelSpec",
    "as_model",
    "infer_num_classes",
    "load_image",
    "model_inputs",
    "names_no_data_set",
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


def names_no_data_set(cfg: Config) -> bool:
    """Whether ``cfg`` leaves every ``data`` key at its default: the config file and the overrides
    name no data set. The default synthetic set is then what an hmkd detector of that config was
    trained on, but it is no ``torchvision:`` checkpoint's data set (the presets set no ``data``)."""
    from hmkd.config import DataConfig

    return cfg.data == DataConfig()


def _torchvision_preset_alone(cfg: Config, weights: Sequence[tuple[str, str]],
                              infos: Mapping[str, CheckpointInfo]) -> bool:
    """A config that names no data set, with a ``torchvision:`` section for a checkpoint that
    stores no config (a bare torchvision file): its default synthetic set is not that file's."""
    from hmkd.models.torchvision_zoo import is_torchvision

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
        n = cfg.model.num_classes
        if n is None and dataset is not None and not unnamed:
            n = int(dataset.num_classes)
            k = _checkpoint_count(cfg, weights, infos)
            if getattr(dataset, "label_map", None) == "category_id" and k is not None and k > n:
                # labels are category ids: a model with more outputs (COCO's 90 on a part of COCO) fits
                logger.info("the checkpoint has %d classes, the data set's category ids go up to %d; labels above "
                            "are no category of it", k, n)
                n = k
        if n is None:
            n = _checkpoint_count(cfg, weights, infos)
        if unnamed and dataset is not None and n is not None and int(dataset.num_classes) != n:
            logger.info("the default data set %s has %d classes, the checkpoints %d; not using it",
                        cfg.data.root, dataset.num_classes, n)
            dataset = None
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
