"""Inference over a data set: a detector run on every batch of a loader, its outputs as COCO results."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from tqdm import tqdm

from hmkd.engine.coco_results import detections_to_coco
from hmkd.engine.distributed import gather_unique_detections
from hmkd.engine.loaders import close_loader_iter, next_batch
from hmkd.engine.logging_utils import bar_wanted

logger = logging.getLogger(__name__)

__all__ = ["inference_on_dataset"]


def _len_or_none(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def inference_on_dataset(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str,
    label_to_cat: Mapping[int, int],
    with_masks: bool = False,
    progress: bool = True,
    drop_unknown: bool = False,
) -> list[dict]:
    """Run a torchvision detection model over a loader of ``(images, targets)`` and collect COCO results.

    The model is put in eval mode (its previous mode is restored) and run under
    ``torch.inference_mode()``; it must return boxes in the coordinates of the images it is given
    (torchvision detectors do). In a distributed run the results of all ranks are gathered.

    Returns:
        COCO results (see :func:`detections_to_coco`, which ``drop_unknown`` is passed to).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    n_images, compute_time = 0, 0.0
    start = time.perf_counter()
    it = iter(loader)
    try:
        with torch.inference_mode():
            bar = tqdm(total=_len_or_none(loader), desc="inference", disable=not bar_wanted(progress), dynamic_ncols=True)
            while True:
                try:
                    images, targets = next_batch(it)
                except StopIteration:
                    break
                bar.update(1)
                images = [img.to(device, non_blocking=True) for img in images]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                outputs = model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compute_time += time.perf_counter() - t0
                outputs = [{k: v.to("cpu") for k, v in o.items()} for o in outputs]
                ids = [int(t["image_id"]) for t in targets]
                image_ids.extend(ids)
                results.extend(detections_to_coco(outputs, ids, label_to_cat, with_masks=with_masks, drop_unknown=drop_unknown))
                n_images += len(images)
            bar.close()
    finally:
        close_loader_iter(it)
        model.train(was_training)
    total = time.perf_counter() - start
    logger.info(
        "inference: %d images in %.1f s (model %.3f s/image), %d detections",
        n_images, total, compute_time / max(n_images, 1), len(results),
    )
    _, results = gather_unique_detections(image_ids, results)
    return results
