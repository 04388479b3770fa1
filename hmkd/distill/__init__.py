"""Distillation methods under one interface (:class:`Distiller`) and their table.

Public: :data:`METHODS` (``{name: class}``), :data:`DESCRIPTIONS`, :func:`build_distiller`,
:func:`needs_teacher`, :func:`method_class`, :func:`register` (for a method of your own), and the
:class:`Distiller` / :class:`DistillInputs` interface. Importing this package registers the
built-in methods (none, fitnet, fgd, icd, hmkd).
"""

from hmkd.distill.base import DistillInputs, Distiller
from hmkd.distill.registry import DESCRIPTIONS, METHODS, build_distiller, method_class, needs_teacher, register

# built-in methods: importing them registers them
from hmkd.distill import fitnet_distiller, fgd_distiller, icd, hmkd  # noqa: E402,F401  isort: skip

__all__ = [
    "DESCRIPTIONS",
    "METHODS",
    "DistillInputs",
    "Distiller",
    "build_distiller",
    "method_class",
    "needs_teacher",
    "register",
]
