"""Data sets: COCO-format JSON, VisDrone-DET and the built-in synthetic small-object set.

Every data set yields ``(image, target)`` with the torchvision detection target convention (see
:mod:`hmkd.data.coco`); :func:`build_dataset` builds one by kind, :func:`build_data` the training or
validation split a run's config describes, and :func:`gt_json_for` gives the COCO ground truth that
:mod:`hmkd.engine.evaluator` scores it against.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hmkd.config import Config, to_dict
from hmkd.errors import ConfigError, did_you_mean
from hmkd.models import is_mask_model

from .coco import CocoDetection, base_dataset
from .synthetic import generate_synthetic, synthetic_exists
from .transforms import build_transforms, collate_fn
from .visdrone import VisDroneDetection, convert_visdrone

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "CocoDetection",
    "VisDroneDetection",
    "build_data",
    "build_dataset",
    "build_transforms",
    "collate_fn",
    "convert_visdrone",
    "generate_synthetic",
    "gt_json_for",
    "base_dataset",
    "synthetic_exists",
]

DATASETS: dict[str, str] = {
    "coco": "any COCO-format detection set: data.train_images + data.train_ann, data.val_images + data.val_ann (relative to data.root); boxes and masks",
    "visdrone": "VisDrone-DET folder data.root (images/ + annotations/*.txt); ignored regions and class 0/11 become crowd boxes",
    "synthetic": "built-in deterministic small-object shapes set, generated into data.root on first use (data.synth.*: presets default/hard)",
}


def build_dataset(
    kind: str,
    *,
    train: bool,
    root: str,
    ann_file: str | None = None,
    images_dir: str | None = None,
    hflip: bool = True,
    scales: list[int] | None = None,
    max_size: int = 1333,
    with_masks: bool = False,
    synth: dict | None = None,
    label_map: str = "contiguous",
) -> CocoDetection:
    """Build a detection data set by kind with the standard transforms.

    Args:
        kind: ``"coco"``, ``"visdrone"`` or ``"synthetic"`` (see ``DATASETS``).
        train: training split/targets and augmentations (flip, multi-scale) vs evaluation.
        root: for ``coco``, the folder ``ann_file``/``images_dir`` are relative to (when they are
            relative); for ``visdrone``, the folder holding ``images/`` and ``annotations/``; for
            ``synthetic``, the generator's output folder (train → train split, else val split).
        ann_file: COCO JSON (``coco`` only; required).
        images_dir: image folder (``coco`` only; default ``root``).
        hflip: random horizontal flip when training.
        scales: shorter-side sizes for multi-scale training (``None``: no resize here).
        max_size: longer-side cap for multi-scale training.
        with_masks: add instance masks to targets (``coco`` and ``synthetic``).
        synth: parameters of :func:`hmkd.data.synthetic.generate_synthetic` (``n_train``, ``n_val``,
            ``size``, ``seed``, ``preset`` and preset overrides). The set is generated on first use
            and reused when ``root/meta.json`` records the same parameters (other parameters
            regenerate it). With ``synth`` empty or ``None``, an existing set in ``root`` is used
            as it is, and a missing one is generated with the defaults.
        label_map: ``contiguous`` (labels 1..K) or ``category_id`` (labels are the category ids,
            as torchvision's COCO checkpoints expect); see :class:`~hmkd.data.coco.CocoDetection`.

    Raises:
        ConfigError: unknown kind, or a missing/misplaced argument for that kind.
        DataError: the data files are missing or malformed.
    """
    transforms = build_transforms(train, hflip=hflip, scales=scales, max_size=max_size)
    rootp = Path(root)
    if kind == "coco":
        if not ann_file:
            key = "data.train_ann" if train else "data.val_ann"
            raise ConfigError(f"{key} (the COCO JSON) is required for data.kind 'coco'")
        ann = Path(ann_file) if os.path.isabs(ann_file) else rootp / ann_file
        imgs = rootp if images_dir is None else (Path(images_dir) if os.path.isabs(images_dir) else rootp / images_dir)
        return CocoDetection(imgs, ann, train=train, transforms=transforms, with_masks=with_masks, label_map=label_map)
    if kind == "visdrone":
        if with_masks:
            raise ConfigError("data.with_masks is not available for kind 'visdrone' (VisDrone-DET has boxes only)")
        return VisDroneDetection(rootp, train=train, transforms=transforms, label_map=label_map)
    if kind == "synthetic":
        params: dict[str, Any] = dict(synth or {})
        meta = rootp / "meta.json"
        if not synth and meta.is_file():
            logger.info("using the synthetic set already in %s", rootp)
        else:
            generate_synthetic(rootp, **params)
        split = "train" if train else "val"
        return CocoDetection(
            rootp / split / "images", rootp / "annotations" / f"{split}.json", train=train,
            transforms=transforms, with_masks=with_masks, label_map=label_map,
        )
    raise ConfigError(f"data.kind {kind!r} is unknown; choose one of {sorted(DATASETS)}{did_you_mean(kind, list(DATASETS))}")


def build_data(cfg: Config, *, train: bool) -> CocoDetection:
    """The training (``train=True``) or validation split of ``cfg.data``, as a run uses it (the
    training targets carry masks when ``data.with_masks`` is set or the detector is Mask R-CNN).

    Raises what :func:`build_dataset` raises.
    """
    d = cfg.data
    return build_dataset(
        d.kind,
        train=train,
        root=d.root,
        ann_file=d.train_ann if train else d.val_ann,
        images_dir=d.train_images if train else d.val_images,
        hflip=d.hflip,
        scales=None,
        max_size=cfg.model.max_size,
        with_masks=bool(train and (d.with_masks or is_mask_model(cfg))),
        synth=to_dict(d.synth),
        label_map=d.label_map,
    )


def gt_json_for(dataset: Any) -> str | dict:
    """COCO ground truth to evaluate ``dataset`` against.

    Returns the annotation file path when the data set was read unchanged from a file, otherwise
    the COCO dict (VisDrone, or a JSON whose missing ``id``/``area``/``iscrowd`` were filled in). For
    a ``Subset`` the dict is restricted to the subset's images, so images not evaluated do not count
    as misses.
    """
    ds, ids = base_dataset(dataset)
    if ids is None:
        if ds.ann_file is not None and not ds._gt_modified:
            return ds.ann_file
        return ds.coco.dataset
    keep = set(ids)
    d = ds.coco.dataset
    return {
        **{k: v for k, v in d.items() if k not in ("images", "annotations")},
        "images": [im for im in d["images"] if im["id"] in keep],
        "annotations": [a for a in d["annotations"] if a["image_id"] in keep],
    }
