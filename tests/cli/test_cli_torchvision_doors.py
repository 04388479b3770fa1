"""torchvision checkpoints as torchvision saves them, through every command, with the preset alone.

For each of the nine builders of hmkd's torchvision zoo, a model built by torchvision
(``weights=None``, 91 outputs, random weights) is saved with ``torch.save(model.state_dict())`` and
fed to ``hmkd viz detections`` (no data set: COCO's names come from torchvision's weight metadata),
``hmkd viz heatmap`` and ``hmkd eval`` (the preset header's command on a tiny COCO set). The dearer
doors run on one builder: ``hmkd export onnx`` of a torchvision *training* checkpoint (``model``,
``optimizer``, ... entries), ``hmkd distill`` with that file as the teacher and the bare file as
the student's start, and the README's eval command exactly as written. A file of another builder
is refused in one line naming both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex

import pytest
import torch
from PIL import Image
from torchvision.models import detection as tvd

from hmkd.cli import main
from hmkd.export.onnx import read_label_map
from hmkd.models.torchvision_zoo import TORCHVISION_DETECTORS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILDERS = [e.builder for e in TORCHVISION_DETECTORS.values()]
TINY = ["model.min_size=64", "model.max_size=64"]  # the presets' sizes, shrunk for a CPU test
TV_COCO = tvd.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # what the names must be
CHEAP = "fasterrcnn_mobilenet_v3_large_320_fpn"


def preset(builder: str) -> str:
    return os.path.join(ROOT, "configs", "torchvision", f"{builder}.yaml")


def save_torchvision(builder: str, path: str, *, training_checkpoint: bool = False) -> None:
    """torchvision's model, saved the way torchvision saves it (bare, or references/detection/train.py's dict)."""
    torch.manual_seed(0)
    model = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=91)
    if training_checkpoint:
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[16, 22])
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                    "epoch": 25, "args": argparse.Namespace(model=builder, lr=0.02)}, path)
    else:
        torch.save(model.state_dict(), path)


def header_eval_command(builder: str) -> list[str]:
    """The ``hmkd eval`` command of a preset's header comment, as its arguments."""
    lines = open(preset(builder)).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("#   hmkd eval "))
    text = ""
    for line in lines[start:]:
        text += line.lstrip("#").strip() + " "
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(text.replace("\\ ", " "))[1:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out as the README's commands expect: configs/ (the repository's), a tiny
    COCO val set under data/coco (one image, two COCO categories only, polygons for Mask R-CNN), a photo."""
    d = tmp_path_factory.mktemp("tv_doors")
    cwd = os.getcwd()
    os.chdir(d)
    os.symlink(os.path.join(ROOT, "configs"), "configs")
    os.makedirs("data/coco/val2017")
    os.makedirs("data/coco/annotations")
    g = torch.Generator().manual_seed(0)
    # one square image: the README's command runs at the preset's 800 px, the cheapest at a square
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
        "data/coco/val2017/000000000001.png")
    Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save("photo.png")
    anns = [(1, 1, [4.0, 4.0, 30.0, 30.0]), (1, 18, [36.0, 30.0, 24.0, 20.0])]  # person, dog
    coco = {
        "images": [{"id": 1, "file_name": "000000000001.png", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [{"id": k, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0,
                         "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
                        for k, (im, c, b) in enumerate(anns, start=1)],
    }
    with open("data/coco/annotations/instances_val2017.json", "w") as f:
        json.dump(coco, f)
    yield d
    os.chdir(cwd)


@pytest.mark.parametrize("builder", BUILDERS)
def test_bare_torchvision_file_through_viz_and_eval(workdir, builder, caplog):
    """The cheap doors for every builder: a bare state dict with the preset alone."""
    entry = TORCHVISION_DETECTORS["torchvision:" + builder]
    ckpt = f"{builder}.pth"
    save_torchvision(builder, ckpt)
    try:
        # viz detections: no data set named, so none is used (nor generated) and the names are COCO's
        with caplog.at_level("INFO"):
            assert main(["viz", "detections", preset(builder), *TINY, "--weights", ckpt, "--images", "photo.png",
                         "--score-thresh", "0", "--out", f"viz_{builder}"]) == 0
        assert not os.path.exists("data/synth")
        assert any("label names: 90 labels from torchvision's weight metadata" in r.getMessage() for r in caplog.records)
        drawn = json.load(open(f"viz_{builder}/detections.json"))
        assert drawn["class_names"][:12] == list(TV_COCO[1:13])  # label = COCO id, "N/A" at 12
        assert os.path.isfile(f"viz_{builder}/photo.png")

        # viz heatmap, at the model's finest level
        level = entry.levels[0]
        assert main(["viz", "heatmap", preset(builder), *TINY, "--weights", ckpt, "--images", "photo.png",
                     "--level", level, "--out", f"heat_{builder}"]) == 0
        assert any(p.endswith(".png") for p in os.listdir(f"heat_{builder}"))

        # eval: the preset header's own command (its checkpoint name is this file; sizes shrunk)
        args = header_eval_command(builder)
        assert args[:2] == ["eval", f"configs/torchvision/{builder}.yaml"]
        named = args[args.index("--weights") + 1]
        assert named == entry.checkpoint
        os.replace(ckpt, named)
        ckpt = named
        out = f"eval_{builder}"
        args[args.index("--out") + 1] = out
        assert main([*args, *TINY, "--no-progress"]) == 0
        metrics = json.load(open(f"{out}/metrics.json"))
        assert "mAP" in metrics["bbox"] and ("segm" in metrics) == (entry.family == "mask_rcnn")
    finally:
        os.remove(ckpt)


def test_training_checkpoint_export_distill_and_the_readme_command(workdir, caplog, capsys):
    """The dear doors, once: ONNX export of torchvision's training-checkpoint format (COCO names
    in the metadata without a data set), that file as a distillation teacher with the bare file as
    the student's start, and the README's eval command exactly as written."""
    save_torchvision(CHEAP, "tv_train.pth", training_checkpoint=True)
    save_torchvision(CHEAP, "tv_bare.pth")
    capsys.readouterr()
    assert main(["export", "onnx", preset(CHEAP), "--weights", "tv_train.pth", "--out", "tv.onnx", "--size", "64",
                 "--check-images", "photo.png"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and "weight metadata" in summary["label_map_from"]
    labels = read_label_map("tv.onnx")
    assert labels[1] == {"category_id": 1, "name": "person"} and labels[90]["name"] == "toothbrush"
    assert 12 not in labels and len(labels) == 80  # torchvision's "N/A" outputs are no category

    cfg = {
        "_base_": preset(CHEAP), "name": "doors", "seed": 0, "device": "cpu",
        "data": {"kind": "synthetic", "root": "synth", "batch_size": 2, "eval_batch_size": 2, "check_images": False,
                 "synth": {"n_train": 2, "n_val": 1, "size": 64, "seed": 0, "preset": "default"}},
        "model": {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 32, "rpn_post_nms_top_n_train": 16,
                  "rpn_pre_nms_top_n_test": 16, "rpn_post_nms_top_n_test": 8, "box_batch_size_per_image": 16,
                  "weights": "tv_bare.pth", "weights_skip_classes": True},
        "teacher": {"num_classes": 90, "weights": "tv_train.pth"},
        "train": {"iters": 1, "warmup_iters": 1, "ckpt_period": 0, "log_period": 1},
        "distill": {"method": "fitnet"},
    }
    import yaml

    with open("doors.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    with caplog.at_level("INFO"):
        assert main(["distill", "doors.yaml", "--output-dir", "runs/doors", "--no-progress"]) == 0
    assert any("teacher has 90 classes, the student 6" in r.getMessage() for r in caplog.records)
    assert os.path.isfile("runs/doors/model_final.pth")

    # README, "Bring your own teacher": the eval command as written, on a bare random-weight file
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Bring your own teacher"):]
    match = re.search(r"^hmkd eval configs/torchvision/.*?--out \S+$", section, re.S | re.M)
    args = shlex.split(match.group(0).replace("\\\n", " "))[1:]
    weights = args[args.index("--weights") + 1]
    builder = args[1].split("/")[-1].removesuffix(".yaml")
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    save_torchvision(builder, weights)
    try:
        assert main(args + ["--no-progress"]) == 0
    finally:
        os.remove(weights)
    assert "mAP" in json.load(open(os.path.join(args[args.index("--out") + 1], "metrics.json")))["bbox"]


def test_another_builders_file_is_refused_in_one_line(workdir, capsys):
    save_torchvision("retinanet_resnet50_fpn", "retina.pth")
    try:
        for cmd in (["viz", "detections", preset("fasterrcnn_resnet50_fpn"), "--images", "photo.png", "--out", "x"],
                    ["export", "onnx", preset("retinanet_resnet50_fpn_v2"), "--out", "x.onnx"]):
            assert main([*cmd, "--weights", "retina.pth"]) == 2
            err = capsys.readouterr().err.strip()
            config = cmd[2].split("/")[-1].removesuffix(".yaml")
            assert err == (f"hmkd: error: retina.pth: checkpoint is torchvision:retinanet_resnet50_fpn (read off its "
                           f"keys), config says torchvision:{config} (model.detector)")
        # a data set the user names is used, and its class count must fit (contiguous labels: 2 classes)
        assert main(["viz", "detections", preset("retinanet_resnet50_fpn"), "data.kind=coco", "data.root=data/coco",
                     "data.val_images=val2017", "data.val_ann=annotations/instances_val2017.json",
                     "--weights", "retina.pth", "--images", "photo.png", "--out", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hmkd: error: retina.pth: does not fit RetinaNet") and "the file has 90 classes" in err
        assert "\n" not in err
    finally:
        os.remove("retina.pth")
