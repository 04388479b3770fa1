"""The command line takes ``key=value`` overrides before and after options, in the order given, and
still refuses what is neither an option nor an override; ``--weights`` and ``--images`` take several
values after one flag or the flag repeated, and a word among them that is no file is a one-line
error (saying where overrides go when it looks like one)."""

from __future__ import annotations

import os

import pytest
import torch

from hmkd.cli import parse_args
from hmkd.errors import ConfigError


@pytest.mark.parametrize("argv, config, overrides", [
    (["train", "c.yaml", "a=0", "--out", "x", "a=1"], "c.yaml", ["a=0", "a=1"]),
    (["train", "c.yaml", "--out", "x", "train.iters=5", "seed=2"], "c.yaml", ["train.iters=5", "seed=2"]),
    (["eval", "c.yaml", "--weights", "w.pth", "a=1", "--out", "o"], "c.yaml", ["a=1"]),
    (["bench", "accuracy", "c.yaml", "--seeds", "2", "a=1", "--out", "o", "b=2"], "c.yaml", ["a=1", "b=2"]),
])
def test_overrides_after_options(argv, config, overrides):
    args = parse_args(argv)
    assert args.config == config
    assert args.overrides == overrides


@pytest.mark.parametrize("argv, named", [
    (["train", "c.yaml", "--out", "x", "--bogus"], "--bogus"),
    (["train", "c.yaml", "--out", "x", "stray"], "stray"),
    (["list", "backbones", "a=1"], "a=1"),  # a command without overrides
])
def test_other_words_are_refused(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {named}" in capsys.readouterr().err


# -- --weights and --images: several values after one flag, or the flag repeated ------------------
@pytest.mark.parametrize("argv, weights, images, config, overrides", [
    # the command line: two checkpoints after one --weights
    (["viz", "detections", "--weights", "teacher=t.pth", "student=s.pth", "--images", "0", "3", "--out", "o"],
     ["teacher=t.pth", "student=s.pth"], ["0", "3"], None, []),
    (["viz", "detections", "--weights", "t.pth", "--weights", "s.pth", "--images", "0", "--images", "3", "--out", "o"],
     ["t.pth", "s.pth"], ["0", "3"], None, []),
    (["viz", "heatmap", "c.yaml", "--weights", "a=a.pth", "b.pth", "--out", "o", "--weights", "c=c.pth", "--images", "1"],
     ["a=a.pth", "b.pth", "c=c.pth"], ["1"], "c.yaml", []),
    # overrides before --weights and after a one-value option, in the order given
    (["viz", "detections", "c.yaml", "a=1", "--weights", "t.pth", "s.pth", "--images", "0", "--out", "o", "b=2"],
     ["t.pth", "s.pth"], ["0"], "c.yaml", ["a=1", "b=2"]),
    (["bench", "speed", "c.yaml", "a=1", "--weights", "x=x.pth", "y=y.pth", "--out", "o", "b=2"],
     ["x=x.pth", "y=y.pth"], None, "c.yaml", ["a=1", "b=2"]),
])
def test_weights_take_several_values_and_repeat(argv, weights, images, config, overrides):
    args = parse_args(argv)
    assert args.weights == weights
    assert getattr(args, "images", None) == images
    assert args.config == config and args.overrides == overrides


@pytest.fixture
def ckpts(tmp_path, monkeypatch):
    """Real (tiny) weights files: a bare state dict is a checkpoint hmkd reads."""
    monkeypatch.chdir(tmp_path)
    for p in ("t.pth", "s.pth", "runs/student/model_final.pth", "runs/hmkd/model_final.pth"):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        torch.save({"w": torch.ones(1)}, p)
    (tmp_path / "c.yaml").write_text("name: c\n")
    return tmp_path


def test_named_weights_names_and_files(ckpts):
    from hmkd.cli.inputs import named_weights as _named_weights

    assert _named_weights(["teacher=t.pth", "s.pth"]) == [("teacher", "t.pth"), ("s", "s.pth")]
    # two files of the same name are named after their folders
    assert _named_weights(["runs/student/model_final.pth", "runs/hmkd/model_final.pth"]) == [
        ("student", "runs/student/model_final.pth"), ("hmkd", "runs/hmkd/model_final.pth")]
    with pytest.raises(ConfigError, match="the name 'a' is given to two checkpoints"):
        _named_weights(["a=t.pth", "a=s.pth"])


def _run(argv, capsys):
    from hmkd.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def test_missing_weights_file_is_one_line_naming_it(ckpts, capsys):
    rc, err = _run(["viz", "detections", "--weights", "t.pth", "student=missing.pth", "--images", "0", "--out", "o"],
                   capsys)
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("hmkd: error: --weights student=missing.pth: checkpoint file not found: missing.pth")
    # an override typed among the checkpoints is told where overrides go
    rc, err = _run(["viz", "heatmap", "c.yaml", "--weights", "t.pth", "model.score_thresh=0.1", "--images", "0",
                    "--out", "o"], capsys)
    assert rc == 2 and err.count("\n") == 0
    assert "checkpoint file not found: 0.1" in err and "give key=value overrides before --weights" in err
    rc, err = _run(["viz", "detections", "--weights", "t.pth", "--images", "0", "model.score_thresh=0.1", "--out", "o"],
                   capsys)
    assert rc == 2 and "--images model.score_thresh=0.1: image file not found" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_override_typo_keeps_its_did_you_mean(ckpts, capsys, where):
    typo = ["model.score_thres=0.1"]
    argv = ["viz", "detections", "c.yaml", *(typo if where == "before" else []), "--weights", "t.pth", "s.pth",
            "--images", "0", "--out", "o", *(typo if where == "after" else [])]
    rc, err = _run(argv, capsys)
    assert rc == 2 and err.count("\n") == 0
    assert "unknown key 'model.score_thres'" in err and "did you mean 'model.score_thresh'" in err
