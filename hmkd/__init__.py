"""hmkd: Hierarchical Matching Knowledge Distillation for small object detection.

The public API (everything else is private by convention)::

    import hmkd
    distiller = hmkd.HMKD(teacher=teacher, student=student, heads=8)  # or hmkd.distiller("fgd", teacher=..., student=...)
    losses = distiller(images, targets, iteration=it)                  # flat dict: student.*, distill.*, aux.*, metric.*
    hmkd.total_loss(losses).backward()                                  # every term but the metric.* measurements

See the README section "Use HMKD in your own training loop".
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hmkd.config import Config, load_config
from hmkd.distill.base import Distiller
from hmkd.distill import METHODS, build_distiller, total_loss
from hmkd.errors import CheckpointError, ConfigError, DataError, HMKDError, NonFiniteLossError
from hmkd.models import DetectorTap, build_detector, build_model, load_weights

__version__ = "0.1.0"


def distiller(method: str, *, teacher: nn.Module | None, student: nn.Module, **options: Any) -> Distiller:
    """Wrap ``student`` (trained) and ``teacher`` (frozen) in distillation method ``method``.

    Args:
        method: ``none``, ``fitnet``, ``fgd``, ``icd`` or ``hmkd`` (see ``hmkd list methods``).
        teacher: a trained torchvision detection model with an FPN (ours or torchvision's own);
            it is put in eval mode, frozen and kept out of ``parameters()``/``state_dict()``.
        student: the torchvision detection model to train (same classes as the teacher).
        **options: the method's options (e.g. HMKD's ``heads``, ``start_level``, ``alpha``,
            ``beta``; see the README's option table). Unknown names, wrong types and meaningless
            values (``heads=0``, a negative weight ...) raise a one-line :class:`ConfigError`.

    Returns:
        A :class:`Distiller` (an ``nn.Module``). In train mode, ``distiller(images, targets,
        iteration)`` returns the flat loss dict of one step; optimise
        ``distiller.student_parameters() + distiller.distiller_parameters()`` with your optimiser
        and call ``distiller.step_extra_optimizers()`` after it (it steps the method's own
        optimisers, e.g. the matching decoder's AdamW of ICD and HMKD; none for the others).
        Call ``distiller.extra_schedulers(total_iters)`` once before training to give those
        optimisers their schedule over the run (ICD: cosine to 0; it also sizes ICD's bypass
        window, which counts the ``iteration`` you pass).
    """
    return build_distiller(method, student=student, teacher=teacher, options=options)


def HMKD(*, teacher: nn.Module, student: nn.Module, **options: Any) -> Distiller:  # noqa: N802 - a constructor
    """HMKD around ``teacher`` and ``student`` (keyword-only, so they cannot be swapped);
    shorthand for ``distiller("hmkd", teacher=teacher, student=student, **options)``."""
    return build_distiller("hmkd", student=student, teacher=teacher, options=options)


__all__ = [
    "HMKD",
    "METHODS",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "DetectorTap",
    "Distiller",
    "HMKDError",
    "NonFiniteLossError",
    "build_detector",
    "build_model",
    "distiller",
    "load_config",
    "load_weights",
    "total_loss",
]
