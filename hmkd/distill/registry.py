"""The table of distillation methods: ``{name: Distiller subclass}``, listable from the CLI.

A method registers itself with :func:`register` when its module is imported; importing
:mod:`hmkd.distill` imports every built-in method, so the table is complete for any caller.
:func:`register` also records the method's ``Options`` in the config's own table
(:data:`hmkd.config.METHOD_OPTIONS`), which is how the config checks ``distill.method`` and
``distill.options`` without importing this package.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hmkd.config import register_method_options
from hmkd.distill.base import Distiller
from hmkd.distill.options import MethodOptions
from hmkd.errors import ConfigError, did_you_mean

METHODS: dict[str, type[Distiller]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str):
    """Class decorator adding a Distiller subclass to :data:`METHODS`.

    The class must be a :class:`Distiller` whose ``Options`` derive from
    :class:`~hmkd.distill.options.MethodOptions` (so that its options are validated like every
    other method's); that is checked here, when the method is defined, not at its first use.
    """

    def deco(cls: type[Distiller]) -> type[Distiller]:
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register({name!r}): {cls!r} is not a Distiller subclass")
        opts = getattr(cls, "Options", None)
        if not (isinstance(opts, type) and issubclass(opts, MethodOptions)):
            raise TypeError(f"register({name!r}): {cls.__name__}.Options must derive from MethodOptions, got {opts!r}")
        cls.name = name
        METHODS[name] = cls
        DESCRIPTIONS[name] = description
        register_method_options(name, opts)
        return cls

    return deco


register("none", "no distillation: the student's own detection losses")(Distiller)


def method_class(method: str) -> type[Distiller]:
    """The Distiller class of ``method``; :class:`ConfigError` naming the known ones if unknown."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(METHODS)}{did_you_mean(method, list(METHODS))})")
    return METHODS[method]


def needs_teacher(method: str) -> bool:
    """Whether ``method`` needs a trained teacher (``none`` does not); ConfigError if unknown."""
    return bool(method_class(method).needs_teacher)


def build_distiller(
    method: str,
    *,
    student: nn.Module,
    teacher: nn.Module | None = None,
    options: dict[str, Any] | None = None,
) -> Distiller:
    """Build method ``method`` around ``student`` (trained) and ``teacher`` (frozen).

    Both detectors are keyword-only: two detectors of the same class count could otherwise be
    swapped silently, training the teacher. ``options`` are read into the method's options type
    (unknown names and wrong types refused) and validated by its ``check()`` when the distiller is
    built (meaningless values refused), both by :class:`Distiller`; either is a one-line
    :class:`ConfigError` naming ``distill.options.KEY``.
    """
    cls = method_class(method)
    return cls(student=student, teacher=teacher, options=dict(options or {}))
