"""Bring your own teacher, on the command line: torchvision checkpoints (COCO's 91 outputs) as the
teacher and as the student's starting point on a 6-class data set, through a configs/torchvision
preset, then eval, viz and export of the result."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from torchvision.models import detection as tvd

from hmkd.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = os.path.join(ROOT, "configs", "torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_tv")
    cwd = os.getcwd()
    os.chdir(d)
    torch.manual_seed(0)  # a torchvision COCO-format model: 91 outputs (random weights, nothing downloaded)
    coco = tvd.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(coco.state_dict(), "tv_coco.pth")
    small = {"min_size": 160, "max_size": 160, "rpn_pre_nms_top_n_train": 64, "rpn_post_nms_top_n_train": 32,
             "rpn_pre_nms_top_n_test": 32, "rpn_post_nms_top_n_test": 16, "box_batch_size_per_image": 32}
    cfg = {
        "_base_": PRESET, "name": "tv_hmkd", "seed": 0, "device": "cpu",
        "data": {"kind": "synthetic", "root": "data", "batch_size": 2, "eval_batch_size": 2,
                 "synth": {"n_train": 4, "n_val": 2, "size": 160, "seed": 0, "preset": "default"}},
        "model": {**small, "weights": "tv_coco.pth", "weights_skip_classes": True},
        "teacher": {"num_classes": 90, "weights": "tv_coco.pth"},
        "train": {"iters": 2, "warmup_iters": 1, "ckpt_period": 0, "log_period": 1},
        "distill": {"method": "hmkd", "options": {"hidden": 32, "heads": 4, "fit_iters": 2}},
    }
    with open("distill.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    yield d
    os.chdir(cwd)


def test_torchvision_teacher_and_starting_point_end_to_end(workdir, caplog) -> None:
    with caplog.at_level("INFO"):
        assert main(["distill", "distill.yaml", "--output-dir", "runs/hmkd", "--no-progress"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("teacher has 90 classes, the student 6" in m for m in messages)
    skipped = [m for m in messages if "class-dependent tensors" in m]
    assert len(skipped) == 1 and "(91 outputs in the file, 7 here)" in skipped[0]
    logged = [json.loads(l) for l in open("runs/hmkd/log.jsonl")]
    assert any(k.startswith("distill.") and k.endswith("_p6") for r in logged for k in r)  # HMKD on P5/P6
    saved = yaml.safe_load(open("runs/hmkd/config.yaml"))
    assert saved["teacher"]["num_classes"] == 90 and saved["model"]["num_classes"] == 6

    student = "runs/hmkd/model_final.pth"
    assert main(["eval", "distill.yaml", "--weights", student, "--out", "eval", "--no-progress"]) == 0
    assert "mAP" in json.load(open("eval/metrics.json"))["bbox"]
    img = "data/val/images/" + sorted(os.listdir("data/val/images"))[0]
    assert main(["viz", "detections", "distill.yaml", "--weights", f"student={student}",
                 "--weights", "teacher=tv_coco.pth", "--images", img, "--out", "viz", "--score-thresh", "0.01"]) == 0
    assert any(p.endswith(".png") for p in os.listdir("viz"))
    assert main(["export", "onnx", "distill.yaml", "--weights", student, "--out", "student.onnx", "--size", "160"]) == 0
    assert os.path.getsize("student.onnx") > 1000
