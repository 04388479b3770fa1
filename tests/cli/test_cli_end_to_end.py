"""Every CLI command on one tiny config: train -> distill -> eval -> bench speed -> viz -> export."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from PIL import Image

from hmkd.cli import main

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"kind": "synthetic", "root": "data", "batch_size": 2, "eval_batch_size": 2,
             "synth": {"n_train": 6, "n_val": 3, "size": 160, "seed": 0, "preset": "default"}},
    "model": {"detector": "fcos", "backbone": "resnet18", "fpn_channels": 64, "levels": ["P2", "P3", "P4", "P5", "P6"],
              "min_size": 160, "max_size": 160, "head_convs": 1},
    "train": {"iters": 3, "warmup_iters": 1, "ckpt_period": 2, "log_period": 1},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cwd = os.getcwd()
    os.chdir(d)
    with open("student.yaml", "w") as f:
        yaml.safe_dump(TINY, f)
    distill = {"_base_": "student.yaml", "name": "tiny_hmkd",
               "teacher": {"backbone": "resnet34", "weights": "runs/teacher/model_final.pth"},
               "distill": {"method": "hmkd", "options": {"hidden": 32, "heads": 4, "fit_iters": 2}}}
    with open("hmkd.yaml", "w") as f:
        yaml.safe_dump(distill, f)
    yield d
    os.chdir(cwd)


def test_cli_story(workdir, capsys) -> None:
    assert main(["list", "methods"]) == 0
    assert "hmkd" in capsys.readouterr().out
    assert main(["train", "student.yaml", "model.backbone=resnet34", "--output-dir", "runs/teacher", "--no-progress"]) == 0
    assert os.path.isfile("runs/teacher/model_final.pth")
    assert main(["distill", "hmkd.yaml", "--output-dir", "runs/hmkd", "--no-progress"]) == 0
    logged = [json.loads(l) for l in open("runs/hmkd/log.jsonl")]
    assert any("distill.small_attn_p2" in r for r in logged)
    assert main(["eval", "student.yaml", "--weights", "runs/hmkd/model_final.pth", "--out", "eval", "--no-progress"]) == 0
    metrics = json.load(open("eval/metrics.json"))
    assert set(metrics["bbox"]) >= {"mAP", "AP50", "AP75", "APs", "APm", "APl"}
    assert os.path.isfile("eval/detections.json")

    assert main(["bench", "speed", "hmkd.yaml", "--weights", "hmkd=runs/hmkd/model_final.pth", "--out", "speed",
                 "--size", "160", "--iters", "2", "--warmup", "1"]) == 0
    speed = json.load(open("speed/speed.json"))
    rows = speed["models"]
    assert rows["student"]["params"] == rows["hmkd"]["params"]  # the distilled student costs the same
    assert rows["student"]["flops"] == rows["hmkd"]["flops"]

    img = "data/val/images/" + sorted(os.listdir("data/val/images"))[0]
    assert main(["viz", "detections", "hmkd.yaml", "--weights", "plain=runs/hmkd/model_final.pth",
                 "--weights", "teacher=runs/teacher/model_final.pth", "--images", img, "--out", "viz",
                 "--score-thresh", "0.01"]) == 0
    pngs = [p for p in os.listdir("viz") if p.endswith(".png")]
    assert pngs and Image.open(os.path.join("viz", pngs[0])).width >= 2 * 160  # two panels of the 160 px image
    assert main(["viz", "heatmap", "student.yaml", "--weights", "runs/hmkd/model_final.pth", "--images", img,
                 "--level", "P3", "--out", "heat"]) == 0
    assert any(p.endswith(".png") for p in os.listdir("heat"))
    assert main(["export", "onnx", "student.yaml", "--weights", "runs/hmkd/model_final.pth", "--out", "student.onnx",
                 "--size", "160"]) == 0
    assert os.path.getsize("student.onnx") > 1000


def test_cli_errors_are_one_line(workdir, capsys) -> None:
    assert main(["train", "student.yaml", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hmkd: error:") and "train.lrr" in err[0]
    assert main(["distill", "student.yaml"]) == 2
    assert main(["train", "missing.yaml"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
