"""The command line takes ``key=value`` overrides before and after options, in the order given, and
still refuses what is neither an option nor an override."""

from __future__ import annotations

import pytest

from hmkd.cli import parse_args


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
