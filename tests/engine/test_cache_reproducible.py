"""The same config and seed give the same weights whatever the cache holds (issue 27): the work done
only on a cold cache (the pretrained stand-in's training, the matching decoder's fit) leaves the
run's random streams as they were. Tiny FCOS R18 runs on a tiny synthetic set, CPU."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from hmkd.config import load_config
from hmkd.data import build_data
from hmkd.distill.matching.fit import load_fitted, prepare_decoder
from hmkd.distill.matching.report import build_decoder_method
from hmkd.training import train
from hmkd.models import build_model

MODEL = [
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
    "model.levels=[P3,P4,P5]", "model.min_size=64", "model.max_size=64",
    "model.detections_per_img=10", "model.topk_candidates=20",
]
DATA = [
    "device=cpu", "seed=0", "data.kind=synthetic", "data.synth.n_train=4", "data.synth.n_val=2",
    "data.synth.size=64", "data.batch_size=2", "data.eval_batch_size=2", "data.workers=0",
    "train.iters=2", "train.warmup_iters=0", "train.log_period=1", "train.ckpt_period=0", "train.eval_period=0",
]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(run: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(run, "model_final.pth"), map_location="cpu", weights_only=False)["model"]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ, e.g. {differ[:3]}"


def _files(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def test_a_run_that_makes_the_stand_in_equals_one_that_loads_it(tmp_path, cache):
    cfg = load_config(None, ["name=cold", *DATA, *MODEL, f"data.root={tmp_path / 'data'}",
                             "model.backbone_weights=pretrain", "pretrain.iters=2", "pretrain.synth.n_train=2",
                             "pretrain.synth.n_val=1", "pretrain.synth.size=64", "pretrain.batch_size=2"])
    train(cfg, output_dir=str(tmp_path / "cold"), progress=False)  # pretrains the stand-in
    made = _files(cache / "backbones")
    assert any(p.endswith("backbone.pth") for p in made)
    # whatever the caller's random state, the warm run seeds itself and finds the stand-in
    torch.manual_seed(123)
    train(cfg, output_dir=str(tmp_path / "warm"), progress=False)
    assert _files(cache / "backbones") == made  # loaded, not made again
    _assert_equal(_weights(str(tmp_path / "cold")), _weights(str(tmp_path / "warm")))


def test_a_distillation_that_fits_the_decoder_equals_one_that_loads_it(tmp_path, cache):
    teacher = str(tmp_path / "teacher.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        torch.save(build_model(load_config(None, MODEL + ["model.num_classes=6"]).model).state_dict(), teacher)
    items = ["name=hmkd", *DATA, *MODEL, f"data.root={tmp_path / 'data'}", f"teacher.weights={teacher}",
             "distill.method=hmkd", "distill.options.hidden=16", "distill.options.heads=2",
             "distill.options.decoder_fit=auto", "distill.options.fit_iters=2"]
    items += [f"teacher.{o.split('.', 1)[1]}" for o in MODEL]
    # multi-scale: the student's transform draws each batch's size from the global torch stream
    cfg = load_config(None, items + ["model.min_size=[48,56,64]"])
    train(cfg, output_dir=str(tmp_path / "fits"), progress=False)
    fitted = _files(cache / "decoders")
    assert len(fitted) == 1
    train(cfg, output_dir=str(tmp_path / "loads"), progress=False)
    assert _files(cache / "decoders") == fitted  # loaded, not fitted again
    _assert_equal(_weights(str(tmp_path / "fits")), _weights(str(tmp_path / "loads")))

    # the fit alone (what hmkd fit-decoder does), after other random draws, is the run's fit, and
    # leaves the caller's random streams as they were
    train_set = build_data(cfg, train=True)
    torch.manual_seed(77)
    distiller = build_decoder_method(cfg, train_set, torch.device("cpu"))
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    alone = prepare_decoder(distiller, cfg, train_set, torch.device("cpu"), output=str(tmp_path / "alone.pt"))
    _assert_equal(load_fitted(next(iter(fitted)))["state_dict"], load_fitted(alone)["state_dict"])
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
