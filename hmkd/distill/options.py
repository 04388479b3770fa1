"""The base of every method's ``Options`` dataclass and the validation hook they all share.

A method's options are read from ``distill.options`` by :func:`hmkd.config.parse_method_options`, the
one place that does it (unknown names and wrong types are refused there). What each option accepts
is declared on its field with :func:`~hmkd.allowed.allowed` (``heads: int = allowed(8, ge=1)``;
:func:`levels_option` for a list of FPN levels), and :meth:`MethodOptions.check` refuses a value
outside it; a subclass's ``check`` adds what relates one option to another (``hidden`` divisible by
``heads`` ...). The check runs when the config is read (:func:`hmkd.config.check_method_options`)
and again when a distiller is built (:class:`~hmkd.distill.base.Distiller`); ``docs/CONFIG.md``
shows the same declarations. Every refusal is a one-line :class:`~hmkd.errors.ConfigError` of the form
``distill.options.KEY must be WHAT, got VALUE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from hmkd.allowed import allowed, check_fields
from hmkd.errors import ConfigError
from hmkd.models.backbones import LEVELS

__all__ = ["MethodOptions", "NoOptions", "level_option", "levels_option", "refuse"]


def refuse(key: str, what: str, value: Any) -> NoReturn:
    """Raise the one-line ConfigError ``distill.options.KEY must be WHAT, got VALUE``."""
    raise ConfigError(f"distill.options.{key} must be {what}, got {value!r}")


def levels_option(default: list[str] | None = None) -> Any:
    """A field holding a non-empty list of FPN level names (P2 ... P7) without repeats, or None."""
    return allowed(default, one_of=LEVELS, nonempty=True, unique=True, noun="FPN levels")


def level_option(default: str | None = None) -> Any:
    """A field naming one FPN level (P2 ... P7), or None."""
    return allowed(default, one_of=LEVELS)


@dataclass
class MethodOptions:
    """Base of every method's options: subclasses add fields (declared with
    :func:`~hmkd.allowed.allowed`) and extend :meth:`check` with relations between them."""

    def check(self) -> None:
        """Refuse a value outside what its field declares (called when the config is read and when
        the distiller is built); subclasses call this first, then check their relations."""
        check_fields(self, "distill.options.")


@dataclass
class NoOptions(MethodOptions):
    """The ``none`` method has no options."""
