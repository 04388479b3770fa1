"""The one class-count rule (hmkd.data.at_hand.class_count): the config's count, else the data
set's (a category-id data set lets a checkpoint with more classes keep its count), else the
checkpoint's, else None; training checks the config's count against the data set with the message
of hmkd.data.at_hand.resolve_num_classes. Tested on the tiny COCO-format set (category ids 5, 2, 9)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from hmkd.config import Config, ModelConfig
from hmkd.data.at_hand import resolve_num_classes
from hmkd.data import build_dataset
from hmkd.data.at_hand import class_count, fill_class_count
from hmkd.errors import ConfigError


def tiny(coco_dir, label_map: str = "contiguous"):
    img_dir, ann, _ = coco_dir
    return build_dataset("coco", train=False, root=str(ann.parent), ann_file=ann.name, images_dir=img_dir.name,
                         hflip=False, label_map=label_map)


def with_classes(n: int | None, teacher: int | None | str = "none") -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_classes=n)
    if teacher != "none":
        cfg.teacher = ModelConfig(num_classes=teacher)
    return cfg


def test_the_config_count_comes_first(coco_dir):
    ds = tiny(coco_dir)
    assert ds.num_classes == 3
    assert class_count(with_classes(7), ds, checkpoint=90) == 7  # commands: no check against the data set
    assert class_count(with_classes(3), ds, check=True) == 3 == resolve_num_classes(with_classes(3), ds)
    with pytest.raises(ConfigError) as e:
        class_count(with_classes(7), ds, check=True)  # training: the data set must agree
    with pytest.raises(ConfigError) as same:
        resolve_num_classes(with_classes(7), ds)
    assert str(e.value) == str(same.value) == "model.num_classes is 7 but the data set has 3 classes"


def test_then_the_data_set_then_the_checkpoint(coco_dir, caplog):
    contiguous, by_id = tiny(coco_dir), tiny(coco_dir, "category_id")
    assert (contiguous.num_classes, by_id.num_classes) == (3, 9)
    cfg = with_classes(None)
    assert class_count(cfg, contiguous) == 3
    assert class_count(cfg, contiguous, checkpoint=90) == 3  # contiguous labels: the data set's count
    assert class_count(cfg, by_id, checkpoint=5) == 9
    with caplog.at_level(logging.INFO, logger="hmkd.data.at_hand"):
        assert class_count(cfg, by_id, checkpoint=90) == 90  # labels are ids: COCO's 90 outputs on a part of COCO
    assert "the checkpoint has 90 classes, the data set's category ids go up to 9" in caplog.text
    assert class_count(cfg, by_id, checkpoint=90, check=True) == 90
    assert class_count(cfg, None, checkpoint=4) == 4
    assert class_count(cfg) is None


def test_fill_keeps_what_the_config_sets():
    cfg = with_classes(None, teacher=None)
    fill_class_count(cfg, 3)
    assert (cfg.model.num_classes, cfg.teacher.num_classes) == (3, 3)
    cfg = with_classes(None, teacher=90)
    fill_class_count(cfg, 3)
    assert (cfg.model.num_classes, cfg.teacher.num_classes) == (3, 90)
    cfg = with_classes(5)
    fill_class_count(cfg, None)
    assert (cfg.model.num_classes, cfg.teacher) == (5, None)
