"""Fitting a method's matching decoder on the frozen teacher alone, once per teacher, and reusing it.

The decoder's auxiliary task reads only the teacher's maps and the ground truth, so it can be fitted
before any student exists (``hmkd fit-decoder CONFIG``), and automatically at the start of a
distillation whose ``distill.options.decoder_fit`` is ``auto``. The file is cached under
``$HMKD_CACHE/decoders`` (default ``~/.cache/hmkd/decoders``) by a key over everything the fit
depends on: the teacher checkpoint's bytes (SHA-256), the decoder's options and the method's choice
of inquiries (:meth:`~hmkd.distill.matching.method.DecoderDistiller.fit_spec`), the data section, the
student's input size and normalisation (the teacher sees the student's transformed batch); the fit
has its own seed (:data:`FIT_SEED`), so runs of any seed share it, and it leaves the run's random
streams as they were (a run that fits and one that loads the cached fit end with the same weights).
Any later run with the same key (ICD or HMKD, any student) loads it instead of fitting again.

A fitted file is a dict: ``format`` (:data:`FITTED_FORMAT`), ``key``,
``spec``, ``teacher`` (path and SHA-256), ``state_dict`` (the decoder modules'), ``fit`` (iterations,
seconds, the last losses); written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import torch
from tqdm import tqdm

from hmkd.distill.base import Distiller, small_flags
from hmkd.distill.matching.decoder import MatchingDecoder
from hmkd.engine.checkpoint import load_checkpoint, save_checkpoint, seed_everything
from hmkd.engine.loaders import close_loader_iter, next_batch, seeded_loader, to_device
from hmkd.engine.logging_utils import bar_wanted
from hmkd.engine.optim import clip_and_step
from hmkd.engine.sampler import mix_seed
from hmkd.errors import CheckpointError, ConfigError
from hmkd.utils import cache_root, json_safe, preserved_random_state

__all__ = ["cache_dir", "check_fitted_teacher", "fit_decoder", "fit_key", "load_fitted", "prepare_decoder", "teacher_digest",
           "transformed_batch"]

logger = logging.getLogger(__name__)

#: The ``format`` entry of a fitted decoder file.
FITTED_FORMAT = "hmkd.fitted_decoder/1"

#: The fit's own seed (its initial weights, batches, fakes): a fit depends on its key only, not on
#: the seed of the run that asked for it, so every run with the teacher shares one fit.
FIT_SEED = 0


def cache_dir() -> str:
    """Where fitted decoders are cached: ``$HMKD_CACHE/decoders`` (default ``~/.cache/hmkd/decoders``)."""
    return os.path.join(cache_root(), "decoders")


def teacher_digest(path: str) -> str:
    """SHA-256 of the teacher checkpoint file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fit_key(distiller: Distiller, cfg: Any, teacher_sha: str) -> str:
    """The cache key (24 hex digits) of a fit: see the module docstring for what it covers."""
    m = cfg.model
    spec = {
        "spec": distiller.fit_spec(),
        "teacher_sha256": teacher_sha,
        # label_map only when it is not the default, so that keys made before it existed still match
        "data": {k: v for k, v in _plain(cfg.data).items()
                 if k not in ("workers", "eval_batch_size") and not (k == "label_map" and v == "contiguous")},
        "input": {k: json_safe(getattr(m, k, None)) for k in ("min_size", "max_size", "image_mean", "image_std")},
        "fit_seed": FIT_SEED,
    }
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _plain(section: Any) -> dict[str, Any]:
    """A config section as a plain dict (dataclass or mapping)."""
    if dataclasses.is_dataclass(section):
        return json_safe(dataclasses.asdict(section))
    return json_safe(dict(section))


def transformed_batch(distiller: Distiller, images: list[torch.Tensor], targets: list[dict[str, Any]]
                      ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[tuple[int, int]], tuple[int, int]]:
    """The student's transform of a batch and the teacher's maps of it (no student forward):
    (teacher features, resized targets, image sizes, padded (H, W))."""
    student = getattr(distiller.student, "module", distiller.student)
    with torch.no_grad():
        image_list, resized = student.transform(images, [dict(t) for t in targets])
        feats = distiller.teacher_features(image_list.tensors)
    sizes = [tuple(int(v) for v in s) for s in image_list.image_sizes]
    return feats, resized, sizes, tuple(image_list.tensors.shape[-2:])


def fit_decoder(
    distiller: Distiller,
    train_set: Any,
    *,
    batch_size: int,
    device: torch.device,
    seed: int = FIT_SEED,
    iters: int | None = None,
    log_period: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``distiller``'s decoder modules on their aux task over ``train_set`` with the teacher frozen.

    The decoders start from weights drawn afresh from ``seed`` (whatever the distiller was built
    with), then AdamW at the options' ``fit_lr`` (constant), weight decay ``decoder_weight_decay``, gradients
    clipped at ``decoder_clip``; ``iters`` (default ``fit_iters``) batches of ``batch_size`` drawn
    as training draws them (seeded). Every random draw comes from ``seed`` and the global random
    streams are left as they were (:func:`hmkd.utils.preserved_random_state`): the fit is the same
    alone (``hmkd fit-decoder``) or inside a run, and a run that fits goes on as one that loads the
    cached fit. Returns ``{"iters", "seconds", "losses"}`` (the last ``log_period`` steps' mean of
    each term).
    """
    with preserved_random_state():
        seed_everything(mix_seed(seed, 43))  # anything drawing from the global streams draws from the fit's seed
        return _fit(distiller, train_set, batch_size=batch_size, device=device, seed=seed, iters=iters,
                    log_period=log_period, progress=progress)


def _fit(distiller: Distiller, train_set: Any, *, batch_size: int, device: torch.device, seed: int,
         iters: int | None, log_period: int, progress: bool) -> dict[str, Any]:
    o = distiller.options
    iters = int(iters or o.fit_iters)
    mods = distiller.decoder_modules()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, 41))
        for m in mods.modules():
            if isinstance(m, MatchingDecoder):
                m.reset_parameters()
    was_frozen = [p.requires_grad for p in mods.parameters()]
    mods.requires_grad_(True)
    mods.train()
    params = list(mods.parameters())
    opt = torch.optim.AdamW(params, lr=distiller.fit_lr, weight_decay=o.decoder_weight_decay)
    loader = seeded_loader(train_set, batch_size, seed=mix_seed(seed, 29), generator_seed=mix_seed(seed, 31))
    gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 37))
    window: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    data = iter(loader)
    bar = tqdm(total=iters, disable=not bar_wanted(progress), desc="fit decoder", dynamic_ncols=True)
    try:
        for it in range(iters):
            images, targets = to_device(*next_batch(data), device)
            feats, resized, sizes, padded = transformed_batch(distiller, images, targets)
            small = small_flags(targets, distiller.small_area)
            out = distiller.decoder_task(feats, [t["boxes"] for t in resized], [t["labels"] for t in resized], small,
                                         sizes, padded, generator=gen)
            losses = {f"{k}_{name}" if name else k: v for name, aux in out.items() for k, v in aux.losses.items()}
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            clip_and_step([(opt, params, o.decoder_clip)])
            for k, v in losses.items():
                window.setdefault(k, []).append(float(v.detach()))
            bar.update(1)
            if (it + 1) % log_period == 0 or it + 1 == iters:
                last = {k: sum(v) / len(v) for k, v in window.items()}
                window = {}
                logger.info("fit decoder %d/%d: %s", it + 1, iters, ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    finally:
        bar.close()
        close_loader_iter(data)
    for p, rg in zip(mods.parameters(), was_frozen):
        p.requires_grad_(rg)
    return {"iters": iters, "seconds": time.perf_counter() - t0, "losses": last}


def load_fitted(path: str) -> dict[str, Any]:
    """Read a fitted-decoder file; a one-line :class:`CheckpointError` when it is not one."""
    obj = load_checkpoint(path)
    if obj.get("format") != FITTED_FORMAT or "state_dict" not in obj:
        raise CheckpointError(f"{path}: not a fitted decoder (format {obj.get('format')!r}, expected {FITTED_FORMAT!r})")
    return obj


def check_fitted_teacher(fitted: dict[str, Any], source: str, teacher_weights: str, sha: str | None = None) -> str:
    """Refuse a fitted decoder (:func:`load_fitted`'s dict) that was fitted on another teacher than the
    checkpoint ``teacher_weights`` (its SHA-256 ``sha``, computed when not given): a one-line
    :class:`ConfigError` ``SOURCE: fitted on another teacher (ITS PATH), not TEACHER_WEIGHTS``.
    Whether its decoder fits the method's is :meth:`~hmkd.distill.matching.method.DecoderDistiller.load_decoder_state`'s check.
    Returns the teacher's SHA-256."""
    sha = sha if sha is not None else teacher_digest(teacher_weights)
    recorded = fitted.get("teacher", {})
    if recorded.get("sha256") != sha:
        raise ConfigError(f"{source}: fitted on another teacher ({recorded.get('path')}), not {teacher_weights}")
    return sha


def prepare_decoder(
    distiller: Distiller,
    cfg: Any,
    train_set: Any,
    device: torch.device,
    *,
    progress: bool = False,
    output: str | None = None,
) -> str | None:
    """Resolve ``distill.options.decoder_fit`` for ``distiller`` and load the fitted decoder.

    ``none``, or a method without a decoder (HMKD with ``attention_term: false``): nothing (returns
    None). A path: load it (its teacher must be this one). ``auto``: load
    the cached fit of this key, or fit now and cache it (``output`` overrides where it is written).
    Returns the file loaded.
    """
    choice = distiller.options.decoder_fit
    if (choice == "none" and output is None) or not any(True for _ in distiller.decoder_modules().parameters()):
        return None  # nothing to fit: learnt during distillation, or no decoder (attention_term: false)
    weights = getattr(cfg.teacher, "weights", None) if cfg.teacher is not None else None
    if not weights:
        raise ConfigError("distill.options.decoder_fit needs the teacher's checkpoint: set teacher.weights")
    sha = teacher_digest(weights)
    if choice not in ("none", "auto") and output is None:
        obj = load_fitted(choice)
        check_fitted_teacher(obj, f"distill.options.decoder_fit {choice}", weights, sha)
        distiller.load_decoder_state(obj["state_dict"], choice)
        return choice
    key = fit_key(distiller, cfg, sha)
    path = output or os.path.join(cache_dir(), f"{distiller.name}-{key}.pt")
    if os.path.isfile(path) and output is None:
        obj = load_fitted(path)
        distiller.load_decoder_state(obj["state_dict"], path)
        logger.info("fitted decoder: reusing %s (fitted in %.0f s)", path, obj.get("fit", {}).get("seconds", float("nan")))
        return path
    logger.info("fitting the %s decoder on the frozen teacher (%d iterations) -> %s",
                distiller.name, distiller.options.fit_iters, path)
    fit = fit_decoder(distiller, train_set, batch_size=cfg.data.batch_size, device=device, progress=progress)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint({"format": FITTED_FORMAT, "key": key, "spec": distiller.fit_spec(),
                     "teacher": {"path": os.path.abspath(weights), "sha256": sha},
                     "state_dict": distiller.decoder_state(), "fit": fit}, path)
    logger.info("fitted decoder: %s (%.0f s)", path, fit["seconds"])
    return path
