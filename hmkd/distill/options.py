"""The base of every method's ``Options`` dataclass and the validation hook they all share.

A method's options are read from ``distill.options`` by :func:`hmkd.config.from_dict` (unknown names
and wrong types are refused there). Values that type-check but mean nothing (a negative weight, zero
heads, an FPN level that does not exist ...) are refused by :meth:`MethodOptions.check`, which
:class:`~hmkd.distill.base.Distiller` calls when a distiller is built. Every refusal is a one-line
:class:`~hmkd.errors.ConfigError` of the form ``distill.options.KEY must be WHAT, got VALUE``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from hmkd.errors import ConfigError
from hmkd.models.backbones import LEVELS

__all__ = ["MethodOptions", "NoOptions", "refuse"]


def refuse(key: str, what: str, value: Any) -> NoReturn:
    """Raise the one-line ConfigError ``distill.options.KEY must be WHAT, got VALUE``."""
    raise ConfigError(f"distill.options.{key} must be {what}, got {value!r}")


@dataclass
class MethodOptions:
    """Base of every method's options: subclasses add fields and extend :meth:`check`."""

    def check(self) -> None:
        """Refuse meaningless values (called when the distiller is built). Nothing to check here."""

    # -- helpers for check() --------------------------------------------------------------------
    def _number(self, key: str, *, low: float, strict: bool = False, high: float | None = None) -> None:
        """``key`` (if not None) is a finite number ``>= low`` (``> low`` if ``strict``), ``< high``."""
        v = getattr(self, key)
        if v is None:
            return
        ok = math.isfinite(v) and (v > low if strict else v >= low) and (high is None or v < high)
        if not ok:
            what = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            refuse(key, what, v)

    def _nonnegative(self, *keys: str) -> None:
        for key in keys:
            self._number(key, low=0.0)

    def _positive(self, *keys: str) -> None:
        for key in keys:
            self._number(key, low=0.0, strict=True)

    def _choice(self, key: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        if getattr(self, key) not in allowed:
            refuse(key, f"one of {', '.join(allowed)}", getattr(self, key))

    def _level(self, key: str) -> None:
        """``key`` (if not None) names an FPN level (P2 ... P7)."""
        v = getattr(self, key)
        if v is not None and v not in LEVELS:
            refuse(key, f"one of {', '.join(LEVELS)}", v)

    def _levels(self, key: str) -> None:
        """``key`` (if not None) is a non-empty list of FPN level names without repeats."""
        v = getattr(self, key)
        if v is None:
            return
        if not v:
            refuse(key, "a non-empty list of FPN levels (leave it out for the default)", v)
        bad = [l for l in v if l not in LEVELS]
        if bad:
            refuse(key, f"a list of FPN levels ({', '.join(LEVELS)})", bad[0])
        if len(set(v)) != len(v):
            refuse(key, "a list without repeated levels", v)


@dataclass
class NoOptions(MethodOptions):
    """The ``none`` method has no options."""
