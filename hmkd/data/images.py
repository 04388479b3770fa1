"""Image files' sizes from their headers (nothing decoded): what :mod:`hmkd.data.coco` fills a
missing ``width``/``height`` from and what the pre-flight check (:mod:`hmkd.data.check`) compares
with the annotation file."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["read_image_size", "read_image_sizes"]


def read_image_size(path: str | os.PathLike) -> tuple[int, int] | str:
    """``(width, height)`` from the image's header (nothing decoded), or why it cannot be read:
    ``"not found"`` or ``"unreadable (...)"``."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return "not found"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"unreadable ({' '.join(str(e).split())})"


def read_image_sizes(paths: list[Path], workers: int | None = None) -> list[tuple[int, int] | str]:
    """:func:`read_image_size` of every path, in order; a thread pool for more than a few images
    (opening files is I/O bound, and a network file system rewards many requests in flight)."""
    if len(paths) <= 16:
        return [read_image_size(p) for p in paths]
    n = workers or min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="hmkd-check") as pool:
        return list(pool.map(read_image_size, paths, chunksize=64))
