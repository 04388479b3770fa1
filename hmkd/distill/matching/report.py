"""``hmkd fit-decoder``: fit a method's matching decoder on the frozen teacher (or reuse the cached fit)
and report how well it matches, beside an untrained decoder of the same options."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from hmkd.distill.matching.fit import prepare_decoder
from hmkd.distill.matching.quality import measure_decoder, quality_markdown
from hmkd.errors import ConfigError
from hmkd.utils import write_json, write_text

__all__ = ["build_decoder_method", "fit_decoder_report"]

logger = logging.getLogger(__name__)


def build_decoder_method(cfg: Any, train_set: Any, device: torch.device):
    """The config's distiller as a run builds it (:func:`hmkd.distill.build.build_run`: student,
    teacher with its weights, options, teacher precision; no decoder fitted yet), checked to have a
    decoder."""
    from hmkd.data.at_hand import class_count
    from hmkd.distill.build import build_run
    from hmkd.distill.matching.method import DecoderDistiller

    method = cfg.distill.method
    if cfg.teacher is None or not cfg.teacher.weights:
        raise ConfigError("hmkd fit-decoder needs the trained teacher: set teacher.weights to its checkpoint")
    distiller = build_run(cfg, class_count(cfg, train_set, check=True), device=device).distiller
    if not isinstance(distiller, DecoderDistiller):
        raise ConfigError(f"distill.method {method!r} has no matching decoder (icd and hmkd have one)")
    return distiller


def fit_decoder_report(
    cfg: Any,
    *,
    out: str | None = None,
    quality_images: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit (or reuse) the decoder of ``cfg``'s method and measure it and an untrained one.

    ``out``: where the fitted decoder goes (default: the cache, see :mod:`hmkd.distill.matching.fit`);
    the report goes beside it as ``<file>.quality.json`` and ``.md``. Returns the report.
    """
    from hmkd.data import build_data

    device = torch.device(cfg.device)
    train_set = build_data(cfg, train=True)
    val_set = build_data(cfg, train=False)
    distiller = build_decoder_method(cfg, train_set, device)
    untrained = copy.deepcopy(distiller.decoder_state())
    opts = distiller.options
    if opts.decoder_fit not in ("none", "auto") and out is None:
        logger.info("distill.options.decoder_fit is a file (%s): measuring it", opts.decoder_fit)
    elif opts.decoder_fit == "none":
        opts.decoder_fit = "auto"  # the command's point is the fit
    path = prepare_decoder(distiller, cfg, train_set, device, progress=progress, output=out)
    fitted = distiller.decoder_state()
    bs = max(2, int(cfg.data.eval_batch_size))
    results = {}
    for label, state in (("untrained", untrained), ("fitted", fitted)):
        distiller.load_decoder_state(state, label)
        results[label] = measure_decoder(distiller, val_set, device=device, batch_size=bs, max_images=quality_images,
                                         seed=cfg.seed)
    report = {"decoder": os.path.abspath(path), "method": distiller.name, "spec": distiller.fit_spec(),
              "quality_images": min(quality_images, len(val_set)), "results": results}
    md = (f"# Matching decoder quality ({distiller.name})\n\nDecoder: `{path}`; {report['quality_images']} "
          f"validation images.\n\n" + quality_markdown(results))
    write_json(path + ".quality.json", report)
    write_text(path + ".quality.md", md)
    report["markdown"] = md
    return report
