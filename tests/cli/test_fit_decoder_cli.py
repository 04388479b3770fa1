"""``hmkd fit-decoder`` on a config whose student starts from the pretrained stand-in (the paper
regime's): it fits and reports without making the student's stand-in (the fit reads the teacher only)."""

from __future__ import annotations

import torch

from hmkd.cli import main
from hmkd.config import load_config
from hmkd.models import build_model

MODEL = ["model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
         "model.levels=[P2,P3,P4,P5]", "model.min_size=64", "model.max_size=64", "model.num_classes=6"]


def test_fit_decoder_with_a_stand_in_student(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    teacher = str(tmp_path / "teacher.pth")
    torch.manual_seed(0)
    torch.save(build_model(load_config(None, MODEL).model).state_dict(), teacher)
    config = tmp_path / "fit.yaml"
    config.write_text("name: fit\n")
    rc = main(["fit-decoder", str(config), "device=cpu", "data.kind=synthetic", f"data.root={tmp_path / 'data'}",
               "data.synth.n_train=4", "data.synth.n_val=2", "data.synth.size=64", "data.batch_size=2",
               "data.eval_batch_size=2", "data.workers=0", *MODEL, "model.backbone_weights=pretrain",
               *[f"teacher.{o.split('.', 1)[1]}" for o in MODEL], f"teacher.weights={teacher}",
               "distill.method=hmkd", "distill.options.hidden=16", "distill.options.heads=2",
               "distill.options.fit_iters=2", f"--out={tmp_path / 'fit.pt'}", "--quality-images=2", "--no-progress"])
    assert rc == 0
    assert (tmp_path / "fit.pt").is_file() and (tmp_path / "fit.pt.quality.md").is_file()
    assert not (tmp_path / "cache" / "backbones").exists()  # no stand-in was made for the student
    assert "inside a window of k x k cells" in capsys.readouterr().out
