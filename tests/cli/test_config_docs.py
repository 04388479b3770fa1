"""Every config key documented once (docs/CONFIG.md, generated and checked here), ``hmkd config
show``, and the command line's own manners: help on every option, --version, optional overrides,
``hmkd train`` saying that it distils."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
import yaml

from hmkd.cli import build_parser, main
from hmkd.config import load_config, to_dict
from hmkd.config_docs import KEY_DOCS, config_keys, declaration, method_option_fields, render_markdown
from hmkd.distill import METHODS

REPO = Path(__file__).resolve().parents[2]
BUILTIN = [m for m, cls in METHODS.items() if cls.__module__.startswith("hmkd.")]


def test_docs_config_md_is_current() -> None:
    """docs/CONFIG.md is render_markdown()'s output; after changing a key or its doc, regenerate it:
    ``python -c "from hmkd.config_docs import render_markdown; open('docs/CONFIG.md','w').write(render_markdown())"``."""
    assert (REPO / "docs" / "CONFIG.md").read_text() == render_markdown()


def test_every_key_is_documented_and_no_doc_is_stale() -> None:
    keys = [k for k, _, _ in config_keys()]
    assert sorted(set(keys) - set(KEY_DOCS)) == [], "config keys without a line in hmkd.config_docs.KEY_DOCS"
    assert sorted(set(KEY_DOCS) - set(keys)) == [], "KEY_DOCS lines for keys that do not exist"
    assert all(help_ for _, help_ in KEY_DOCS.values())


def test_allowed_values_come_from_the_declarations_the_checks_use() -> None:
    """A key that declares its range (hmkd.allowed) has no hand-written allowed text: the docs print
    the declaration the config's checks use (tests/config/test_config_ranges.py walks those)."""
    stale = [k for k, (allowed, _) in KEY_DOCS.items() if allowed and declaration(k) is not None]
    assert stale == []
    text = (REPO / "docs" / "CONFIG.md").read_text()
    for row in ("| `model.fpn_channels` | `256` | integer >= 1 (fcos: a multiple of 32) |",
                "| `model.score_thresh` | `0.05` | number >= 0 and < 1 |",
                "| `train.momentum` | `0.9` | number >= 0 and < 1 |",
                "| `pretrain.synth.n_val` | `50` | integer >= 0 |",  # the pretrain section's own default
                "| `inquiry_threshold` | `0.5` | number > 0 and < 1 |",
                "| `displacement` | `[1.5, 3.0]` | [low, high] with 0 <= low <= high |"):
        assert row in text, row


def test_every_method_option_is_explained_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [f"{m}.{n}" for m in BUILTIN for n, _, _ in method_option_fields(m) if f"`{n}`" not in readme]
    assert missing == []


# Mentions that look like keys but are not: the error examples, Python attributes, a loss term's name.
_NOT_KEYS = {"train.lrr", "teacher.backbon", "data.num_classes", "distill.small_attn_p2", "teacher.pth"}


def test_the_docs_name_only_keys_that_exist() -> None:
    """README.md and docs/CONFIG.md name no key the config does not have (the README once named
    ``data.scales``)."""
    keys = {k for k, _, _ in config_keys()}
    keys |= {"teacher." + k[len("model."):] for k in keys if k.startswith("model.")}
    options = {n for m in BUILTIN for n, _, _ in method_option_fields(m)}
    bad = []
    for doc in ("README.md", "docs/CONFIG.md"):
        for m in re.finditer(r"(?<![\w./-])((?:model|teacher|data|train|distill)\.[a-z_][a-z0-9_.]*[a-z0-9_])",
                             (REPO / doc).read_text()):
            key = m.group(1)
            if key in _NOT_KEYS:
                continue
            if key.startswith("distill.options."):
                ok = key.split(".")[2] in options
            else:
                ok = key in keys
            if not ok:
                bad.append(f"{doc}: {key}")
    assert bad == []


def test_config_show_prints_every_key_its_default_and_allowed_values(tmp_path, capsys) -> None:
    cfg_path = REPO / "configs" / "synth" / "hmkd_r18.yaml"
    assert main(["config", "show", str(cfg_path), "train.lr=0.01", "distill.options.alpha=2"]) == 0
    text = capsys.readouterr().out
    for key, _, _ in config_keys():
        leaf = key.split(".")[-1]
        assert re.search(rf"^\s*{leaf}:", text, re.M), key
    assert re.search(r"^  lr: 0.01 +# default 0.001; number > 0$", text, re.M)
    assert re.search(r"^  detector: fcos +# default; faster_rcnn \| mask_rcnn \| retinanet \| fcos \| torchvision:<builder>$", text, re.M)
    assert re.search(r"^    alpha: 2.0 +# default 1.0; number >= 0$", text, re.M)
    assert re.search(r"^    fakes: random +# default; random \| displaced \| mixed$", text, re.M)
    assert re.search(r"^    heads: 8 +# default; integer >= 1$", text, re.M)  # an option left at its default is shown
    assert re.search(r"^    hidden: 256 +# default; a positive multiple of 16$", text, re.M)
    assert re.search(r"^  synth:\n    n_train: 1000 +# default; integer >= 0$", text[text.index("\npretrain:"):], re.M)
    assert re.search(r"^    n_val: 50 +# default; integer >= 0$", text[text.index("\npretrain:"):], re.M)
    # what it prints is the config itself: it loads back to the same resolved config
    (tmp_path / "shown.yaml").write_text(text)
    again, orig = load_config(str(tmp_path / "shown.yaml")), load_config(str(cfg_path), ["train.lr=0.01", "distill.options.alpha=2"])
    a, b = to_dict(again), to_dict(orig)
    assert a["distill"]["options"] == {n: (2.0 if n == "alpha" else d) for n, _, d in method_option_fields("hmkd")}
    a["distill"]["options"] = b["distill"]["options"] = {}
    assert a == b


def test_config_show_names_a_typo(capsys) -> None:
    assert main(["config", "show", str(REPO / "configs" / "synth" / "student_r18.yaml"), "teacher.backbon=resnet50"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hmkd: error: command line: unknown key 'teacher.backbon' (did you mean 'teacher.backbone'?)")


def _actions(parser: argparse.ArgumentParser, path: str = "hmkd"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help() -> None:
    missing = [f"{path} {a.option_strings or a.dest}" for path, a in _actions(build_parser()) if not a.help]
    assert missing == []


def test_version_and_optional_overrides(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.match(r"hmkd \d+\.\d+\.\d+ \(torch .*, torchvision .*, python .*\)$", capsys.readouterr().out.strip())
    with pytest.raises(SystemExit):
        main(["train"])
    err = capsys.readouterr().err
    assert "the following arguments are required: config" in err and "overrides" not in err


def test_hmkd_train_with_a_distillation_method_says_so(tmp_path, caplog) -> None:
    cfg = tmp_path / "kd.yaml"
    cfg.write_text(yaml.safe_dump({"distill": {"method": "fitnet"}, "train": {"lrr": 1}}))
    with caplog.at_level(logging.WARNING, logger="hmkd"):
        assert main(["train", str(cfg), "train.lrr=2"]) == 2  # the typo stops it before any work
    cfg.write_text(yaml.safe_dump({"distill": {"method": "fitnet"}, "train": {"iters": -1}}))
    with caplog.at_level(logging.WARNING, logger="hmkd"):
        assert main(["train", str(cfg)]) == 2  # train.iters must be >= 0: refused when the config is read
    assert not any("sets distill.method" in r.getMessage() for r in caplog.records)
    cfg.write_text(yaml.safe_dump({"distill": {"method": "fitnet"}}))
    with caplog.at_level(logging.WARNING, logger="hmkd"):
        assert main(["train", str(cfg)]) == 2  # fitnet needs a teacher: stops before any data is read
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sets distill.method 'fitnet': this run distils from teacher.weights" in m for m in said), said
