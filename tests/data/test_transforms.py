"""Transforms move image, boxes and masks together, with exact coordinates."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hmkd.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    RandomResize,
    ToTensor,
    build_transforms,
    collate_fn,
)


def _sample(h: int = 8, w: int = 10):
    img = torch.zeros(3, h, w)
    img[0, 2:6, 1:4] = 1.0  # the object's pixels: x 1..3, y 2..5
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 2:6, 1:4] = 1
    target = {
        "boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]),
        "labels": torch.tensor([3]),
        "image_id": torch.tensor(7),
        "area": torch.tensor([12.0]),
        "iscrowd": torch.tensor([0]),
        "masks": masks,
    }
    return img, target


def _mask_box(m: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_hflip_exact_boxes_masks_and_pixels():
    img, t = _sample()
    out_img, out = RandomHorizontalFlip(p=1.0)(img, t)
    assert out["boxes"].tolist() == [[6.0, 2.0, 9.0, 6.0]]  # [W - x2, y1, W - x1, y2] with W = 10
    assert _mask_box(out["masks"][0]) == [6.0, 2.0, 9.0, 6.0]
    assert _mask_box(out_img[0] > 0) == [6.0, 2.0, 9.0, 6.0]
    assert torch.equal(out_img, img.flip(-1)) and torch.equal(out["masks"], t["masks"].flip(-1))
    assert out["labels"] is t["labels"] and out["area"] is t["area"]
    # p = 0 leaves everything alone; flipping twice restores the input
    same_img, same = RandomHorizontalFlip(p=0.0)(img, t)
    assert same_img is img and same is t
    back_img, back = RandomHorizontalFlip(p=1.0)(out_img, out)
    assert torch.equal(back["boxes"], t["boxes"]) and torch.equal(back_img, img)


def test_resize_scales_boxes_and_masks_consistently():
    img, t = _sample(h=8, w=10)
    out_img, out = RandomResize([16], max_size=1000)(img, t)  # shorter side 8 -> 16: factor 2
    assert out_img.shape == (3, 16, 20)
    assert out["boxes"].tolist() == [[2.0, 4.0, 8.0, 12.0]]
    assert out["masks"].shape == (1, 16, 20) and out["masks"].dtype == torch.uint8
    assert _mask_box(out["masks"][0]) == [2.0, 4.0, 8.0, 12.0]
    assert set(out["masks"].unique().tolist()) == {0, 1}
    assert out["area"].tolist() == [12.0]  # COCO area of the original image


def test_resize_caps_longer_side():
    img, t = _sample(h=8, w=10)
    out_img, out = RandomResize([80], max_size=20)(img, t)  # 80/8 = 10x would make W 100 > 20
    assert out_img.shape == (3, 16, 20)
    assert out["boxes"].tolist() == [[2.0, 4.0, 8.0, 12.0]]


def test_empty_targets_survive_transforms():
    img = torch.rand(3, 8, 10)
    t = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 8, 10, dtype=torch.uint8)}
    tf = Compose([RandomResize([16], 100), RandomHorizontalFlip(1.0)])
    out_img, out = tf(img, t)
    assert out_img.shape == (3, 16, 20)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 16, 20)


def test_to_tensor_and_build_transforms():
    pil = Image.new("RGB", (5, 4), (255, 0, 128))
    img, _ = ToTensor()(pil, {})
    assert img.shape == (3, 4, 5) and img.dtype == torch.float32
    assert img[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 128 / 255])
    ev = build_transforms(train=False, scales=[16])
    assert [type(x).__name__ for x in ev.transforms] == ["ToTensor"]
    tr = build_transforms(train=True, scales=[16, 24], max_size=64)
    assert [type(x).__name__ for x in tr.transforms] == ["ToTensor", "RandomResize", "RandomHorizontalFlip"]
    assert [type(x).__name__ for x in build_transforms(train=True, hflip=False).transforms] == ["ToTensor"]


def test_random_flip_uses_torch_seed():
    img, t = _sample()
    flip = RandomHorizontalFlip(0.5)
    torch.manual_seed(0)
    a = [flip(img, t)[1]["boxes"][0, 0].item() for _ in range(20)]
    torch.manual_seed(0)
    b = [flip(img, t)[1]["boxes"][0, 0].item() for _ in range(20)]
    assert a == b and set(a) == {1.0, 6.0}


def test_collate_fn():
    batch = [(torch.zeros(3, 4, 4), {"a": 1}), (torch.zeros(3, 5, 6), {"a": 2})]
    images, targets = collate_fn(batch)
    assert isinstance(images, list) and [i.shape[-1] for i in images] == [4, 6]
    assert targets == [{"a": 1}, {"a": 2}]
