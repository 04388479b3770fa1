"""Detection pictures and Grad-CAM heat maps on tiny random detectors: real PNGs of the expected size,
class names, the ground-truth panel, sizes that follow the image, tags that do not cover each other,
the heat map's colour scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hmkd.config import Config, ModelConfig
from hmkd.data.image_files import load_image
from hmkd.errors import ConfigError
from hmkd.models.specs import as_model, specs_from_config
from hmkd.viz.detections import class_colour, draw_detections, draw_panels, place_tags
from hmkd.viz.panels import SMALL_COLOUR, header_lines, title_height
from hmkd.viz.panels import font_size as _font_size
from hmkd.viz.panels import load_font as _font
from hmkd.viz.panels import scratch_draw as _scratch_draw
from hmkd.viz.panels import text_size as _text_wh
from hmkd.viz.heatmap import gradcam, gradcam_heatmaps


def tiny(detector: str = "fcos", **kw) -> ModelConfig:
    # 160 px: with 32 FPN channels, GroupNorm(32) in the FCOS/RetinaNet head needs P7 larger than 1x1
    base = dict(
        detector=detector, backbone="resnet18", num_classes=3, fpn_channels=32, min_size=160, max_size=160,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, score_thresh=0.01,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    a = d / "a.png"
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(a)
    sub = d / "sub"
    sub.mkdir()
    b = sub / "a.jpg"  # same stem, other size and format
    Image.fromarray(rng.integers(0, 255, (120, 170, 3), dtype=np.uint8)).save(b)
    return [str(a), str(b)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(1)
    model = as_model(tiny())
    path = tmp_path_factory.mktemp("ckpt") / "distilled.pt"
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    return str(path)


def test_draw_panels_injected_detections():
    w, h = 200, 150
    img = Image.new("RGB", (w, h), (0, 0, 0))
    big = {"boxes": torch.tensor([[20.0, 30.0, 120.0, 100.0], [5.0, 5.0, 60.0, 60.0]]),
           "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2])}
    small = {"boxes": torch.tensor([[150.0, 40.0, 160.0, 50.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([2])}
    pic = draw_panels(img, [("teacher", big), ("student", small)], score_thresh=0.3, small_area=32 * 32)
    bar = title_height(w)
    assert pic.size[0] == 2 * w + 4 and pic.size[1] > h + bar  # a legend under the panels
    px = pic.load()
    assert px[20, bar + 65] == class_colour(1)  # left edge of the large box, class colour
    assert px[5, bar + 50] == (0, 0, 0)  # score 0.1 < 0.3: not drawn
    x0 = w + 4
    assert px[x0 + 148, bar + 45] == SMALL_COLOUR  # red outer outline of the small box
    assert px[x0 + 150, bar + 45] == class_colour(2)  # class-coloured box inside it


def test_draw_panels_upscale_keeps_small_in_image_pixels():
    img = Image.new("RGB", (64, 48), (0, 0, 0))
    det = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}
    pic = draw_panels(img, [("student", det)], score_thresh=0.3, small_area=32 * 32, upscale=4)
    w = 64 * 4
    assert pic.size[0] == w
    bar = title_height(w)
    px = pic.load()
    # the 20 px box (small in the image's pixels, 80 px on the picture) keeps its red outline, at 4x
    assert px[38, bar + 80] == SMALL_COLOUR and px[40, bar + 80] == class_colour(1)
    with pytest.raises(ConfigError, match="upscale"):
        draw_panels(img, [("student", det)], upscale=2.5)


def test_draw_detections_end_to_end(images, ckpt, tmp_path):
    cfg = tiny()
    out = draw_detections([("student", cfg), ("distilled", (cfg, ckpt))], images, tmp_path, score_thresh=0.0)
    assert [p.rsplit("/", 1)[-1] for p in out] == ["a.png", "a_2.png"]
    for path, src in zip(out, images):
        w, h = Image.open(src).size
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] == 2 * w + 4 and im.size[1] > h + title_height(w)
            # under the title bar, the panels differ from the source: boxes were drawn
            arr = np.asarray(im.convert("RGB"))
            assert (arr[title_height(w):, :w] != 255).any()
    rec = json.loads((tmp_path / "detections.json").read_text())
    dets = rec["images"][images[0]]
    assert set(dets) == {"student", "distilled"} and len(dets["student"]["boxes"]) > 0
    assert min(dets["student"]["labels"]) >= 1


def test_draw_detections_upscale(images, ckpt, tmp_path):
    cfg = tiny()
    plain = draw_detections([("s", (cfg, ckpt))], images[:1], tmp_path / "x1", score_thresh=0.0)
    big = draw_detections([("s", (cfg, ckpt))], images[:1], tmp_path / "x3", score_thresh=0.0, upscale=3)
    w, h = Image.open(images[0]).size
    with Image.open(plain[0]) as p1, Image.open(big[0]) as p3:
        assert p1.size[0] == w and p3.size[0] == 3 * w and p3.size[1] > 3 * h
    # detections.json keeps the boxes in the image's own pixels
    rec1, rec3 = (json.loads((tmp_path / d / "detections.json").read_text()) for d in ("x1", "x3"))
    assert rec1["images"] == rec3["images"]
    with pytest.raises(ConfigError, match="upscale"):
        draw_detections([("s", (cfg, ckpt))], images[:1], tmp_path / "x0", upscale=0)


def test_specs_from_config_and_num_classes(ckpt):
    cfg = Config(model=tiny(num_classes=None), teacher=tiny(backbone="resnet34", num_classes=None))
    specs = dict(specs_from_config(cfg, [("teacher", None), ("hmkd", ckpt)]))
    assert specs["teacher"][0].backbone == "resnet34" and specs["hmkd"][0].backbone == "resnet18"
    model = as_model(specs["hmkd"])  # class count read off the checkpoint
    assert model.head.classification_head.num_classes == 4
    with pytest.raises(ConfigError, match="num_classes"):
        as_model(specs["teacher"])
    with pytest.raises(ConfigError, match="teacher"):
        specs_from_config(Config(model=tiny()), [("teacher", ckpt)])


def test_gradcam_map_and_no_side_effects(images):
    torch.manual_seed(0)
    model = as_model(tiny())
    img = load_image(images[0])
    cam, info = gradcam(model, img, "P3", topk=5)
    assert cam.shape == (150, 200) and np.isfinite(cam).all() and cam.max() > 0 and not info["zero"]
    assert len(info["scores"]) == 5 and info["grid"] == (16, 20)  # 150x200 -> 120x160, padded 128x160, /8
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training and model.score_thresh == 0.01
    _, none_small = gradcam(model, img, "P3", target="small", small_area=0.0)  # no detection that small
    assert none_small["zero"] and len(none_small["scores"]) == 0
    with pytest.raises(ConfigError, match="P3, P4, P5, P6, P7"):
        gradcam(model, img, "P2")


@pytest.mark.parametrize("detector,level", [("fcos", "P3"), ("faster_rcnn", "P2")])
def test_gradcam_heatmaps_pictures(images, tmp_path, detector, level):
    cfg = tiny(detector)
    torch.manual_seed(0)
    models = [("teacher", as_model(cfg)), ("student", as_model(cfg)), ("hmkd", as_model(cfg))]
    out = gradcam_heatmaps(models, images[:1], level, tmp_path, topk=5, target="topk")
    assert out == [str(tmp_path / f"a_gradcam_{level}.png")]
    with Image.open(out[0]) as im:
        assert im.size[0] == 3 * 200 + 2 * 4 and im.size[1] > 150 + title_height(200)  # + the footer
        arr = np.asarray(im.convert("RGB"))[title_height(200):, :200].astype(int)
    assert arr.std() > 0


def test_names_ground_truth_panel_and_crowd():
    w, h = 200, 150
    img = Image.new("RGB", (w, h), (0, 0, 0))
    det = {"boxes": torch.tensor([[20.0, 30.0, 120.0, 100.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    truth = {"boxes": torch.tensor([[20.0, 30.0, 120.0, 100.0], [130.0, 10.0, 190.0, 60.0]]),
             "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([False, True])}
    short = draw_panels(img, [("ground truth", truth), ("m", det)], score_thresh=0.3)
    named = draw_panels(img, [("ground truth", truth), ("m", det)], score_thresh=0.3,
                        class_names=["a_rather_long_name", "other"])
    bar = short.info["title_height"]
    assert bar == title_height(w) and short.size[1] == h + bar + short.info["legend_height"]
    assert short.size[0] == 2 * w + 4  # the ground truth is a panel of its own
    px = short.load()
    assert px[20, bar + 65] == class_colour(1)  # the ground-truth box, class-coloured
    assert px[130, bar + 40] == (150, 150, 150)  # the crowd region, grey

    def tag_pixels(pic):  # the tags are filled with the class colour: longer names, larger tags
        arr = np.asarray(pic)[bar:bar + h]
        return int((arr == np.array(class_colour(1))).all(-1).sum())

    assert tag_pixels(named) > tag_pixels(short) + 200


def test_sizes_follow_the_image():
    assert _font_size(160) == 10 and _font_size(1280) > 2.5 * _font_size(160)
    assert title_height(1280) > 1.8 * title_height(160)
    info = "100 dets >= 0.05, 93 small, 72 tags hidden"
    lines = header_lines(160, "a long model name, cut to one line", info)
    draw = _scratch_draw()
    for text, is_title in lines:  # every line fits the panel: wrapped, not cut off
        assert _text_wh(draw, text, _font(_font_size(160) if is_title else 9))[0] <= 160 - 6
    assert " ".join(t for t, is_title in lines if not is_title) == info and len(lines) >= 3
    big = draw_panels(Image.new("RGB", (1280, 1280)), [("m", {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                              "labels": torch.zeros(0, dtype=torch.int64)})])
    small = draw_panels(Image.new("RGB", (160, 160)), [("m", {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                             "labels": torch.zeros(0, dtype=torch.int64)})])
    assert big.info["title_height"] > 1.8 * small.info["title_height"]


def test_stacked_boxes_get_tags_that_do_not_overlap():
    boxes = [[50.0 + k, 60.0 + k, 80.0 + k, 90.0 + k] for k in range(12)]  # 12 boxes on top of each other
    spots = place_tags(boxes, [(40, 10)] * 12, (0, 0, 200, 150))
    rects = [(x, y, x + 40, y + 10) for x, y, _ in (s for s in spots if s is not None)]
    assert len(rects) >= 6
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 200 and 0 <= a[1] and a[3] <= 150
        for b in rects[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)
    # the budget: tags never cover more than max_cover of the panel
    assert sum(s is not None for s in place_tags(boxes, [(40, 10)] * 12, (0, 0, 200, 150), max_cover=0.05)) == 3
    # in a picture, the tags that found no spot are counted in the title
    det = {"boxes": torch.tensor(boxes), "scores": torch.linspace(0.9, 0.5, 12), "labels": torch.ones(12, dtype=torch.int64)}
    hidden = sum(s is None for s in place_tags(boxes, [(38, 11)] * 12, (0, 0, 200, 150)))
    assert hidden > 0
    pic = draw_panels(Image.new("RGB", (200, 150)), [("m", det)], score_thresh=0.3)
    assert pic.size[0] == 200


def test_gradcam_colour_scale_shared_or_per_panel(images, tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    models = [("a", as_model(cfg)), ("b", as_model(cfg))]
    for scale in ("panel", "shared"):
        out = gradcam_heatmaps(models, images[:1], "P3", tmp_path / scale, topk=5, normalize=scale)
        rec = json.loads((tmp_path / scale / "gradcam_P3.json").read_text())["images"][images[0]]
        maxima = {k: v["max"] for k, v in rec.items()}
        assert maxima["a"] != maxima["b"] and min(maxima.values()) > 0
        for k, v in rec.items():
            assert v["scale"] == (max(maxima.values()) if scale == "shared" else maxima[k])
        with Image.open(out[0]) as im:
            arr = np.asarray(im.convert("RGB")).astype(int)
        assert arr.shape[0] > 150 + title_height(200)  # a footer under the panels
        foot = arr[150 + title_height(200):]
        # the colour bar: jet's dark blue and dark red ends
        assert (np.abs(foot - np.array([0, 0, 128])).max(-1) <= 8).any()
        assert (np.abs(foot - np.array([128, 0, 0])).max(-1) <= 8).any()


def test_hirescam_method(images, tmp_path):
    torch.manual_seed(0)
    model = as_model(tiny())
    img = load_image(images[0])
    cam, info = gradcam(model, img, "P3", topk=5, method="hirescam")
    assert cam.shape == (150, 200) and np.isfinite(cam).all() and cam.max() > 0 and not info["zero"]
    with pytest.raises(ConfigError, match="unknown class-activation method 'cam' .*gradcam, hirescam"):
        gradcam(model, img, "P3", method="cam")
    gradcam_heatmaps([("m", model)], images[:1], "P3", tmp_path, topk=5, method="hirescam")
    assert json.loads((tmp_path / "gradcam_P3.json").read_text())["method"] == "hirescam"
