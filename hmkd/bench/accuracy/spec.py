"""The config of each benchmark run, and the comparison that decides whether a run folder holds it.

Every run folder records the config it was started with (``bench_run.json``: ``{"spec": ...,
"config": ...}``). ``spec`` is :func:`run_spec` of the run's config: the config as JSON without the
keys that do not change a result (:data:`VOLATILE`: names, folders, devices, logging). A finished
or started run is reused only when :func:`spec_diff` of ``with_defaults(stored spec)`` and the
spec the benchmark would run now is empty; :func:`with_defaults` fills in the config keys added
after the run was made, at their defaults, so that such a key does not make an old run "another
config".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from hmkd.bench.accuracy.plan import Variant
from hmkd.config import Config, DistillConfig, ModelConfig, to_dict
from hmkd.errors import ConfigError

__all__ = ["VOLATILE", "run_config", "run_spec", "spec_diff", "teacher_config", "with_defaults"]

#: keys of a run's config that do not change its result (ignored when deciding to reuse a run)
VOLATILE = (
    ("name",), ("output_dir",), ("device",), ("data", "workers"), ("data", "root"), ("data", "eval_batch_size"),
    ("train", "log_period"), ("train", "ckpt_period"), ("train", "tensorboard"), ("train", "keep_last_checkpoint"),
    ("data", "check_images"),
)


def teacher_config(cfg: Config, teacher_cfg: Config | None, teacher_iters: int | None) -> Config:
    """The config the teacher is trained with (when no checkpoint is given)."""
    if teacher_cfg is not None:
        t = copy.deepcopy(teacher_cfg)
        if t.distill.method != "none":
            raise ConfigError(f"teacher config: distill.method must be 'none' to train a teacher, got {t.distill.method!r}")
        if cfg.teacher is not None:
            skip = {"weights", "backbone_weights", "num_classes"}
            a, b = to_dict(t.model), to_dict(cfg.teacher)
            diff = [k for k in a if k not in skip and a[k] != b[k]]
            if diff:
                detail = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in diff[:4])
                raise ConfigError(f"the teacher config's model differs from the student config's teacher section ({detail})")
        if teacher_iters is not None:
            t.train.iters = int(teacher_iters)
        t.teacher = None
        return t
    if cfg.teacher is None:
        raise ConfigError("the benchmark needs a 'teacher' section (the teacher's model), or --teacher CKPT with it")
    t = copy.deepcopy(cfg)
    t.name = f"{cfg.name}_teacher"
    t.model = dataclasses.replace(cfg.teacher, weights=None)
    t.teacher = None
    t.distill = DistillConfig()
    t.train.iters = int(teacher_iters) if teacher_iters is not None else 3 * cfg.train.iters
    if cfg.train.iters > 0 and cfg.train.ckpt_period:  # as many checkpoints per run as the students
        t.train.ckpt_period = max(1, round(cfg.train.ckpt_period * t.train.iters / cfg.train.iters))
    return t


def run_config(cfg: Config, v: Variant, seed: int, teacher_weights: str | None, run_dir: str) -> Config:
    """The config of row ``v`` on ``seed``, trained into ``run_dir`` against the teacher ``teacher_weights``."""
    rc = copy.deepcopy(cfg)
    rc.seed = int(seed)
    rc.name = f"{cfg.name}-{v.key}_s{seed}"
    rc.output_dir = run_dir
    if v.method == "none" and not v.init_student:  # no teacher: nothing else of the distill section applies
        rc.distill = DistillConfig(method="none")
        rc.teacher = None
    elif v.method == "none":  # no-KD, but the student starts from the teacher's FPN (and heads)
        rc.distill = DistillConfig(method="none", init_student=v.init_student)
        if rc.teacher is None:
            raise ConfigError(f"row {v.key!r} (distill.init_student {v.init_student}) needs a 'teacher' section in the config")
        rc.teacher = dataclasses.replace(rc.teacher, weights=os.path.abspath(teacher_weights) if teacher_weights else None)
    else:  # the variant's method and options; the rest (teacher_dtype, init_student, ...) as the config says
        rc.distill = dataclasses.replace(cfg.distill, method=v.method, options=dict(v.options))
        if v.init_student:
            rc.distill.init_student = v.init_student
        if rc.teacher is None:
            raise ConfigError(f"method {v.method!r} needs a 'teacher' section in the config")
        rc.teacher = dataclasses.replace(rc.teacher, weights=os.path.abspath(teacher_weights) if teacher_weights else None)
    return rc


def run_spec(cfg: Config) -> dict[str, Any]:
    """``cfg`` as JSON without the :data:`VOLATILE` keys (what ``bench_run.json`` stores as ``spec``)."""
    d = json.loads(json.dumps(to_dict(cfg), default=str))
    for path in VOLATILE:
        node = d
        for k in path[:-1]:
            node = node.get(k) or {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return d


def with_defaults(spec: Any) -> Any:
    """A stored spec with the config keys it predates filled in with their defaults (a key added
    to the config later, at its default, does not make an old run "another config")."""
    if not isinstance(spec, dict):
        return spec
    defaults = run_spec(Config(teacher=ModelConfig()))

    def fill(node: dict, dflt: dict) -> dict:
        out = dict(node)
        for k, v in dflt.items():
            if k not in out:
                out[k] = copy.deepcopy(v)
            elif isinstance(out[k], dict) and isinstance(v, dict):
                out[k] = fill(out[k], v)
        return out

    return fill(spec, defaults)


def spec_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """``["dotted.key: old -> new", ...]`` for every leaf where ``a`` and ``b`` differ (empty: same run)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += spec_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]
