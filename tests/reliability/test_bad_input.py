"""Bad input through the library: each case is the project's own error (an ``HMKDError``) with a
one-line message naming the file, key or value, or (boxes, empty images) is handled and counted;
nothing partial is left behind that looks complete. The command-line side is test_cli_errors.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from hmkd.config import load_config
from hmkd.data import CocoDetection, VisDroneDetection, build_dataset, build_transforms, collate_fn, convert_visdrone
from hmkd.distill import build_distiller, needs_teacher
from hmkd.engine import checkpoint as ck
from hmkd.training import train
from hmkd.errors import CheckpointError, ConfigError, DataError, HMKDError
from hmkd.models import build_detector, load_weights

from reliability_helpers import TINY_MODEL, TINY_MODEL_KW, VISDRONE_ROWS, tiny_coco, write_coco, write_visdrone


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, HMKDError)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    return msg


def coco_cfg(root: Path, *extra: str):
    """A tiny training config on the COCO files written by ``write_coco(root)``."""
    return load_config(None, [
        "name=bad", "device=cpu", "seed=0", "data.kind=coco", f"data.root={root}", "data.train_ann=ann.json",
        "data.val_ann=ann.json", "data.train_images=images", "data.val_images=images", "data.batch_size=3",
        "data.eval_batch_size=3", "data.workers=0", "train.iters=2", "train.warmup_iters=0", "train.log_period=1",
        "train.ckpt_period=1", *TINY_MODEL, *extra,
    ])


def assert_nothing_complete(out: Path) -> None:
    """No file a finished (or resumable) run would leave."""
    for name in ("metrics.json", "model_final.pth", "model_best.pth", "last_checkpoint.pth", "eval"):
        assert not (out / name).exists(), f"{name} left in {out}"


@pytest.fixture()
def coco(tmp_path: Path):
    return write_coco(tmp_path)


# ---------------------------------------------------------------------------------------- images
def test_truncated_image(coco) -> None:
    img_dir, ann, _ = coco
    raw = (img_dir / "a.png").read_bytes()
    (img_dir / "a.png").write_bytes(raw[: len(raw) // 2])
    ds = CocoDetection(img_dir, ann, train=True)
    with pytest.raises(DataError) as e:
        ds[0]
    msg = one_line(e)
    assert str(img_dir / "a.png") in msg and "truncated" in msg and "image id 1" in msg


def test_unreadable_image(coco) -> None:
    img_dir, ann, _ = coco
    (img_dir / "b.png").write_bytes(b"this is not a PNG file\n" * 4)
    ds = CocoDetection(img_dir, ann, train=False)
    with pytest.raises(DataError, match="unreadable") as e:
        ds[1]
    assert str(img_dir / "b.png") in one_line(e)
    ds[0]  # the other images still load


def test_image_listed_but_missing(coco) -> None:
    img_dir, ann, _ = coco
    os.remove(img_dir / "c.png")
    ds = CocoDetection(img_dir, ann, train=True)
    with pytest.raises(DataError, match="image file not found") as e:
        ds[2]
    assert str(img_dir / "c.png") in one_line(e) and str(ann) in one_line(e)


def test_missing_image_stops_training_cleanly(tmp_path: Path) -> None:
    """Found when the batch is read; the run stops with the DataError and writes no checkpoint."""
    img_dir, _, _ = write_coco(tmp_path)
    os.remove(img_dir / "b.png")
    with pytest.raises(DataError, match="b.png: image file not found") as e:
        train(coco_cfg(tmp_path), output_dir=str(tmp_path / "out"), progress=False)
    one_line(e)
    assert_nothing_complete(tmp_path / "out")


# ------------------------------------------------------------------------------- annotation files
@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", r"not a JSON file \(.*line 1"),
        ("", "not a JSON file"),
        (b"\xff\xfe\x00\x01garbage", "cannot read annotation file"),
        ('{"images": [], "annotations": []', "not a JSON file"),  # truncated
        ("[1, 2, 3]", "top level must be a JSON object"),
    ],
    ids=["syntax", "empty", "binary", "truncated", "list"],
)
def test_annotation_file_not_json(tmp_path: Path, content, match) -> None:
    ann = tmp_path / "ann.json"
    ann.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match) as e:
        CocoDetection(tmp_path, ann, train=True)
    assert str(ann) in one_line(e)


def _without(path: tuple, data: dict | None = None) -> dict:
    data = tiny_coco() if data is None else data
    node = data
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    return data


@pytest.mark.parametrize(
    "path, match",
    [
        (("images",), "missing top-level key 'images'"),
        (("annotations",), "missing top-level key 'annotations'"),
        (("categories",), "missing top-level key 'categories'"),
        (("images", 1, "file_name"), r"images\[1\] has no 'file_name'"),
        # read from the image instead; with no image to read it from, the image is named
        (("images", 0, "height"), r"a.png: image file not found, and .*ann.json gives no width/height for it \(image id 1\)"),
        (("annotations", 2, "bbox"), r"annotations\[2\] \(id 3\) has no 'bbox'"),
        (("annotations", 0, "category_id"), r"annotations\[0\] \(id 1\) has no 'category_id'"),
        (("annotations", 1, "image_id"), r"annotations\[1\] \(id 2\) has no 'image_id'"),
        (("categories", 0, "id"), r"categories\[0\] has no 'id'"),
    ],
)
def test_annotation_file_missing_keys(tmp_path: Path, path, match) -> None:
    img_dir, ann, _ = write_coco(tmp_path, _without(path))
    with pytest.raises(DataError, match=match) as e:
        CocoDetection(img_dir, ann, train=True)
    assert str(ann) in one_line(e)


def test_annotation_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="annotation file not found") as e:
        build_dataset("coco", train=True, root=str(tmp_path), ann_file="nope.json")
    assert str(tmp_path / "nope.json") in one_line(e)


def test_wrong_types_in_annotation_file(tmp_path: Path) -> None:
    for edit, match in [
        (lambda d: d["images"][0].update(file_name=7), "file_name 7 is not a file name"),
        (lambda d: d["images"][0].update(width="96"), "invalid width '96'"),
        (lambda d: d["annotations"][0].update(image_id=[1]), r"image_id \[1\], which is not in 'images'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), "is not 4 finite numbers"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "is not 4 finite numbers"),
    ]:
        data = tiny_coco()
        edit(data)
        img_dir, ann, _ = write_coco(tmp_path, data)
        with pytest.raises(DataError, match=match) as e:
            CocoDetection(img_dir, ann, train=True)
        assert str(ann) in one_line(e)


def test_category_id_not_in_categories(tmp_path: Path) -> None:
    data = tiny_coco()
    data["annotations"][3]["category_id"] = 42
    img_dir, ann, _ = write_coco(tmp_path, data)
    with pytest.raises(DataError) as e:
        CocoDetection(img_dir, ann, train=True)
    msg = one_line(e)
    assert str(ann) in msg and "annotations[3] (id 4)" in msg and "category_id 42" in msg and "'categories'" in msg


def test_bad_segmentation_is_a_data_error_not_a_crash(tmp_path: Path) -> None:
    """Huge polygon coordinates or RLE counts that do not fit the image used to crash pycocotools."""
    for seg in (
        [[10, 10, 2.0**40, 10, 30, 26, 10, 26]],
        {"size": [96, 96], "counts": [40, 10**9]},
        {"size": [10**6, 10**6], "counts": [10**12]},
        {"size": [96, 96], "counts": "0000"},
    ):
        data = tiny_coco()
        data["annotations"][0]["segmentation"] = seg
        img_dir, ann, _ = write_coco(tmp_path, data)
        ds = CocoDetection(img_dir, ann, train=True, with_masks=True)
        with pytest.raises(DataError, match=r"annotation id 1 has an unusable segmentation") as e:
            ds[0]
        assert str(ann) in one_line(e)


# ------------------------------------------------------------------------------------------ boxes
def test_degenerate_and_outside_boxes_are_dropped_or_clipped_and_counted(tmp_path: Path, caplog) -> None:
    data = tiny_coco()
    img = {"id": 9, "file_name": "boxes.png", "width": 64, "height": 48}
    data["images"].append(img)
    boxes = {
        "zero_w": ([10, 10, 0, 5], "dropped"), "zero_h": ([10, 10, 5, 0], "dropped"),
        "neg_w": ([30, 10, -8, 5], "dropped"), "neg_h": ([30, 10, 8, -5], "dropped"),
        "right_of": ([70, 10, 5, 5], "dropped"), "above": ([10, -20, 5, 5], "dropped"),
        "left_edge": ([-4, 5, 10, 10], "clipped"), "huge": ([-1e9, -1e9, 2e9, 2e9], "clipped"),
        "bottom_right": ([60, 40, 10, 10], "clipped"), "inside": ([1, 1, 5, 5], "kept"),
    }
    for i, (bbox, _) in enumerate(boxes.values()):
        data["annotations"].append({"id": 100 + i, "image_id": 9, "category_id": 3, "bbox": bbox, "iscrowd": 0})
    img_dir, ann, _ = write_coco(tmp_path, data)
    base = CocoDetection(img_dir, write_coco(tmp_path / "base")[1], train=True).stats
    with caplog.at_level(logging.INFO, logger="hmkd.data.coco"):
        ds = CocoDetection(img_dir, ann, train=True, transforms=build_transforms(True, hflip=True))
    n_dropped = sum(v == "dropped" for _, v in boxes.values())
    n_clipped = sum(v == "clipped" for _, v in boxes.values())
    assert ds.stats["dropped"] - base["dropped"] == n_dropped
    assert ds.stats["clipped"] - base["clipped"] == n_clipped
    assert f"{ds.stats['clipped']} boxes clipped" in caplog.text and f"{ds.stats['dropped']} degenerate" in caplog.text
    image, target = ds[ds.ids.index(9)]
    b = target["boxes"]
    assert len(b) == n_clipped + 1
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 64).all() and (b[:, 3] <= 48).all()
    assert (b[:, 2:] > b[:, :2]).all()


def test_visdrone_boxes_clipped_dropped_and_counted(tmp_path: Path, caplog) -> None:
    rows = VISDRONE_ROWS + ["90,10,-5,5,1,4,0,0", "200,200,10,10,1,4,0,0", "-10,-10,30,30,1,4,0,0"]
    root = write_visdrone(tmp_path / "vd", rows=rows, size=(96, 80))
    with caplog.at_level(logging.INFO, logger="hmkd.data.visdrone"):
        ds = VisDroneDetection(root, train=True)
    st = ds.conversion_stats
    assert st["degenerate"] == 3 and st["clipped"] == 2  # zero/negative width, outside; truck, top-left
    assert "2 clipped, 3 degenerate dropped" in caplog.text
    _, target = ds[0]
    b = target["boxes"]
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 3] <= 80).all() and (b[:, 2:] > b[:, :2]).all()


def test_image_without_annotations_gives_empty_target_and_trains(coco) -> None:
    img_dir, ann, _ = coco
    ds = CocoDetection(img_dir, ann, train=True)
    assert ds.stats["empty_images"] == 1
    image, target = ds[2]  # c.png: no annotation at all
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    # a detector trains on a batch whose images have no boxes
    torch.manual_seed(0)
    model = build_detector("fcos", "resnet18", num_classes=ds.num_classes, **TINY_MODEL_KW)
    model.train()
    images, targets = collate_fn([ds[2], ds[2]])
    losses = model(list(images), list(targets))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


# --------------------------------------------------------------------------------------- VisDrone
@pytest.mark.parametrize("row, n", [("10,12,20,16,1,4,0", 7), ("10,12,20,16,1,4,0,0,1", 9), ("10 12 20 16 1 4 0 0", 1)])
def test_visdrone_wrong_field_count(tmp_path: Path, row, n) -> None:
    root = write_visdrone(tmp_path / "vd", rows=[VISDRONE_ROWS[0], "", row])
    with pytest.raises(DataError, match=f"expected 8 comma-separated fields, got {n}") as e:
        VisDroneDetection(root, train=True)
    assert str(root / "annotations" / "0000001.txt") + ":3:" in one_line(e)


def test_visdrone_conversion_leaves_no_output_on_error(tmp_path: Path) -> None:
    root = write_visdrone(tmp_path / "vd", rows=[VISDRONE_ROWS[0], "1,2,3"])
    out = tmp_path / "conv" / "visdrone.json"
    with pytest.raises(DataError, match=r"0000001\.txt:2:"):
        convert_visdrone(root, out)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary file either


def test_visdrone_missing_txt(tmp_path: Path) -> None:
    root = write_visdrone(tmp_path / "vd")
    os.remove(root / "annotations" / "0000001.txt")
    with pytest.raises(DataError, match="annotation file missing for image") as e:
        VisDroneDetection(root, train=True)
    assert "0000001.txt" in one_line(e)


# ------------------------------------------------------------------------ teacher / student classes
def test_teacher_with_other_class_count_in_config(tmp_path: Path, caplog) -> None:
    """A 5-class teacher distils a 2-class student (every method reads only the teacher's backbone +
    FPN): no error, one log line saying so, the teacher's own class count kept in config.yaml."""
    write_coco(tmp_path)
    teacher_file = tmp_path / "teacher5.pth"
    torch.save(build_detector("fcos", "resnet18", num_classes=5, **TINY_MODEL_KW).state_dict(), teacher_file)
    teacher = [f"teacher.{o.split('.', 1)[1]}" for o in TINY_MODEL]
    cfg = coco_cfg(tmp_path, "distill.method=fitnet", *teacher, "teacher.num_classes=5", f"teacher.weights={teacher_file}")
    with caplog.at_level(logging.INFO, logger="hmkd.distill.base"):
        train(cfg, output_dir=str(tmp_path / "out"), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "hmkd.distill.base" and "classes" in r.getMessage()]
    assert lines == ["teacher has 5 classes, the student 2: method 'fitnet' uses only the teacher's backbone + FPN, "
                     "so the class sets need not match"]
    saved = load_config(str(tmp_path / "out" / "config.yaml"))
    assert (saved.teacher.num_classes, saved.model.num_classes) == (5, 2)
    assert (tmp_path / "out" / "model_final.pth").exists()


def test_student_with_other_class_count_in_config(tmp_path: Path) -> None:
    write_coco(tmp_path)
    with pytest.raises(ConfigError, match="model.num_classes is 4 but the data set has 2 classes") as e:
        train(coco_cfg(tmp_path, "model.num_classes=4"), output_dir=str(tmp_path / "out"), progress=False)
    one_line(e)


def test_teacher_weights_of_other_class_count(tmp_path: Path) -> None:
    """Teacher weights trained for 5 classes on a 2-class data set: a CheckpointError naming the head keys."""
    write_coco(tmp_path)
    teacher_file = tmp_path / "teacher5.pth"
    torch.save(build_detector("fcos", "resnet18", num_classes=5, **TINY_MODEL_KW).state_dict(), teacher_file)
    teacher = [f"teacher.{o.split('.', 1)[1]}" for o in TINY_MODEL]
    cfg = coco_cfg(tmp_path, "distill.method=fitnet", *teacher, f"teacher.weights={teacher_file}")
    with pytest.raises(CheckpointError) as e:
        train(cfg, output_dir=str(tmp_path / "out"), progress=False)
    msg = one_line(e)
    assert str(teacher_file) in msg and "head.classification_head.cls_logits.weight (6, 64, 3, 3) vs (3, 64, 3, 3)" in msg
    assert_nothing_complete(tmp_path / "out")


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def fcos_and_retina(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    fcos = build_detector("fcos", "resnet18", num_classes=2, **TINY_MODEL_KW)
    retina = build_detector("retinanet", "resnet18", num_classes=2, **TINY_MODEL_KW)
    torch.save(retina.state_dict(), d / "retina.pth")
    return fcos, d


def test_checkpoint_of_wrong_architecture(fcos_and_retina) -> None:
    fcos, d = fcos_and_retina
    with pytest.raises(CheckpointError) as e:
        load_weights(fcos, str(d / "retina.pth"))
    msg = one_line(e)
    assert str(d / "retina.pth") in msg and "does not fit FCOS" in msg
    assert "missing keys: head.classification_head.conv.0.weight" in msg
    assert "unexpected keys: head.classification_head.conv.0.0.weight" in msg
    assert "shape mismatch: head.classification_head.cls_logits.weight" in msg


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n\nat all\n", "half"], ids=["empty", "text", "truncated"])
def test_unreadable_checkpoint(fcos_and_retina, tmp_path: Path, content) -> None:
    fcos, d = fcos_and_retina
    path = tmp_path / "bad.pth"
    if content == "half":
        raw = (d / "retina.pth").read_bytes()
        content = raw[: len(raw) // 2]
    path.write_bytes(content)
    for fn in (lambda: load_weights(fcos, str(path)), lambda: ck.load_checkpoint(str(path))):
        with pytest.raises(CheckpointError, match="not a readable") as e:
            fn()
        assert str(path) in one_line(e)


def test_resume_from_checkpoint_of_other_architecture(tmp_path: Path, fcos_and_retina) -> None:
    _, d = fcos_and_retina
    write_coco(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    retina = torch.load(d / "retina.pth")
    ck.save_checkpoint({"model": retina, "optimizer": {}, "scheduler": {}, "iteration": 1}, str(out / "last_checkpoint.pth"))
    with pytest.raises(CheckpointError) as e:
        train(coco_cfg(tmp_path), output_dir=str(out), resume=True, progress=False)
    msg = one_line(e)
    assert "last_checkpoint.pth: does not fit this run's model" in msg and "head.classification_head" in msg
    assert not (out / "metrics.json").exists() and not (out / "model_final.pth").exists()


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda: build_detector("yolo", "resnet18", num_classes=2), r"unknown detector 'yolo' \(known: faster_rcnn, mask_rcnn, retinanet, fcos, torchvision:<builder> \(hmkd list detectors\)\)"),
        (lambda: build_detector("fcos", "resnet7", num_classes=2), r"unknown backbone 'resnet7' \(known: resnet18, .*mobilenet_v2"),
        (lambda: build_distiller("kd9000", student=None), r"unknown method 'kd9000' \(known: none, .*hmkd"),
        (lambda: needs_teacher("kd9000"), r"unknown method 'kd9000' \(known: none, .*fgd"),
        (lambda: build_dataset("pascal", train=True, root="."), r"data.kind 'pascal' is unknown; choose one of \['coco', 'synthetic', 'visdrone'\]"),
        (lambda: build_detector("fcos", "resnet18", num_classes=2, levels=["P3", "P9"]), r"unknown FPN level 'P9' \(known: P2, P3"),
    ],
    ids=["detector", "backbone", "method", "method-trainer", "dataset", "level"],
)
def test_unknown_names_list_the_known_ones(fn, match) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        fn()
    one_line(e)


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "yaml_text, overrides, match",
    [
        ("train:\n  lrr: 0.1\n", [], r"cfg.yaml: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)$"),
        ("modle:\n  detector: fcos\n", [], r"cfg.yaml: unknown key 'modle' \(did you mean 'model'\?\)$"),
        ("train:\n  zzz: 1\n", [], r"cfg.yaml: unknown key 'train.zzz' \(known: iters, optimizer, lr, "),
        # inside an optional section: the key, not "teacher must be ModelConfig or NoneType, got {...}"
        ("teacher: {backbon: resnet50}\n", [], r"cfg.yaml: unknown key 'teacher.backbon' \(did you mean 'teacher.backbone'\?\)$"),
        ("data:\n  synth: {n_trian: 3}\n", [], r"cfg.yaml: unknown key 'data.synth.n_trian' \(did you mean 'data.synth.n_train'\?\)$"),
        ("distill:\n  method: hmkd\n  options: {alhpa: 2}\n", [],
         r"cfg.yaml: unknown key 'distill.options.alhpa' \(did you mean 'distill.options.alpha'\?\)$"),
        ("distill:\n  method: fgd\n  options: {temprature: 2}\n", [],
         r"cfg.yaml: unknown key 'distill.options.temprature' \(did you mean 'distill.options.temperature'\?\)$"),
        ("distill:\n  method: hmkd\n  options: {heads: many}\n", [], r"cfg.yaml: distill.options.heads must be an integer, got 'many'"),
        ("distill:\n  method: hmkd\n  options: {heads: 0}\n", [], r"distill.options.heads must be >= 1, got 0"),
        ("model:\n  min_size: [128, x]\n", [], r"cfg.yaml: model.min_size\[1\] must be an integer, got 'x'"),
        # a typo on the command line is the command line's, not the file's
        ("train:\n  lr: 0.1\n", ["train.lrr=0.1"], r"^command line: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)$"),
        ("train:\n  lr: 0.1\n", ["teacher.backbon=resnet50"], r"^command line: unknown key 'teacher.backbon'"),
        ("train:\n  lr: 0.1\n", ["distill.method=hmkd", "distill.options.alhpa=1"],
         r"^command line: unknown key 'distill.options.alhpa' \(did you mean 'distill.options.alpha'\?\)$"),
        ("train:\n  iters: 5\n", ["train.iters=many"], r"^command line: train.iters must be an integer, got 'many'"),
        # a model key the teacher inherits is reported as the model's, where it was written
        ("model: {backbon: resnet50}\nteacher: {weights: t.pth}\n", [], r"cfg.yaml: unknown key 'model.backbon'"),
        ("train:\n  iters: many\n", [], r"cfg.yaml: train.iters must be an integer, got 'many'"),
        ("data:\n  hflip: 'yes'\n", [], r"data.hflip must be true or false, got 'yes'"),
        ("model:\n  levels: P3\n", [], r"model.levels must be list or NoneType, got 'P3'"),
        ("train: 5\n", [], r"train must be a mapping, got 5"),
        ("train:\n  iters: [1\n", [], r"cfg.yaml: line 3 is not valid YAML"),
        ("", ["train.iters=1.5"], r"train.iters must be an integer, got 1.5"),
        ("", ["train"], r"override 'train' must look like key=value"),
    ],
    ids=["key", "section", "key-far", "teacher-key", "synth-key", "options-key", "fgd-options-key", "options-type",
         "options-value", "list-item", "cli-key", "cli-teacher-key", "cli-options-key", "cli-type",
         "inherited-key", "int", "bool", "list", "mapping", "yaml", "override-type", "override-form"],
)
def test_bad_config(tmp_path: Path, yaml_text, overrides, match) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(str(path), overrides)
    one_line(e)


def test_config_error_names_the_base_file_that_set_the_key(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  lrr: 0.1\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\ntrain:\n  iters: 3\n")
    with pytest.raises(ConfigError, match=r"base.yaml: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)") as e:
        load_config(str(tmp_path / "run.yaml"))
    assert "run.yaml" not in one_line(e)


def test_unknown_names_suggest_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'hmdk' \(known: none, .*; did you mean 'hmkd'\?\)"):
        needs_teacher("hmdk")
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet5' \(known: .*; did you mean 'resnet50'\?\)"):
        build_detector("fcos", "resnet5", num_classes=2)
    with pytest.raises(ConfigError, match=r"data.kind 'cocco' is unknown; .*did you mean 'coco'\?"):
        build_dataset("cocco", train=True, root=".")


@pytest.mark.parametrize("override", ["train.lr=.nan", "train.clip_grad=.inf", "train.weight_decay=nan"])
def test_non_finite_training_numbers(tmp_path: Path, override) -> None:
    """Read as floats (YAML ``.nan``/``.inf``), they would only show up later as a non-finite loss."""
    write_coco(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key} must be a finite number, got (nan|inf)") as e:
        train(coco_cfg(tmp_path, override), output_dir=str(tmp_path / "out"), progress=False)
    one_line(e)
    assert not (tmp_path / "out").exists()


def test_bad_distill_options() -> None:
    s = build_detector("fcos", "resnet18", num_classes=2, **TINY_MODEL_KW)
    t = build_detector("fcos", "resnet18", num_classes=2, **TINY_MODEL_KW)
    with pytest.raises(ConfigError, match=r"unknown key 'distill.options.alhpa' \(did you mean 'distill.options.alpha'\?\)") as e:
        build_distiller("fgd", student=s, teacher=t, options={"alhpa": 1.0})
    one_line(e)


# ----------------------------------------------------------------------------- detections to score
def _det(**kw) -> dict:
    d = {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 16.0], "score": 0.9}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    "det, match",
    [
        (_det(image_id=[1]), r"detection for image_id \[1\], which is not in the ground truth"),
        (_det(image_id=_DROP), "detection for image_id None"),
        (_det(bbox=[1, 2]), r"detections\[1\] \(image_id 1\) bbox \[1, 2\] is not 4 finite numbers"),
        (_det(bbox=_DROP), r"bbox None is not 4 finite numbers"),
        (_det(bbox=[1, 2, float("nan"), 3]), "is not 4 finite numbers"),
        (_det(score="high"), r"score 'high' is not a finite number"),
        (_det(score=_DROP), r"has no 'score'"),
        (_det(category_id=_DROP), r"has no 'category_id'"),
        ("not a detection", r"detections\[1\] is not an object"),
        (_det(score=True), r"score True is not a finite number"),
        (_det(score=float("inf")), r"score inf is not a finite number"),
        (_det(bbox=(1, 2, 3, "4")), r"bbox \(1, 2, 3, '4'\) is not 4 finite numbers"),
        (_det(category_id={"id": 3}), r"category_id \{'id': 3\} is not an id"),
        (_det(image_id=7), r"detection for image_id 7, which is not in the ground truth"),
    ],
    ids=["image-list", "no-image", "short-box", "no-box", "nan-box", "str-score", "no-score", "no-category", "str",
         "bool-score", "inf-score", "str-in-tuple-box", "dict-category", "unknown-image"],
)
def test_malformed_detections(det, match) -> None:
    """COCO results with missing keys or wrong types: pycocotools would raise KeyError/TypeError/IndexError."""
    from hmkd.engine.evaluator import coco_metrics

    with pytest.raises(DataError, match=match) as e:
        coco_metrics(tiny_coco(), [_det(), det])
    one_line(e)


def test_unusable_segmentations_in_segm_evaluation() -> None:
    """Ground truth or detections with a polygon/RLE pycocotools cannot rasterise safely (it crashed)."""
    from hmkd.engine.evaluator import coco_metrics

    gt = tiny_coco()
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a.setdefault("segmentation", [[x, y, x + w, y, x + w, y + h, x, y + h]])
    det = _det(segmentation={"size": [96, 96], "counts": "PP9"})  # compressed RLE of an empty 96x96 mask
    assert coco_metrics(gt, [det], ("bbox", "segm"))["segm"]["mAP"] == 0.0  # the well-formed case scores
    for seg, why in (
        ({"size": [96, 96], "counts": "PP8"}, "RLE counts do not add up to the 96x96 image"),
        ({"size": [96, 96], "counts": "PP9P"}, "RLE counts are malformed"),
        ({"size": [96, 96], "counts": "zzz"}, "RLE counts are malformed"),
        ({"size": [64, 64], "counts": "PP9"}, "RLE size"),
        ({"size": [96, 96], "counts": [96 * 96]}, "not a compressed RLE"),
        ([[10, 10, 20, 10, 20, 20]], "not a compressed RLE"),
    ):
        with pytest.raises(DataError, match=r"detections\[0\] \(image_id 1\) has an unusable segmentation") as e:
            coco_metrics(gt, [_det(segmentation=seg)], ("segm",))
        assert why in one_line(e)
    gt["annotations"][0]["segmentation"] = [[10, 10, 2.0**40, 10, 30, 26, 10, 26]]
    with pytest.raises(DataError, match="ground truth annotation id 1 has an unusable segmentation") as e:
        coco_metrics(gt, [det], ("segm",))
    one_line(e)
