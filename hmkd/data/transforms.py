"""Detection transforms that move an image and its target together.

Every transform is a callable ``(image, target) -> (image, target)``. The image is a PIL image
before :class:`ToTensor` and a float tensor ``[3, H, W]`` in ``[0, 1]`` after it; ``target`` follows
the torchvision detection convention (``boxes`` xyxy float32 pixels, ``labels``, ``masks`` uint8
``[N, H, W]`` when present, plus ``image_id``/``area``/``iscrowd`` which geometric transforms
leave alone: ``area`` stays the COCO area in the original image, as in torchvision's references).

Geometric transforms use ``torchvision.transforms.v2.functional`` for the pixels and exact
arithmetic for boxes: a horizontal flip maps ``[x1, y1, x2, y2]`` to ``[W - x2, y1, W - x1, y2]``;
a resize multiplies x by ``W'/W`` and y by ``H'/H``. Masks use nearest-neighbour resizing, so they
stay binary. Randomness comes from ``torch``'s generator, so DataLoader workers differ and
``torch.manual_seed`` makes a run repeatable.

Note on sizes: torchvision detectors resize their inputs themselves (``GeneralizedRCNNTransform``
``min_size``/``max_size``) and return boxes in the coordinates of the image they were given, so
evaluation transforms only convert to a tensor; :class:`RandomResize` is a training-time
multi-scale augmentation on top of that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]

__all__ = [
    "Compose",
    "ToTensor",
    "RandomHorizontalFlip",
    "RandomResize",
    "build_transforms",
    "collate_fn",
    "resize_target",
    "hflip_target",
]


class Compose:
    """Apply transforms one after another to ``(image, target)``."""

    def __init__(self, transforms: Sequence[Callable[[Any, Target], tuple[Any, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToTensor:
    """PIL image (any mode) → float32 tensor ``[3, H, W]`` in ``[0, 1]``; tensors pass through."""

    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                image = image.convert("RGB")
            image = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        elif isinstance(image, torch.Tensor):
            if not image.is_floating_point():
                image = F.to_dtype(image, torch.float32, scale=True)
        else:
            raise TypeError(f"ToTensor expects a PIL image or a tensor, got {type(image).__name__}")
        return image, target

    def __repr__(self) -> str:
        return "ToTensor()"


def _image_size(image: Any) -> tuple[int, int]:
    """Return ``(height, width)`` of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def hflip_target(target: Target, width: int) -> Target:
    """Return a copy of ``target`` mirrored left-right in an image of the given width."""
    out = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        flipped = b.clone()
        flipped[:, 0] = width - b[:, 2]
        flipped[:, 2] = width - b[:, 0]
        out["boxes"] = flipped
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return out


def resize_target(target: Target, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Target:
    """Return a copy of ``target`` rescaled from image size ``old_hw`` to ``new_hw`` (both (H, W))."""
    out = dict(target)
    (oh, ow), (nh, nw) = old_hw, new_hw
    if "boxes" in target:
        scale = torch.tensor([nw / ow, nh / oh, nw / ow, nh / oh], dtype=target["boxes"].dtype)
        out["boxes"] = target["boxes"] * scale
    if "masks" in target:
        m = target["masks"]
        if m.shape[0] == 0:
            out["masks"] = m.new_zeros((0, nh, nw))
        else:
            out["masks"] = F.resize(m, [nh, nw], interpolation=InterpolationMode.NEAREST, antialias=False)
    return out


class RandomHorizontalFlip:
    """Mirror image, boxes and masks left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if self.p > 0 and (self.p >= 1 or torch.rand(1).item() < self.p):
            _, w = _image_size(image)
            image = F.horizontal_flip(image)
            target = hflip_target(target, w)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def shortest_side_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Size ``(H', W')`` with the shorter side ``short`` and the longer at most ``max_size``."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class RandomResize:
    """Multi-scale resize: the shorter side becomes a size drawn uniformly from ``min_sizes``,
    the longer side is capped at ``max_size``; boxes and masks follow."""

    def __init__(self, min_sizes: Sequence[int], max_size: int = 1333) -> None:
        sizes = [int(s) for s in min_sizes]
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"RandomResize: min_sizes must be positive integers, got {list(min_sizes)}")
        if max_size <= 0:
            raise ValueError(f"RandomResize: max_size must be positive, got {max_size}")
        self.min_sizes = sizes
        self.max_size = int(max_size)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        short = self.min_sizes[int(torch.randint(len(self.min_sizes), (1,)).item())]
        h, w = _image_size(image)
        nh, nw = shortest_side_size(h, w, short, self.max_size)
        if (nh, nw) == (h, w):
            return image, target
        image = F.resize(image, [nh, nw], antialias=True)
        return image, resize_target(target, (h, w), (nh, nw))

    def __repr__(self) -> str:
        return f"RandomResize(min_sizes={self.min_sizes}, max_size={self.max_size})"


def build_transforms(
    train: bool, hflip: bool = True, scales: list[int] | None = None, max_size: int = 1333
) -> Compose:
    """Standard pipeline: ``ToTensor`` then, when training, ``RandomResize(scales, max_size)``
    (only if ``scales`` is given) and ``RandomHorizontalFlip(0.5)`` (if ``hflip``).

    Evaluation only converts to a tensor: the detector resizes internally and must return boxes
    in the original image's coordinates for COCO evaluation.
    """
    ts: list[Callable[[Any, Target], tuple[Any, Target]]] = [ToTensor()]
    if train:
        if scales:
            ts.append(RandomResize(scales, max_size))
        if hflip:
            ts.append(RandomHorizontalFlip(0.5))
    return Compose(ts)


def collate_fn(batch: Sequence[tuple[Any, Target]]) -> tuple[list[Any], list[Target]]:
    """Collate ``(image, target)`` pairs into ``(list_of_images, list_of_targets)``."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets
