"""Checkpoints as inputs of eval / viz / export: the label map the trainer stores, the architecture
read from the checkpoint (a config file optional), and one-line errors naming both architectures
when a checkpoint does not fit its config. One tiny run (2 iterations) makes the checkpoint."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml
from PIL import Image

from hmkd.cli import main
from hmkd.config import ModelConfig, load_config, save_config
from hmkd.training import train
from hmkd.errors import CheckpointError, ConfigError
from hmkd.export.onnx import onnx_session, read_label_map
from hmkd.models import build_detector
from hmkd.models.checkpoint_info import check_fits, config_from_checkpoint, guess_arch, read_checkpoint_info
from hmkd.models.specs import as_model, specs_from_config

NAMES = ["disc", "square", "triangle", "ring", "cross", "diamond"]  # the synthetic set's classes
TINY = dict(detector="fcos", backbone="resnet18", fpn_channels=32, head_convs=1, levels=["P3", "P4", "P5", "P6"],
            min_size=128, max_size=128, detections_per_img=20, topk_candidates=100)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_inputs")
    items = [
        "name=tiny", "device=cpu", "seed=0", "data.kind=synthetic", f"data.root={root / 'data'}",
        "data.synth.n_train=4", "data.synth.n_val=3", "data.synth.size=128", "data.batch_size=2",
        "data.eval_batch_size=2", "train.iters=2", "train.warmup_iters=1", "train.log_period=1",
        "train.ckpt_period=0", "train.keep_last_checkpoint=true", *[f"model.{k}={json.dumps(v)}" for k, v in TINY.items()],
    ]
    cfg = load_config(None, items)
    train(cfg, output_dir=str(root / "run"), progress=False)
    save_config(cfg, str(root / "cfg.yaml"))
    return root


def final(run) -> str:
    return str(run / "run" / "model_final.pth")


def test_trainer_stores_the_label_map(run):
    for name in ("model_final.pth", "last_checkpoint.pth"):
        ck = torch.load(run / "run" / name, map_location="cpu", weights_only=False)
        assert ck["label_map"] == {"category_ids": [1, 2, 3, 4, 5, 6], "names": NAMES}
    info = read_checkpoint_info(final(run))
    assert info.arch == "fcos/resnet18" and info.model.num_classes == 6 and list(info.label_map.names) == NAMES


def test_a_checkpoint_that_does_not_fit_names_both_architectures(run):
    info = read_checkpoint_info(final(run))
    path = re.escape(final(run))
    with pytest.raises(CheckpointError, match=path + re.escape(": checkpoint is fcos/resnet18, config says fcos/resnet50 (model.backbone)")):
        check_fits(info, ModelConfig(**{**TINY, "backbone": "resnet50"}))
    with pytest.raises(CheckpointError, match=re.escape(
            "checkpoint is fcos/resnet18 with fpn_channels 32, config says fcos/resnet18 with fpn_channels 64 (model.fpn_channels)")):
        check_fits(info, ModelConfig(**{**TINY, "fpn_channels": 64}))
    with pytest.raises(CheckpointError, match=re.escape("with 6 classes, config says fcos/resnet18 with 8 classes (model.num_classes)")):
        as_model((ModelConfig(**TINY), final(run)), num_classes=8)
    with pytest.raises(CheckpointError, match=re.escape("checkpoint is fcos/resnet18, config says retinanet/resnet18 (teacher.detector)")):
        check_fits(info, ModelConfig(**{**TINY, "detector": "retinanet"}), section="teacher")
    # keys that do not change the weights may differ: sizes, thresholds
    check_fits(info, ModelConfig(**{**TINY, "min_size": 512, "max_size": 640, "score_thresh": 0.5}))
    model = as_model((ModelConfig(**{**TINY, "min_size": 96}), final(run)))  # class count from the checkpoint
    assert model.head.classification_head.num_classes == 7  # with the background


def test_a_bare_state_dict_is_described_by_its_keys(tmp_path):
    kw = {k: v for k, v in TINY.items() if k not in ("detector", "backbone")}
    retina = build_detector("retinanet", "resnet34", num_classes=2, **kw)
    torch.save(retina.state_dict(), tmp_path / "retina.pth")
    assert guess_arch(retina.state_dict()) == {"detector": "retinanet", "backbone": "resnet34"}
    with pytest.raises(CheckpointError, match=re.escape(
            "retina.pth: checkpoint is retinanet/resnet34 (read off its keys), config says fcos/resnet18 "
            "(model.detector, model.backbone)")):
        as_model((ModelConfig(**TINY), str(tmp_path / "retina.pth")))
    with pytest.raises(CheckpointError, match=re.escape(
            "checkpoint is retinanet/resnet34 (read off its keys), config says retinanet/resnet18 (model.backbone)")):
        as_model((ModelConfig(**{**TINY, "detector": "retinanet"}), str(tmp_path / "retina.pth")), num_classes=2)


def test_older_checkpoints_still_load(run, tmp_path):
    ck = torch.load(final(run), map_location="cpu", weights_only=False)
    del ck["label_map"]  # written before the label map was stored
    torch.save(ck, tmp_path / "old.pth")
    info = read_checkpoint_info(tmp_path / "old.pth")
    assert info.label_map is None and info.arch == "fcos/resnet18"
    as_model((ModelConfig(**TINY), str(tmp_path / "old.pth")))
    torch.save({"model": ck["model"], "iteration": 2}, tmp_path / "bare.pth")  # no config either
    as_model((ModelConfig(**TINY), str(tmp_path / "bare.pth")))
    with pytest.raises(ConfigError, match="bare.pth: stores no config .* give a config file"):
        config_from_checkpoint(tmp_path / "bare.pth")


def test_config_from_checkpoint(run, tmp_path):
    cfg = config_from_checkpoint(final(run), ["model.score_thresh=0.2", "data.eval_batch_size=1"])
    assert (cfg.model.detector, cfg.model.backbone, cfg.model.num_classes) == ("fcos", "resnet18", 6)
    assert cfg.model.score_thresh == 0.2 and cfg.data.eval_batch_size == 1 and cfg.teacher is None
    assert cfg.data.root == str(run / "data")
    ck = torch.load(final(run), map_location="cpu", weights_only=False)
    ck["config"]["model"]["from_a_newer_version"] = 1  # a key this version does not know is left out
    torch.save(ck, tmp_path / "newer.pth")
    assert config_from_checkpoint(tmp_path / "newer.pth").model.fpn_channels == 32


def test_eval_takes_the_architecture_from_the_checkpoint(run, tmp_path, capsys):
    assert main(["eval", "--weights", final(run), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert "mAP" in json.loads((tmp_path / "ev" / "metrics.json").read_text())["bbox"]
    capsys.readouterr()
    cfg = str(run / "cfg.yaml")
    assert main(["eval", cfg, "model.backbone=resnet34", "--weights", final(run), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hmkd: error: {final(run)}: checkpoint is fcos/resnet18, config says fcos/resnet34 (model.backbone)"
    assert not (tmp_path / "e2").exists()
    # a checkpoint trained on other category ids than the data set's
    ck = torch.load(final(run), map_location="cpu", weights_only=False)
    ck["label_map"]["category_ids"] = [2, 3, 4, 5, 6, 7]
    torch.save(ck, tmp_path / "other.pth")
    assert main(["eval", cfg, "--weights", str(tmp_path / "other.pth"), "--out", str(tmp_path / "e3")]) == 2
    assert "other.pth: trained on category ids [2, 3, 4, 5, 6, 7], the data set has [1, 2, 3, 4, 5, 6]" in capsys.readouterr().err


def test_export_size_and_label_map(run, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", "onnx", "--weights", final(run), "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["input"].startswith("image float32 [3, 128, 128]")  # model.min_size, not 320
    assert summary["resized_inside_to"] == "128x128"
    assert summary["label_map"] == {str(i + 1): f"{n} (category {i + 1})" for i, n in enumerate(NAMES)}
    assert onnx_session(out).get_inputs()[0].shape == [3, 128, 128]
    assert read_label_map(out) == {i + 1: {"category_id": i + 1, "name": n} for i, n in enumerate(NAMES)}
    # a config given and --size HxW
    assert main(["export", "onnx", str(run / "cfg.yaml"), "--weights", final(run), "--out", out, "--size", "96x128"]) == 0
    assert json.loads(capsys.readouterr().out)["input"].startswith("image float32 [3, 96, 128]")
    assert main(["export", "onnx", "--weights", final(run), "--out", out, "--size", "big"]) == 2
    assert "--size 'big': give S or HxW" in capsys.readouterr().err


def test_viz_names_ground_truth_and_teacher_label(run, tmp_path, capsys):
    d = tmp_path / "viz"
    assert main(["viz", "detections", "--weights", final(run), "--images", "0", "--out", str(d), "--score-thresh", "0.0"]) == 0
    rec = json.loads((d / "detections.json").read_text())
    assert rec["class_names"] == NAMES
    (png,) = [p for p in os.listdir(d) if p.endswith(".png")]
    assert Image.open(d / png).width == 2 * 128 + 4  # the ground truth, then the model
    assert main(["viz", "detections", "--weights", final(run), "--images", "0", "--no-gt", "--out", str(tmp_path / "v2")]) == 0
    assert Image.open(tmp_path / "v2" / png).width == 128
    # with a config: a label starting with 'teacher' selects its teacher section, and says so when it does not fit
    raw = yaml.safe_load((run / "cfg.yaml").read_text())
    raw["teacher"] = {**raw["model"], "backbone": "resnet34"}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["viz", "detections", str(tmp_path / "t.yaml"), "--weights", f"teacher={final(run)}", "--images", "0",
                 "--out", str(tmp_path / "v3")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint is fcos/resnet18, config says fcos/resnet34 (teacher.backbone); the label 'teacher' selects" in err
    cfg = load_config(str(tmp_path / "t.yaml"))
    assert [s[1][0].backbone for s in specs_from_config(cfg, [("student", final(run)), ("teacher", None)])] == [
        "resnet18", "resnet34"]
    with pytest.raises(SystemExit):
        main(["viz", "heatmap", "--help"])
    assert "'teacher'" in capsys.readouterr().out
