"""Distillation methods under one interface (:class:`Distiller`) and their table.

Public: :data:`METHODS` (``{name: class}``), :data:`DESCRIPTIONS`, :func:`build_distiller`,
:func:`needs_teacher`, :func:`method_class`, :func:`register` (for a method of your own),
:func:`total_loss` (a step's loss without its ``metric.*`` measurements), and the
:class:`Distiller` / :class:`DistillInputs` / :class:`MethodOptions` interface. Importing this package registers the
built-in methods (none, fitnet, fgd, icd, hmkd).

Layout: one module per method (``fitnet``, ``fgd``, ``icd``, ``hmkd``: its options and its
distiller); the parts they share each in their own module: ``base`` (the interface), ``options``
(the options base and its validation hook), ``adapter``, ``masks``, ``losses``, ``gcblock``,
``inquiry`` (Inquiry Head), ``decoder`` (the instance-conditional matching decoder of ICD and HMKD,
its options, optimiser and the student-side value projection), ``positional`` (sine encodings)
and ``common`` (what is asked of a detector: levels, strides, kind, class count).
"""

from importlib import import_module

from hmkd.distill.base import DistillInputs, Distiller, total_loss
from hmkd.distill.options import MethodOptions
from hmkd.distill.registry import DESCRIPTIONS, METHODS, build_distiller, method_class, needs_teacher, register

# the built-in methods, one module each: importing them registers them
for _method in ("fitnet", "fgd", "icd", "hmkd"):
    import_module(f"hmkd.distill.{_method}")
del _method

__all__ = [
    "DESCRIPTIONS",
    "METHODS",
    "DistillInputs",
    "Distiller",
    "MethodOptions",
    "build_distiller",
    "method_class",
    "needs_teacher",
    "register",
    "total_loss",
]
