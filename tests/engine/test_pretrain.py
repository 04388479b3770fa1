"""The pretrained stand-in (``backbone_weights: pretrain``): trained once, deterministic, cached by its
settings, loaded into the student's (and an untrained teacher's) backbone, never into a resumed run."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from hmkd.config import load_config
from hmkd.training import ensure_pretrained, resolve_pretrained
from hmkd.training.pretrain import pretrain_config, pretrain_key
from hmkd.training import train
from hmkd.errors import ConfigError
from hmkd.models import build_model

TINY = [
    "name=tinypre", "device=cpu", "seed=0",
    "data.kind=synthetic", "data.synth.n_train=4", "data.synth.n_val=2", "data.synth.size=64",
    "data.batch_size=2", "data.eval_batch_size=2", "data.workers=0",
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
    "model.levels=[P3,P4,P5]", "model.min_size=64", "model.max_size=64",
    "model.detections_per_img=10", "model.topk_candidates=20", "model.backbone_weights=pretrain",
    "pretrain.iters=2", "pretrain.synth.n_train=4", "pretrain.synth.n_val=2", "pretrain.synth.size=64",
    "pretrain.batch_size=2",
    "train.iters=1", "train.warmup_iters=0", "train.log_period=1", "train.ckpt_period=0",
]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _body(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stand_in_is_trained_once_cached_and_loaded(tmp_path, cache):
    cfg = load_config(None, TINY)
    path = ensure_pretrained(cfg, cfg.model, progress=False)
    assert path.startswith(str(cache / "backbones" / "resnet18-"))
    assert os.path.isfile(os.path.join(os.path.dirname(path), "pretrain.json"))
    body = _body(path)
    assert body and not any(k.startswith("backbone.") for k in body)  # keys of the body itself
    stamp = os.stat(path).st_mtime_ns
    built = resolve_pretrained(cfg, progress=False)
    assert built.model.backbone_weights == path and os.stat(path).st_mtime_ns == stamp  # reused, not retrained
    model = build_model(built.model, 3)
    own = model.backbone.body.state_dict()
    assert all(torch.equal(own[k], v) for k, v in body.items())
    # the FPN and heads start fresh: only the body is the stand-in's
    assert set(body) == set(own)

    # deterministic: another cache folder trains the same weights
    os.environ["HMKD_CACHE"] = str(tmp_path / "other")
    again = _body(ensure_pretrained(cfg, cfg.model, progress=False))
    assert all(torch.equal(body[k], again[k]) for k in body)


def test_key_follows_the_settings_that_change_the_result():
    cfg = load_config(None, TINY)
    key = pretrain_key(pretrain_config(cfg, cfg.model))
    same = load_config(None, TINY + ["name=other", "data.workers=1", "train.log_period=5", "device=auto"])
    assert pretrain_key(pretrain_config(same, same.model)) == key
    for change in ("pretrain.seed=7", "pretrain.iters=3", "pretrain.synth.seed=5", "model.backbone=resnet34",
                   "model.fpn_channels=64"):
        other = load_config(None, TINY + [change])
        assert pretrain_key(pretrain_config(other, other.model)) != key, change
    # the student's own schedule and data are not the pretraining's
    other = load_config(None, TINY + ["train.iters=9", "data.synth.seed=4"])
    assert pretrain_key(pretrain_config(other, other.model)) == key


def test_training_starts_from_the_stand_in_and_a_resume_does_not_load_it(tmp_path, cache):
    cfg = load_config(None, TINY + [f"data.root={tmp_path / 'data'}"])
    out = str(tmp_path / "run")
    train(cfg, output_dir=out, progress=False)
    assert len(list((cache / "backbones").iterdir())) == 1
    # a teacher with weights of its own never needs the stand-in; one without is given it
    t = dataclasses.replace(cfg.model, weights=os.path.join(out, "model_final.pth"))
    assert resolve_pretrained(dataclasses.replace(cfg, teacher=t), progress=False).teacher.backbone_weights is None
    assert resolve_pretrained(cfg, student=False, progress=False).model.backbone_weights is None
    t0 = dataclasses.replace(cfg.model, weights=None)
    resolved = resolve_pretrained(dataclasses.replace(cfg, teacher=t0), progress=False)
    assert resolved.teacher.backbone_weights == resolved.model.backbone_weights


def test_unresolved_keyword_is_a_clear_error():
    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match="backbone_weights: pretrain"):
        build_model(cfg.model, 3)
