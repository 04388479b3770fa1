"""``show="found"``: each ground-truth object marked found / missed / found-where-the-first-model-
misses, counted right on hand-made cases (COCO's one-to-one matching at IoU 0.5, class and score
threshold respected), drawn in its colour with no false positives drawn, and written by
draw_detections with a real tiny detector."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hmkd.config import ModelConfig
from hmkd.models.specs import as_model
from hmkd.errors import ConfigError
from hmkd.viz.detections import draw_detections, draw_panels
from hmkd.viz.found import FOUND_COLOUR, MISSED_COLOUR, NEW_COLOUR, TRUTH_COLOUR, match_to_truth
from hmkd.viz.panels import title_height

# four objects: 0 and 1 small (10 x 10), 2 large (40 x 40), 3 small of class 2
TRUTH = {
    "boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0], [30.0, 10.0, 40.0, 20.0], [10.0, 40.0, 50.0, 80.0],
                           [60.0, 60.0, 70.0, 70.0]]),
    "labels": torch.tensor([1, 1, 1, 2]),
}


def dets(*rows):
    """(x1, y1, x2, y2, score, label) rows -> a detections dict."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": t[:, :4], "scores": t[:, 4], "labels": t[:, 5].long()}


def test_match_is_one_to_one_by_class_iou_and_score():
    d = dets(
        (10, 10, 20, 21, 0.9, 1),   # object 0 (IoU 0.91)
        (10, 10, 20, 20, 0.8, 1),   # object 0 again: already taken, and 1 does not overlap -> finds nothing
        (30, 10, 40, 20, 0.7, 2),   # exactly on object 1, wrong class
        (12, 42, 50, 80, 0.6, 1),   # object 2 (IoU 0.90)
        (60, 60, 70, 70, 0.2, 2),   # object 3, below the threshold
    )
    assert match_to_truth(d, TRUTH, score_thresh=0.3).tolist() == [0, -1, 3, -1]
    assert match_to_truth(d, TRUTH, score_thresh=0.0).tolist() == [0, -1, 3, 4]
    # IoU just under 0.5 does not find (10x10 object, box shifted by 4 px: IoU 60/140 = 0.43)
    assert match_to_truth(dets((14, 10, 24, 20, 0.9, 1)), TRUTH).tolist() == [-1, -1, -1, -1]
    # the more confident detection takes the object; crowd objects are never found
    crowd = {**TRUTH, "iscrowd": torch.tensor([True, False, False, False])}
    assert match_to_truth(dets((10, 10, 20, 20, 0.9, 1)), crowd).tolist() == [-1, -1, -1, -1]
    assert match_to_truth(dets(), TRUTH).tolist() == [-1, -1, -1, -1]


def test_found_panels_count_and_colour_each_object():
    w = h = 100
    img = Image.new("RGB", (w, h), (90, 90, 90))
    plain = dets((10, 10, 20, 20, 0.9, 1), (80, 80, 95, 95, 0.9, 1), (60, 60, 70, 70, 0.1, 2))
    hmkd = dets((10, 10, 20, 20, 0.9, 1), (30, 10, 40, 20, 0.5, 1), (60, 60, 70, 70, 0.4, 2), (0, 85, 10, 95, 0.8, 3))
    pic = draw_panels(img, [("ground truth", TRUTH), ("plain", plain), ("hmkd", hmkd)], score_thresh=0.3,
                      small_area=32 * 32, show="found")
    gt, p, k = pic.info["found"]
    assert gt is None
    assert p == {"found": 1, "objects": 4, "found_small": 1, "small": 3, "other": 1}
    assert k == {"found": 3, "objects": 4, "found_small": 3, "small": 3, "other": 1, "gained": 2, "lost": 0,
                 "versus": "plain"}
    bar = pic.info["title_height"]
    assert pic.size == (3 * w + 2 * 4, h + bar + pic.info["legend_height"])
    px = pic.load()
    x1 = w + 4
    x2 = 2 * (w + 4)
    assert px[10, bar + 15] == TRUTH_COLOUR  # ground-truth panel: every object in white
    assert px[x1 + 10, bar + 15] == FOUND_COLOUR  # plain finds object 0
    assert px[x1 + 30, bar + 15] == MISSED_COLOUR  # ... and misses object 1
    assert px[x1 + 80, bar + 88] == (90, 90, 90)  # its false positive is not drawn
    assert px[x2 + 10, bar + 15] == FOUND_COLOUR  # hmkd finds object 0 too
    assert px[x2 + 30, bar + 15] == NEW_COLOUR  # object 1: found by hmkd, missed by plain
    assert px[x2 + 60, bar + 65] == NEW_COLOUR  # object 3 (0.4 >= 0.3; plain's 0.1 is below)
    assert px[x2 + 10, bar + 60] == MISSED_COLOUR  # the large object 2: missed by both
    assert px[x2 + 1, bar + 90] == (90, 90, 90)  # hmkd's class-3 false positive is not drawn


def test_found_needs_ground_truth_and_a_known_mode():
    img = Image.new("RGB", (50, 50))
    with pytest.raises(ConfigError, match="ground truth"):
        draw_panels(img, [("plain", dets((1, 1, 5, 5, 0.9, 1)))], show="found")
    with pytest.raises(ConfigError, match="show must be one of all, found, got 'best'"):
        draw_panels(img, [("ground truth", TRUTH)], show="best")
    with pytest.raises(ConfigError, match="font size"):
        draw_panels(img, [("ground truth", TRUTH)], text_px=0)


def test_draw_detections_found_writes_png_and_counts(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(detector="fcos", backbone="resnet18", num_classes=3, fpn_channels=32, min_size=160,
                      max_size=160, score_thresh=0.01)
    ckpt = tmp_path / "s.pt"
    torch.save({"model": as_model(cfg).state_dict()}, ckpt)
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img)
    truth = {str(img): {**TRUTH, "iscrowd": torch.zeros(4, dtype=torch.bool)}}
    with pytest.raises(ConfigError, match="a.png has no ground truth"):
        draw_detections([("s", (cfg, str(ckpt)))], [str(img)], tmp_path / "x", show="found")
    paths = draw_detections([("s", (cfg, str(ckpt))), ("t", (cfg, str(ckpt)))], [str(img)], tmp_path / "out",
                            score_thresh=0.0, ground_truth=truth, show="found", upscale=2, text_px=20)
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.width == 3 * 320 + 2 * 4 and im.height > 240 + title_height(320, text_px=20)
    rec = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert rec["show"] == "found"
    s, t = rec["images"][str(img)]["s"], rec["images"][str(img)]["t"]
    assert len(s["found"]) == 4 and all(-1 <= i < len(s["scores"]) for i in s["found"])
    assert s["counts"]["found"] == sum(i >= 0 for i in s["found"])
    assert s["counts"]["other"] == len(s["scores"]) - s["counts"]["found"]
    assert t["counts"]["gained"] == t["counts"]["lost"] == 0  # the same checkpoint finds the same objects


def test_cli_show_found(tmp_path, monkeypatch, capsys):
    """``hmkd viz detections --show found`` on a tiny synthetic set: one PNG per image, the counts in
    detections.json; with --no-gt it is a one-line error."""
    import yaml

    from hmkd.cli import main
    from hmkd.config import Config, from_dict

    monkeypatch.chdir(tmp_path)
    raw = {"name": "t", "device": "cpu",
           "data": {"kind": "synthetic", "root": "data", "synth": {"n_train": 2, "n_val": 2, "size": 160, "seed": 0}},
           "model": {"detector": "fcos", "backbone": "resnet18", "num_classes": 6, "fpn_channels": 32,
                     "min_size": 160, "max_size": 160, "score_thresh": 0.01}}
    with open("c.yaml", "w") as f:
        yaml.safe_dump(raw, f)
    torch.manual_seed(0)
    torch.save(as_model(from_dict(Config, raw).model).state_dict(), "s.pth")
    base = ["viz", "detections", "c.yaml", "--weights", "plain=s.pth", "hmkd=s.pth", "--images", "0", "1",
            "--score-thresh", "0.0", "--out", "viz"]
    assert main([*base, "--no-gt", "--show", "found"]) == 2
    assert capsys.readouterr().err.strip() == ("hmkd: error: --show found marks the ground-truth objects as found "
                                               "or missed: leave out --no-gt")
    assert main([*base, "--show", "found", "--font-size", "16"]) == 0
    rec = json.loads((tmp_path / "viz" / "detections.json").read_text())
    assert rec["show"] == "found" and len(rec["images"]) == 2
    for per_model in rec["images"].values():
        assert per_model["hmkd"]["counts"]["versus"] == "plain"
        assert per_model["plain"]["counts"]["found"] == sum(i >= 0 for i in per_model["plain"]["found"])
    assert sorted(p.name for p in (tmp_path / "viz").glob("*.png")) == sorted(
        os.path.basename(p) for p in capsys.readouterr().out.split())
