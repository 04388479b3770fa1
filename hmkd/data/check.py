"""The pre-flight check of a data set: every image and annotation looked at before iteration 1.

A missing image, an image whose size disagrees with its annotation file, or a file that is not an
image would otherwise be found only when a loader first reads it (hours into a run). The check
reads each image's header only (``PIL.Image.open(path).size`` and its format: no pixel is
decoded; :mod:`hmkd.data.images`), in a thread pool, and counts what the training targets hold:
images, boxes, crowd regions, boxes per class, the small/medium/large share (COCO's areas, below
32^2 / 96^2 pixels), images without boxes, boxes clipped to the image or dropped as degenerate.

:func:`check_dataset` returns a :class:`DataReport`, or raises :class:`~hmkd.errors.DataError`
naming the first problem's file (every problem, up to :data:`MAX_LISTED`, is logged first). A
training split without a single box is an error. :func:`format_reports` is the one-screen
summary the trainer logs once (rank 0). Pixel data cut off after a valid header (a truncated
file) is only found when the image is decoded; the loader reports it naming the file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmkd.errors import DataError

from .coco import base_dataset
from .images import read_image_size, read_image_sizes

logger = logging.getLogger(__name__)

__all__ = ["DataReport", "MAX_LISTED", "check_dataset", "format_reports", "read_image_size"]

MAX_LISTED = 10
"""Problems logged one per line before the error (the rest are counted)."""

SMALL, MEDIUM = 32**2, 96**2  # COCO's area thresholds


@dataclass
class DataReport:
    """What :func:`check_dataset` found in one split."""

    split: str
    source: str
    images: int = 0
    boxes: int = 0
    crowd: int = 0
    empty_images: int = 0
    clipped: int = 0
    dropped: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=lambda: {"small": 0, "medium": 0, "large": 0})
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_read: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _coco_base(dataset: Any) -> Any:
    ds, _ = base_dataset(dataset)
    return ds


def check_dataset(dataset: Any, split: str = "train", *, workers: int | None = None,
                  require_boxes: bool | None = None, read_images: bool = True) -> DataReport:
    """Check every image of ``dataset`` (a COCO-backed data set) and count its targets.

    Args:
        dataset: a :class:`~hmkd.data.coco.CocoDetection` (or a ``Subset`` of one).
        split: ``"train"`` or ``"val"``, for the messages.
        workers: threads reading headers (default: up to 16).
        require_boxes: a split without a single (non-crowd) box is an error; default: for ``train``.
        read_images: read every image's header (``False``: the annotations only, e.g. for a data
            set on storage too slow to touch every file; ``data.check_images: false``).

    Returns:
        The split's :class:`DataReport` (``problems`` empty).

    Raises:
        DataError: an image is missing, unreadable or of another size than the annotation file
            says (the first problem's file is named; up to :data:`MAX_LISTED` are logged first),
            or ``require_boxes`` and there is no box.
    """
    t0 = time.perf_counter()
    ds = _coco_base(dataset)
    report = DataReport(split=split, source=str(ds.source), images=len(ds.ids), images_read=read_images)
    paths = [ds.images_dir / ds.coco.imgs[i]["file_name"] for i in ds.ids]
    sizes = read_image_sizes(paths, workers) if read_images else []
    for img_id, path, got in zip(ds.ids, paths, sizes):
        info = ds.coco.imgs[img_id]
        if got == "not found":
            report.problems.append(f"{path}: image file not found (image id {img_id} in {ds.source})")
        elif isinstance(got, str):
            report.problems.append(f"{path}: {got} (image id {img_id} in {ds.source})")
        elif tuple(got) != (info["width"], info["height"]):
            report.problems.append(
                f"{path}: image is {got[0]}x{got[1]} but {ds.source} says {info['width']}x{info['height']} "
                f"(image id {img_id})"
            )
    names = list(ds.class_names)
    counts = np.zeros(len(names), dtype=np.int64)
    for img_id in ds.ids:
        arr = ds._per_image[img_id]
        real = arr["iscrowd"] == 0
        report.crowd += int((~real).sum())
        labels = arr["labels"][real]
        counts += np.bincount(labels, minlength=len(names))[: len(names)]
        areas = arr["area"][real]
        report.sizes["small"] += int((areas < SMALL).sum())
        report.sizes["medium"] += int(((areas >= SMALL) & (areas < MEDIUM)).sum())
        report.sizes["large"] += int((areas >= MEDIUM).sum())
        if not real.any():
            report.empty_images += 1
    report.per_class = {names[k]: int(counts[k]) for k in range(1, len(names))}
    report.boxes = int(counts[1:].sum())
    report.clipped = int(ds.stats.get("clipped", 0))
    report.dropped = int(ds.stats.get("dropped", 0))
    report.seconds = time.perf_counter() - t0
    if report.problems:
        for p in report.problems[:MAX_LISTED]:
            logger.warning("data check: %s", p)
        n = len(report.problems)
        more = f"; {n - 1} more problem(s) in the {split} split (the first {min(n, MAX_LISTED)} are logged above)" if n > 1 else ""
        raise DataError(report.problems[0] + more)
    if require_boxes if require_boxes is not None else split == "train":
        if report.boxes == 0:
            raise DataError(
                f"{ds.source}: the {split} split has no annotations ({report.images} images, 0 boxes"
                + (f", {report.crowd} crowd regions" if report.crowd else "")
                + "): nothing to train on"
            )
    return report


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.0f}%" if total else "-"


def format_reports(reports: list[DataReport], width: int = 100) -> list[str]:
    """The one-screen summary of the checked splits: sizes, boxes per class (the most frequent
    first, at most 12 named), the small/medium/large share and what was clipped or dropped."""
    lines = []
    for r in reports:
        s = r.sizes
        lines.append(
            f"{r.split}: {r.images} images, {r.boxes} boxes ({r.boxes / r.images if r.images else 0:.1f} per image), "
            f"small {_pct(s['small'], r.boxes)} / medium {_pct(s['medium'], r.boxes)} / large {_pct(s['large'], r.boxes)}"
            f"  [{r.source}, {'checked' if r.images_read else 'images not read'} in {r.seconds:.1f} s]"
        )
        extra = []
        if r.empty_images:
            extra.append(f"{r.empty_images} images without boxes")
        if r.crowd:
            extra.append(f"{r.crowd} crowd regions (not targets)")
        if r.clipped:
            extra.append(f"{r.clipped} boxes clipped to the image")
        if r.dropped:
            extra.append(f"{r.dropped} degenerate boxes dropped")
        if extra:
            lines.append("  " + ", ".join(extra))
        ranked = sorted(r.per_class.items(), key=lambda kv: (-kv[1], kv[0]))
        cells = [f"{name} {n}" for name, n in ranked[:12]]
        if len(ranked) > 12:
            cells.append(f"... {len(ranked) - 12} more classes, {sum(n for _, n in ranked[12:])} boxes")
        row = "  per class:"
        for c in cells:
            if len(row) + len(c) + 2 > width:
                lines.append(row)
                row = "   "
            row += f" {c},"
        lines.append(row.rstrip(","))
        missing = [name for name, n in r.per_class.items() if n == 0]
        if missing and r.split == "train":
            lines.append(f"  classes without a single training box: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    return lines
