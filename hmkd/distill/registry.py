"""The table of distillation methods: ``{name: Distiller subclass}``, listable from the CLI."""

from __future__ import annotations

from typing import Any

from torch import nn

from hmkd.config import from_dict
from hmkd.distill.base import Distiller
from hmkd.errors import ConfigError

METHODS: dict[str, type[Distiller]] = {"none": Distiller}
DESCRIPTIONS: dict[str, str] = {"none": "no distillation: the student's own detection losses"}


def register(name: str, description: str):
    """Class decorator adding a Distiller subclass to :data:`METHODS`."""

    def deco(cls: type[Distiller]) -> type[Distiller]:
        cls.name = name
        METHODS[name] = cls
        DESCRIPTIONS[name] = description
        return cls

    return deco


def build_distiller(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    options: dict[str, Any] | None = None,
    **kw: Any,
) -> Distiller:
    """Build method ``method`` around ``student`` and ``teacher``; ``options`` validated by its type."""
    _load_builtin()
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    cls = METHODS[method]
    opts = from_dict(cls.Options, {**(options or {}), **kw}, src="config", prefix="distill.options.")
    return cls(student, teacher, opts)


def _load_builtin() -> None:
    """Import the built-in methods so that they register themselves."""
    import importlib

    for mod in ("hmkd.distill.fitnet_distiller", "hmkd.distill.fgd_distiller", "hmkd.distill.hmkd", "hmkd.distill.icd"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
