"""COCO-format detection data set (any data set whose annotations are a COCO JSON).

Choices made here (each is also what torchvision's detection references do unless noted):

* Category ids, whatever they are, map to contiguous labels ``1..K`` in sorted-id order; label 0 is
  the background. ``cat_to_label``/``label_to_cat`` hold the mapping; ``class_names[0]`` is
  ``"__background__"``. With ``label_map="category_id"`` the labels are the category ids
  themselves (ids must then be >= 1; ``num_classes`` is the largest id, so COCO gives the 91
  outputs torchvision's COCO checkpoints have, its unused ids included); evaluation maps labels
  back to category ids either way.
* Crowd annotations (``iscrowd=1``) are not training targets: with ``train=True`` they are left out
  of the returned target. With ``train=False`` they are kept (with ``iscrowd=1``); evaluation reads
  the JSON through :func:`gt_json_for` anyway.
* Boxes are clipped to the image; a box whose width or height is ``<= 1e-3`` after clipping is
  dropped. The counts (and the number of images left without boxes) are in ``dataset.stats`` and
  one summary line is logged when the set is loaded. Images without boxes are kept; their targets
  hold empty tensors (``boxes`` ``[0, 4]``, ``labels`` ``[0]`` ...), which torchvision detectors accept.
* Masks (``with_masks=True``) come from polygon or RLE segmentations via pycocotools, at the size
  the JSON gives for the image. An annotation without a usable segmentation gets its (clipped) box
  as mask; such cases are counted in ``stats["mask_from_box"]``.
* Annotations missing ``id``/``area``/``iscrowd`` are filled in (``area`` = box area) so COCOeval can
  use the data; ``gt_json_for`` then hands the filled dict, not the file, to evaluation.
* An image entry without ``width``/``height`` gets them from the image file's header (read in
  parallel when the set is built, nothing decoded); ``gt_json_for`` then hands the filled dict to
  evaluation.
* Bad input raises :class:`hmkd.errors.DataError` with one line naming the file and entry: a file
  that is not JSON, a missing top-level key, an annotation without ``bbox``/``category_id``/
  ``image_id`` or with a category or image that is not listed, an image file that is missing,
  unreadable or truncated, or whose size disagrees with the JSON (checked when the item is read,
  and for every image before training starts by :func:`hmkd.data.check.check_dataset`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hmkd.errors import ConfigError, DataError

from .images import read_image_sizes
from .transforms import ToTensor

logger = logging.getLogger(__name__)

__all__ = ["CocoDetection", "LABEL_MAPS", "base_dataset", "load_coco_json", "validate_coco_dict", "coco_from_dict", "MIN_BOX_SIZE"]

#: How category ids become the detector's labels (``data.label_map``).
LABEL_MAPS = ("contiguous", "category_id")

MIN_BOX_SIZE = 1e-3
"""Boxes whose clipped width or height is at most this many pixels are dropped."""

_REQUIRED_KEYS = ("images", "annotations", "categories")


def _one_line(text: Any) -> str:
    """Collapse an exception text onto one line."""
    return " ".join(str(text).split())


def load_coco_json(path: str | os.PathLike) -> dict:
    """Read a COCO JSON file and validate it (see :func:`validate_coco_dict`).

    Raises:
        DataError: the file is missing, is not JSON or is not a valid COCO detection file.
    """
    data = _read_json(path)
    validate_coco_dict(data, str(path))
    return data


def _read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{p}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not a JSON file ({_one_line(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read annotation file ({_one_line(e)})") from None
    return data


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool; NumPy integers are not ints here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_id(x: Any) -> bool:
    """An integer id that fits the int64 tensors and arrays ids end up in."""
    return isinstance(x, int) and not isinstance(x, bool) and -(2**63) <= x < 2**63


def validate_coco_dict(data: Any, source: str, *, sizes_optional: bool = False) -> bool:
    """Check the structure of a COCO detection dict in place and fill optional fields.

    Missing ``id`` (annotation), ``iscrowd`` (0) and ``area`` (box area) are filled in. Annotation
    ids that are missing, repeated or ``0`` get new ids above the largest one: COCOeval (pycocotools
    and faster-coco-eval alike) records a match as the matched ground truth's id with 0 meaning
    "unmatched", so a detection matched to an annotation with id 0 would count as a false positive
    (a perfect detector scores 25 AP instead of 100 on a two-box image whose ids are 0 and 1).

    Args:
        data: the parsed JSON.
        source: file name (or description) used in error messages.
        sizes_optional: an image entry may lack ``width``/``height`` (the caller reads them from
            the image file, as :class:`CocoDetection` does); present ones are still checked.

    Returns:
        True when a field had to be filled in (the dict now differs from the file).

    Raises:
        DataError: one line naming ``source`` and the key or entry at fault.
    """
    if not isinstance(data, dict):
        raise DataError(f"{source}: top level must be a JSON object with keys images/annotations/categories")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise DataError(f"{source}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(f"{source}: top-level key '{key}' must be a list, got {type(data[key]).__name__}")

    cat_ids: set[int] = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            raise DataError(f"{source}: categories[{i}] has no 'id'")
        if not _is_id(c["id"]):
            raise DataError(f"{source}: categories[{i}] id {c['id']!r} is not an integer (64-bit)")
        if c["id"] in cat_ids:
            raise DataError(f"{source}: categories[{i}] repeats category id {c['id']}")
        cat_ids.add(c["id"])
    if not cat_ids:
        raise DataError(f"{source}: 'categories' is empty")

    img_ids: set[int] = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{source}: images[{i}] is not an object")
        for key in ("id", "file_name") if sizes_optional else ("id", "file_name", "width", "height"):
            if key not in im:
                raise DataError(f"{source}: images[{i}] has no '{key}'")
        if not _is_id(im["id"]):
            raise DataError(f"{source}: images[{i}] id {im['id']!r} is not an integer (64-bit)")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DataError(f"{source}: images[{i}] (id {im['id']}) file_name {im['file_name']!r} is not a file name")
        for key in ("width", "height"):
            if key not in im:
                continue  # sizes_optional: read from the image by the caller
            if not isinstance(im[key], int) or isinstance(im[key], bool) or im[key] <= 0:
                raise DataError(f"{source}: images[{i}] (id {im['id']}) has invalid {key} {im[key]!r}")
        if im["id"] in img_ids:
            raise DataError(f"{source}: images[{i}] repeats image id {im['id']}")
        img_ids.add(im["id"])

    modified = False
    next_id = 1 + max(
        (a["id"] for a in data["annotations"] if isinstance(a, dict) and _is_id(a.get("id"))),
        default=0,
    )
    seen_ids: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{source}: annotations[{i}] is not an object")
        name = f"annotations[{i}]" + (f" (id {a['id']})" if "id" in a else "")
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise DataError(f"{source}: {name} has no '{key}'")
        if isinstance(a["category_id"], (list, dict)) or a["category_id"] not in cat_ids:
            raise DataError(f"{source}: {name} has category_id {a['category_id']!r}, which is not in 'categories'")
        if isinstance(a["image_id"], (list, dict)) or a["image_id"] not in img_ids:
            raise DataError(f"{source}: {name} has image_id {a['image_id']!r}, which is not in 'images'")
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
            raise DataError(f"{source}: {name} bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
        if "id" not in a or not _is_id(a["id"]) or a["id"] in seen_ids or a["id"] == 0:
            a["id"] = next_id
            next_id += 1
            modified = True
        seen_ids.add(a["id"])
        if "iscrowd" not in a:
            a["iscrowd"] = 0
            modified = True
        elif a["iscrowd"] not in (0, 1, True, False):
            raise DataError(f"{source}: {name} iscrowd {a['iscrowd']!r} is not 0 or 1")
        if "area" not in a:
            a["area"] = float(max(bbox[2], 0.0) * max(bbox[3], 0.0))
            modified = True
        elif not is_number(a["area"]):
            raise DataError(f"{source}: {name} area {a['area']!r} is not a finite number")
    return modified


def coco_from_dict(data: dict) -> COCO:
    """Build a pycocotools ``COCO`` index from an in-memory dict without printing."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _usable_segmentation(seg: Any) -> Any | None:
    """Return the segmentation if pycocotools can rasterise it (polygons with >= 3 points), else None."""
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        return polys or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return seg
    return None


def _rle_string_counts(s: bytes) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), None if malformed."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k > 12:  # cut off in the middle of a number, or absurdly long
                return None
            c = s[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def segmentation_problem(seg: Any, h: int, w: int) -> str | None:
    """Why pycocotools must not rasterise ``seg`` for an ``h`` x ``w`` image, or None if it is safe.

    pycocotools' C code trusts its input: a polygon with huge or NaN coordinates allocates without
    bound, and RLE counts that do not add up to ``h * w`` write past the mask. So polygons must be
    finite numbers within one image size of the image, and an RLE must have ``size == [h, w]``
    and non-negative counts summing to ``h * w``.
    """
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return "a polygon is not a list of 3 or more x, y pairs"
            if not all(is_number(v) for v in poly):
                return "polygon holds a value that is not a finite number"
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < -w or max(xs) > 2 * w or min(ys) < -h or max(ys) > 2 * h:
                return f"polygon coordinates lie far outside the {w}x{h} image"
        return None
    size = seg.get("size")
    if not isinstance(size, list) or [v for v in size] != [h, w] or any(isinstance(v, bool) for v in size):
        return f"RLE size {size!r} differs from image {h}x{w}"
    counts = seg["counts"]
    if isinstance(counts, str):
        try:
            counts = _rle_string_counts(counts.encode("ascii"))
        except UnicodeEncodeError:
            counts = None
    elif isinstance(counts, bytes):
        counts = _rle_string_counts(counts)
    elif not isinstance(counts, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        counts = None
    if counts is None:
        return "RLE counts are malformed"
    if any(v < 0 for v in counts) or sum(counts) != h * w:
        return f"RLE counts do not add up to the {h}x{w} image"
    return None


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection data set returning ``(image, target)`` pairs.

    Args:
        images_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: path of the COCO JSON, or an already-built COCO dict (used by VisDrone; it is
            validated and filled in place, and kept as ``coco.dataset``).
        train: training targets (crowd boxes left out) or evaluation targets (crowd kept).
        transforms: callable ``(image, target) -> (image, target)``; ``None`` means ``ToTensor()``.
        with_masks: add ``masks`` (uint8 ``[N, H, W]``) to the target.
        source: name used in messages when ``ann_file`` is a dict.
        label_map: ``contiguous`` (labels 1..K in sorted category-id order) or ``category_id``
            (labels are the category ids; ``num_classes`` is the largest id).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike | dict,
        *,
        train: bool,
        transforms: Callable | None = None,
        with_masks: bool = False,
        source: str | None = None,
        label_map: str = "contiguous",
    ) -> None:
        if label_map not in LABEL_MAPS:
            raise ConfigError(f"data.label_map must be one of {', '.join(LABEL_MAPS)}, got {label_map!r}")
        self.label_map = label_map
        self.images_dir = Path(images_dir)
        if isinstance(ann_file, dict):
            self.ann_file: str | None = None
            self.source = source or "<in-memory COCO dict>"
            data = ann_file
            validate_coco_dict(data, self.source, sizes_optional=True)
            self._gt_modified = True  # no file to point evaluation at
        else:
            self.ann_file = str(ann_file)
            self.source = source or self.ann_file
            data = _read_json(ann_file)
            self._gt_modified = validate_coco_dict(data, self.source, sizes_optional=True)
        if self._fill_sizes(data):
            self._gt_modified = True
        self.train = bool(train)
        self.with_masks = bool(with_masks)
        self.transforms = transforms if transforms is not None else ToTensor()
        self.coco = coco_from_dict(data)

        self.cat_ids: list[int] = sorted(self.coco.cats.keys())
        if label_map == "category_id":
            if self.cat_ids[0] < 1:
                raise DataError(
                    f"{self.source}: category id {self.cat_ids[0]} cannot be a label with data.label_map: category_id "
                    "(label 0 is the background; use data.label_map: contiguous)"
                )
            self.cat_to_label: dict[int, int] = {c: c for c in self.cat_ids}
            self.num_classes: int = self.cat_ids[-1]
        else:
            self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
            self.num_classes = len(self.cat_ids)
        self.label_to_cat: dict[int, int] = {label: c for c, label in self.cat_to_label.items()}
        # one name per category in sorted-id order (what evaluation's per-class table expects)
        self.class_names: list[str] = ["__background__"] + [
            str(self.coco.cats[c].get("name", f"class_{c}")) for c in self.cat_ids
        ]
        # the name of each label 0..num_classes ("N/A" for a label between two category ids, as
        # torchvision names its unused COCO outputs)
        self.label_names: list[str] = ["__background__"] + [
            str(self.coco.cats[self.label_to_cat[i]].get("name", f"class_{self.label_to_cat[i]}"))
            if i in self.label_to_cat else "N/A"
            for i in range(1, self.num_classes + 1)
        ]
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        self._prepare_targets()

    # ------------------------------------------------------------------ loading
    def _fill_sizes(self, data: dict) -> int:
        """Read ``width``/``height`` from the image header of each image entry lacking them;
        returns how many were filled. A missing or unreadable image is a DataError naming it."""
        todo = [im for im in data["images"] if "width" not in im or "height" not in im]
        if not todo:
            return 0
        sizes = read_image_sizes([self.images_dir / im["file_name"] for im in todo])
        for im, got in zip(todo, sizes):
            path = self.images_dir / im["file_name"]
            if isinstance(got, str):
                what = "image file not found" if got == "not found" else got
                raise DataError(
                    f"{path}: {what}, and {self.source} gives no width/height for it (image id {im['id']})"
                )
            for key, v in zip(("width", "height"), got):
                if key in im and im[key] != v:
                    raise DataError(
                        f"{path}: image is {got[0]}x{got[1]} but {self.source} says {key} {im[key]} (image id {im['id']})"
                    )
                im[key] = int(v)
        logger.info("%s: width/height of %d images read from the image files", self.source, len(todo))
        return len(todo)

    def _prepare_targets(self) -> None:
        """Clip boxes, drop degenerate ones, count, and keep per-image arrays."""
        stats = {
            "images": len(self.ids),
            "annotations": len(self.coco.dataset["annotations"]),
            "crowd": 0,
            "clipped": 0,
            "dropped": 0,
            "empty_images": 0,
            "mask_from_box": 0,
        }
        self._per_image: dict[int, dict[str, np.ndarray]] = {}
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            w, h = float(info["width"]), float(info["height"])
            anns = self.coco.imgToAnns.get(img_id, [])
            boxes, labels, areas, crowd, ann_ids = [], [], [], [], []
            for a in anns:
                x, y, bw, bh = (float(v) for v in a["bbox"])
                x1, y1, x2, y2 = x, y, x + bw, y + bh
                cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
                cx2, cy2 = min(max(x2, 0.0), w), min(max(y2, 0.0), h)
                is_crowd = int(bool(a.get("iscrowd", 0)))
                stats["crowd"] += is_crowd
                if cx2 - cx1 <= MIN_BOX_SIZE or cy2 - cy1 <= MIN_BOX_SIZE:
                    stats["dropped"] += 1
                    continue
                if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                    stats["clipped"] += 1
                boxes.append((cx1, cy1, cx2, cy2))
                labels.append(self.cat_to_label[a["category_id"]])
                areas.append(float(a["area"]))
                crowd.append(is_crowd)
                ann_ids.append(a["id"])
            arr = {
                "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, dtype=np.int64),
                "area": np.asarray(areas, dtype=np.float32),
                "iscrowd": np.asarray(crowd, dtype=np.int64),
                "ann_ids": np.asarray(ann_ids, dtype=np.int64),
            }
            if not (arr["iscrowd"] == 0).any():
                stats["empty_images"] += 1
            self._per_image[img_id] = arr
        self.stats = stats
        logger.info(
            "%s: %d images, %d annotations (%d crowd), %d boxes clipped to the image, "
            "%d degenerate boxes dropped, %d images without boxes",
            self.source,
            stats["images"],
            stats["annotations"],
            stats["crowd"],
            stats["clipped"],
            stats["dropped"],
            stats["empty_images"],
        )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.ids)

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        """Image size from the JSON, without opening the image (for aspect-ratio grouping)."""
        info = self.coco.imgs[self.ids[idx]]
        return int(info["height"]), int(info["width"])

    def image_path(self, idx: int) -> Path:
        """Path of the ``idx``-th image."""
        return self.images_dir / self.coco.imgs[self.ids[idx]]["file_name"]

    def _load_image(self, idx: int) -> Image.Image:
        img_id = self.ids[idx]
        info = self.coco.imgs[img_id]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                im.load()
                image = im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found (image id {img_id} in {self.source})") from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(
                f"{path}: unreadable or truncated image ({_one_line(e)}) (image id {img_id} in {self.source})"
            ) from None
        if image.size != (info["width"], info["height"]):
            raise DataError(
                f"{path}: image is {image.width}x{image.height} but {self.source} says "
                f"{info['width']}x{info['height']} (image id {img_id})"
            )
        return image

    def _mask(self, ann_id: int, box: np.ndarray, h: int, w: int) -> np.ndarray:
        ann = self.coco.anns[int(ann_id)]
        seg = _usable_segmentation(ann.get("segmentation"))
        if seg is None:
            self.stats["mask_from_box"] += 1  # counted in the process that reads the item
            m = np.zeros((h, w), dtype=np.uint8)
            x1, y1 = int(math.floor(box[0])), int(math.floor(box[1]))
            x2, y2 = int(math.ceil(box[2])), int(math.ceil(box[3]))
            m[y1:y2, x1:x2] = 1
            return m
        problem = segmentation_problem(seg, h, w)
        if problem is not None:
            raise DataError(f"{self.source}: annotation id {ann_id} has an unusable segmentation ({problem})")
        try:
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = dict(seg)
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
            with warnings.catch_warnings():  # pycocotools 2.0.x + numpy 2 warns on every decode
                warnings.simplefilter("ignore", DeprecationWarning)
                m = mask_utils.decode(rle)
        except Exception as e:  # pycocotools raises assorted types on bad RLE
            raise DataError(
                f"{self.source}: annotation id {ann_id} has an unusable segmentation ({_one_line(e)})"
            ) from None
        if m.shape != (h, w):
            raise DataError(
                f"{self.source}: annotation id {ann_id} segmentation size {list(m.shape)} differs from image {h}x{w}"
            )
        return m.astype(np.uint8)

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, torch.Tensor]]:
        img_id = self.ids[idx]
        image = self._load_image(idx)
        arr = self._per_image[img_id]
        keep = arr["iscrowd"] == 0 if self.train else np.ones(len(arr["iscrowd"]), dtype=bool)
        target: dict[str, torch.Tensor] = {
            "boxes": torch.from_numpy(arr["boxes"][keep].copy()).reshape(-1, 4),
            "labels": torch.from_numpy(arr["labels"][keep].copy()),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "area": torch.from_numpy(arr["area"][keep].copy()),
            "iscrowd": torch.from_numpy(arr["iscrowd"][keep].copy()),
        }
        if self.with_masks:
            h, w = image.height, image.width
            ann_ids = arr["ann_ids"][keep]
            boxes = arr["boxes"][keep]
            if len(ann_ids):
                masks = np.stack([self._mask(a, b, h, w) for a, b in zip(ann_ids, boxes)])
            else:
                masks = np.zeros((0, h, w), dtype=np.uint8)
            target["masks"] = torch.from_numpy(masks)
        return self.transforms(image, target)

    def gt_dict(self) -> dict:
        """The (validated, possibly filled-in) COCO dict the data set was built from."""
        return self.coco.dataset

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, images={len(self)}, "
            f"classes={self.num_classes}, train={self.train}, with_masks={self.with_masks})"
        )


def base_dataset(dataset: Any) -> tuple[CocoDetection, list[int] | None]:
    """Unwrap ``torch.utils.data.Subset`` layers: ``(coco_dataset, image_ids_or_None)``."""
    indices: list[int] | None = None
    ds = dataset
    while isinstance(ds, torch.utils.data.Subset):
        idx = [int(i) for i in ds.indices]
        indices = idx if indices is None else [idx[i] for i in indices]
        ds = ds.dataset
    if not isinstance(ds, CocoDetection):
        raise DataError(f"data set {type(ds).__name__} is not COCO-backed; cannot derive its ground truth")
    ids = None if indices is None else [ds.ids[i] for i in indices]
    return ds, ids
