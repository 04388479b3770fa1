"""Evaluation of a detector on a data set: :func:`evaluate_model` (used by the trainer),
:func:`evaluate` (``hmkd eval``) and :func:`write_eval_outputs`.

In a multi-process run (torchrun) each rank infers on its shard, the detections are gathered and
scored on rank 0 (:func:`hmkd.engine.evaluator.coco_metrics`), and every rank returns the same
metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from hmkd.config import Config
from hmkd.data.at_hand import class_count
from hmkd.engine import distributed as du
from hmkd.engine.evaluator import coco_metrics
from hmkd.engine.inference import inference_on_dataset
from hmkd.engine.signals import worker_init
from hmkd.models import is_mask_model
from hmkd.utils import write_json

__all__ = ["aitod_max_dets_of", "check_label_map", "evaluate", "evaluate_model", "write_eval_outputs"]

logger = logging.getLogger(__name__)


def aitod_max_dets_of(cfg: Config) -> int | None:
    """The ``aitod_max_dets`` of :func:`evaluate_model` a run's ``eval`` section asks for."""
    return int(cfg.eval.max_dets) if cfg.eval.aitod else None


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    batch_size: int = 1,
    workers: int = 0,
    with_masks: bool = False,
    progress: bool = True,
    ctx: du.DistContext | None = None,
    aitod_max_dets: int | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict]]:
    """COCO metrics and detections of ``model`` on ``dataset`` (bbox; segm too with ``with_masks``;
    AI-TOD's size buckets too with ``aitod_max_dets``, see :func:`~hmkd.engine.evaluator.coco_metrics`).

    In a multi-process run each rank infers on its shard (indices ``rank::world_size``), the
    detections are gathered and scored on rank 0, and every rank returns the same metrics. The
    detections are put in (image id, per-image) order, so the result does not depend on the number
    of processes. The caller's random streams are left untouched.
    """
    from hmkd.data import gt_json_for
    from hmkd.data.transforms import collate_fn

    ctx = ctx or du.DistContext(device=device)
    shard = dataset if not ctx.distributed else Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers > 0 else None,
    )
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        detections = inference_on_dataset(
            model, loader, device, dataset.label_to_cat, with_masks=with_masks, progress=progress and ctx.is_main,
            drop_unknown=getattr(dataset, "label_map", "contiguous") == "category_id",
        )
    detections = sorted(detections, key=lambda d: d["image_id"])  # stable: per-image order kept
    metrics: dict[str, dict[str, Any]] = {}
    if ctx.is_main:
        iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        metrics = coco_metrics(gt_json_for(dataset), detections, iou_types, getattr(dataset, "class_names", None),
                               aitod_max_dets=aitod_max_dets)
    metrics = du.broadcast_object(ctx, metrics)
    return metrics, detections


def evaluate(cfg: Config, *, weights: str, out_dir: str, progress: bool = True) -> dict[str, dict[str, Any]]:
    """``hmkd eval``: build ``cfg.model``, load ``weights``, score the val split, write the outputs.

    Writes ``metrics.json`` and ``detections.json`` to ``out_dir`` (rank 0) and returns the metrics
    ``{"bbox": {...}}`` (plus ``"segm"`` for Mask R-CNN). Runs sharded under torchrun. A checkpoint
    that stores another architecture than ``cfg.model``, or was trained on other category ids than
    the data set's, is a one-line :class:`~hmkd.errors.CheckpointError` naming both.
    """
    from hmkd.data import build_data
    from hmkd.models import build_model
    from hmkd.models.checkpoint_info import check_fits, load_detector_weights, read_checkpoint_info

    info = read_checkpoint_info(weights)
    check_fits(info, cfg.model)  # before the data set is read: an architecture that differs is named at once
    unnamed = _torchvision_file_without_data_set(cfg, info)
    ctx = du.init_distributed(cfg.device)
    try:
        val = du.main_first(ctx, lambda: build_data(cfg, train=False))
        n = _eval_num_classes(cfg, val, info, unnamed)
        model = build_model(cfg.model, n, load=False)
        load_detector_weights(model, weights, dataclasses.replace(cfg.model, num_classes=n), info=info)
        check_label_map(info, val)
        model.to(ctx.device).eval()
        metrics, dets = evaluate_model(
            model,
            val,
            device=ctx.device,
            batch_size=cfg.data.eval_batch_size,
            workers=cfg.data.workers,
            with_masks=is_mask_model(cfg),
            progress=progress,
            ctx=ctx,
            aitod_max_dets=aitod_max_dets_of(cfg),
        )
        if ctx.is_main:
            write_eval_outputs(out_dir, metrics, dets)
        du.barrier(ctx)
        return metrics
    finally:
        du.cleanup(ctx)


_NAME_IT = ("name the checkpoint's data set, e.g. data.kind=coco data.root=DIR data.val_images=IMAGES "
            "data.val_ann=ANN.json data.label_map=category_id (torchvision's COCO checkpoints)")


def _torchvision_file_without_data_set(cfg: Config, info: Any) -> bool:
    """Whether ``cfg`` is a ``torchvision:`` config that names no data set (every ``data`` key at
    its default) and the weights are a bare file (no stored config): the default synthetic set is
    then not the checkpoint's. It is not generated for it (a one-line error when it is not on disk)."""
    from hmkd.config import to_dict
    from hmkd.data import synthetic_exists
    from hmkd.data.at_hand import names_no_data_set
    from hmkd.models.torchvision_zoo import is_torchvision

    if not (is_torchvision(cfg.model.detector) and info.config is None and names_no_data_set(cfg)):
        return False
    if not synthetic_exists(cfg.data.root, **to_dict(cfg.data.synth)):
        from hmkd.errors import ConfigError

        raise ConfigError(f"{info.path}: the config names no data set (every data key at its default), and the "
                          f"default synthetic set {cfg.data.root} is no torchvision checkpoint's: {_NAME_IT}")
    return True


def _eval_num_classes(cfg: Config, val: Any, info: Any, unnamed: bool) -> int:
    """The class count to build the model with, by the one rule (:func:`hmkd.data.at_hand.class_count`,
    checked against the data set): the data set's; with ``data.label_map: category_id`` and
    ``model.num_classes`` unset, a file without a stored config that has more classes keeps its own
    (labels are category ids: COCO's 90 outputs on a part of COCO, the labels above the data set's
    largest id being none of its categories). A file whose count differs from the default data set's
    when the config names none is an error saying which keys to give."""
    from hmkd.errors import CheckpointError
    from hmkd.models.checkpoint_info import checkpoint_classes

    k = checkpoint_classes(info, cfg.model.detector) if info.config is None else None
    n = class_count(cfg, val, k, check=True)
    if unnamed and k is not None and k != int(val.num_classes):
        raise CheckpointError(f"{info.path}: has {k} classes, the default data set {cfg.data.root} "
                              f"{int(val.num_classes)} (the config names no data set): {_NAME_IT}")
    return n


def check_label_map(info: Any, dataset: Any) -> None:
    """Raise :class:`CheckpointError` when a checkpoint's stored label map (its training set's
    category ids) differs from ``dataset``'s: its labels would be scored as other categories.
    A checkpoint without one passes; names that differ under the same ids are only logged."""
    from hmkd.errors import CheckpointError
    from hmkd.models.checkpoint_info import LabelMap

    if info.label_map is None:
        return
    theirs = LabelMap.from_dataset(dataset)
    if info.label_map.category_ids != theirs.category_ids:
        raise CheckpointError(
            f"{info.path}: trained on category ids {list(info.label_map.category_ids)}, the data set has "
            f"{list(theirs.category_ids)}; its labels would be scored as other categories"
        )
    if info.label_map.names != theirs.names:
        logger.warning("%s: category names %s differ from the data set's %s (same ids)",
                       info.path, list(info.label_map.names), list(theirs.names))


def write_eval_outputs(out_dir: str | os.PathLike, metrics: Mapping[str, Any], detections: Sequence[dict]) -> dict[str, str]:
    """Write ``metrics.json`` and ``detections.json`` into ``out_dir`` atomically (a reader never
    sees a half-written file); non-finite metrics (``nan``) are written as ``null``.

    Returns:
        ``{"metrics": path, "detections": path}``.
    """
    out = Path(out_dir)
    paths = {"metrics": str(out / "metrics.json"), "detections": str(out / "detections.json")}
    write_json(paths["metrics"], metrics, indent=None)
    write_json(paths["detections"], list(detections), indent=None)
    return paths
