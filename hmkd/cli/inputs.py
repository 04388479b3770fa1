"""What the commands read from their arguments: the config (:func:`load_cfg`), ``--weights
[NAME=]CKPT`` (:func:`named_weights`), ``--images`` words (:func:`check_image_words`), and the
optional config file of ``eval`` / ``viz`` / ``export`` (:func:`config_or_override`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from hmkd.errors import ConfigError, HMKDError

__all__ = ["OVERRIDE_PLACE", "check_image_words", "config_or_override", "load_cfg", "named_weights"]

OVERRIDE_PLACE = ("the words after --weights or --images up to the next option are its values: "
                  "give key=value overrides before --weights, or after a one-value option such as --out DIR")


def load_cfg(args: argparse.Namespace, *, need_classes: bool = False):
    """The config of a command; with ``need_classes``, ``model.num_classes`` (and the teacher's)
    filled from the data set when the config leaves it unset."""
    from hmkd.config import load_config

    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    if need_classes and cfg.model.num_classes is None:
        try:
            from hmkd.data import build_data

            n = build_data(cfg, train=False).num_classes
        except HMKDError:
            n = None  # no data set at hand: the weights files may still tell
        cfg.model.num_classes = n
        if cfg.teacher is not None and cfg.teacher.num_classes is None:
            cfg.teacher.num_classes = n
    return cfg


def config_or_override(args: argparse.Namespace) -> None:
    """eval / viz / export take the config file optionally: with none given, argparse hands the
    first ``key=value`` override to ``config``; move it back."""
    c = args.config
    if c is not None and "=" in c and not os.path.isfile(c):
        args.overrides = [c, *(args.overrides or [])]
        args.config = None


def named_weights(items: Sequence[str] | None) -> list[tuple[str, str]]:
    """``--weights`` values as ``[(name, checkpoint file)]``, in the order given.

    ``NAME=CKPT`` keeps its name; a bare ``CKPT`` (also one whose path holds a ``=``) is named
    after its file (``t.pth`` -> ``t``), or after its folder where two files share a name
    (``runs/student/model_final.pth`` -> ``student``), then numbered. Every checkpoint must be an
    existing file: a missing one is a one-line :class:`ConfigError` naming it, which says where
    ``key=value`` overrides go when the word has a ``=`` (one typed among the checkpoints).
    """
    pairs: list[tuple[str | None, str, str]] = []  # (given name or None, path, word)
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or os.path.isfile(item):
            name, path = "", item
        if not path:
            raise ConfigError(f"--weights {item}: no checkpoint file after the '='")
        if not os.path.isfile(path):
            hint = f" ({OVERRIDE_PLACE})" if sep and not os.path.isfile(item) else ""
            raise ConfigError(f"--weights {item}: checkpoint file not found: {path}{hint}")
        pairs.append((name or None, path, item))
    given = [n for n, _, _ in pairs if n is not None]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ConfigError(f"--weights: the name {twice[0]!r} is given to two checkpoints; name each one differently")
    stems = [os.path.splitext(os.path.basename(p))[0] for n, p, _ in pairs if n is None]
    taken = set(given)
    out = []
    for name, path, _ in pairs:
        if name is None:
            stem = os.path.splitext(os.path.basename(path))[0] or "model"
            folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
            name = stem if stems.count(stem) == 1 and stem not in taken else folder or stem
            base, k = name, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out.append((name, path))
    return out


def check_image_words(values: Sequence[str]) -> None:
    """``--images`` takes the words up to the next option: a ``key=value`` word among them that is
    no file is an override typed in the wrong place (one line saying where overrides go)."""
    for v in values:
        if "=" in v and not os.path.isfile(v):
            raise ConfigError(f"--images {v}: image file not found ({OVERRIDE_PLACE})")
