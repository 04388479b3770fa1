"""Image files: reading one (:func:`load_image`), finding a data set's validation images by index
or file name (:func:`resolve_images`), and naming the pictures drawn of them (:func:`unique_stems`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hmkd.errors import ConfigError

__all__ = ["load_image", "resolve_images", "unique_stems"]


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


def resolve_images(dataset: Any, values: Sequence[int | str]) -> list[int]:
    """Indices into ``dataset`` (a :class:`~hmkd.data.CocoDetection`) of ``values``: validation-set
    indices (``0 .. len - 1``, ints or digit strings) or image file names of its annotations (the
    ``file_name`` itself, or a path whose base name is one file name's base name).

    Raises:
        ConfigError: a value that is neither, naming it and the annotations.
    """
    if not values:
        raise ConfigError("viz attention: no images given")
    names = {int(i): str(dataset.coco.imgs[img_id]["file_name"]) for i, img_id in enumerate(dataset.ids)}
    by_name: dict[str, list[int]] = {}
    by_base: dict[str, list[int]] = {}
    for i, name in names.items():
        by_name.setdefault(name, []).append(i)
        by_base.setdefault(os.path.basename(name), []).append(i)
    out = []
    for v in values:
        text = str(v).strip()
        if isinstance(v, int) or text.isdigit():
            idx = int(text)
            if 0 <= idx < len(names):
                out.append(idx)
                continue
            if text not in by_name and os.path.basename(text) not in by_base:
                raise ConfigError(f"--images {v}: no validation image {idx} (the set has {len(names)}: 0 .. {len(names) - 1})")
        hits = by_name.get(text) or by_base.get(os.path.basename(text), [])
        if len(hits) == 1:
            out.append(hits[0])
        elif len(hits) > 1:
            raise ConfigError(f"--images {v}: {len(hits)} validation images have that file name "
                              f"({', '.join(names[i] for i in hits[:3])}); give the index instead")
        else:
            source = getattr(dataset, "source", "the validation annotations")
            raise ConfigError(f"--images {v}: neither a validation index (0 .. {len(names) - 1}) nor a file name in {source}")
    return out


def unique_stems(images: Sequence[str | os.PathLike]) -> list[str]:
    """File stems of ``images``, made unique with ``_2``, ``_3`` ... where two share one."""
    seen: dict[str, int] = {}
    out = []
    for p in images:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out
