"""What a config key or a method option accepts beyond its type, declared next to its field.

A dataclass field declared with :func:`allowed` (``fpn_channels: int = allowed(256, ge=1)``) carries an
:class:`Allowed` in its metadata: its range, its names, or what its list must hold. The same
declaration is checked (:func:`check_fields`, when the config is read and when a distiller is built)
and written into ``docs/CONFIG.md`` and ``hmkd config show`` (:meth:`Allowed.doc_text`), so the two
cannot drift. A subclass that only changes a field's default keeps its base class's declaration.

Every refusal is one line, ``KEY must be WHAT, got VALUE`` (``model.fpn_channels must be >= 1, got
0``), prefixed with where the key came from when the caller knows it (``command line: ...``).
This module sits under :mod:`hmkd.config` and :mod:`hmkd.distill.options` and imports neither.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from hmkd.errors import ConfigError

__all__ = ["Allowed", "allowed", "check_fields", "declared"]

#: the metadata key of a field's :class:`Allowed`
METADATA_KEY = "allowed"


@dataclass(frozen=True)
class Allowed:
    """The values a field accepts beyond its type (None always passes where the type allows it).

    Numbers: ``ge`` / ``gt`` / ``le`` / ``lt`` bounds, ``multiple_of``; a float must also be finite.
    Names: ``one_of`` (exact), ``pattern`` (a regular expression matched in full, ignoring case and
    surrounding blanks), or ``registry`` (the names a layer above fills in: ``distill.method``'s are
    the table :data:`hmkd.config.METHOD_OPTIONS` that :mod:`hmkd.distill` fills, checked by
    :func:`hmkd.config.check_method_options`). A list: every entry is checked as above;
    ``nonempty``, ``unique`` (no repeats), ``length``, ``ordered`` (non-decreasing) constrain the list;
    ``noun`` names its entries in messages. ``words``: the allowed values in words, replacing the
    generated text in messages and docs; ``doc``: in the docs only; ``note``: added to
    the docs' text in parentheses (a range another key sets, checked where the relation is).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    one_of: tuple[str, ...] | None = None
    pattern: str | None = None
    registry: str | None = None
    nonempty: bool = False
    unique: bool = False
    length: int | None = None
    ordered: bool = False
    noun: str = "entries"
    words: str | None = None
    doc: str | None = None
    note: str | None = None

    # -- words ------------------------------------------------------------------------------------
    def bounds_text(self) -> str:
        """``>= 0 and < 1``: the numeric bounds in words (empty without bounds)."""
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        return " and ".join(parts)

    def entry_text(self) -> str:
        """What one value (or one entry of a list) must be, as a message says it."""
        if self.one_of is not None:
            return f"one of {', '.join(self.one_of)}"
        return self.bounds_text()

    def doc_text(self, tp: Any) -> str:
        """What the field accepts, for ``docs/CONFIG.md`` and ``hmkd config show``
        (``integer >= 1 or null``, ``gn | bn | frozen_bn``)."""
        if self.doc is not None or self.words is not None:
            text = self.doc if self.doc is not None else self.words
        else:
            args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
            texts = [self._doc_one(a) for a in args if a is not type(None)]
            if type(None) in args:
                texts.append("null")
            text = " or ".join(texts)
        return f"{text} ({self.note})" if self.note else text

    def _doc_one(self, tp: Any) -> str:
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (Any,)
            head = "non-empty list" if self.nonempty else "list"
            if self.length is not None:
                head = f"list of {self.length}"
            inner = self._doc_scalar(item, plural=True)
            tail = " without repeats" if self.unique else ""
            tail += ", in increasing order" if self.ordered else ""
            return f"{head} of {inner}{tail}" if inner else f"{head}{tail}"
        return self._doc_scalar(tp)

    def _doc_scalar(self, tp: Any, plural: bool = False) -> str:
        if self.one_of is not None:
            return " | ".join(self.one_of)
        noun = {int: "integer", float: "number", str: "string"}.get(tp, "value") + ("s" if plural else "")
        bounds = self.bounds_text()
        return f"{noun} {bounds}" if bounds else noun

    # -- checks -----------------------------------------------------------------------------------
    def problem(self, key: str, value: Any, *, nullable: bool = False) -> str | None:
        """The one-line refusal of ``value`` for ``key`` (without its source), or None if it passes."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return self._list_problem(key, list(value), nullable)
        why = self._entry_problem(value)
        if why is None:
            return None
        if self.words is not None:
            return f"{key} must be {self.words}, got {value!r}"
        return f"{key} must be {why}, got {value!r}{self._near(value)}"

    def _list_problem(self, key: str, value: list[Any], nullable: bool) -> str | None:
        noun = self.noun
        whole = None
        if self.nonempty and not value:
            whole = f"a non-empty list of {noun}" + (" (leave it out for the default)" if nullable else "")
        elif self.length is not None and len(value) != self.length:
            whole = f"a list of {self.length} {noun}"
        if whole is None:
            for i, v in enumerate(value):
                why = self._entry_problem(v)
                if why is None:
                    continue
                if self.words is not None:
                    break
                if self.one_of is not None:
                    return f"{key} must be a list of {noun} ({', '.join(self.one_of)}), got {v!r}{self._near(v)}"
                return f"{key}[{i}] must be {why}, got {v!r}"
            else:
                if self.unique and len(set(map(repr, value))) != len(value):
                    whole = f"a list without repeated {noun.split()[-1]}"
                elif self.ordered and any(a > b for a, b in zip(value, value[1:])):
                    whole = f"a list of {noun} in increasing order"
                else:
                    return None
        return f"{key} must be {self.words or whole}, got {value!r}"

    def _entry_problem(self, v: Any) -> str | None:
        """What ``v`` (a value, or a list's entry) must be if it fails, else None."""
        if self.registry is not None:
            return None  # checked by the registry's owner
        if self.one_of is not None:
            return None if v in self.one_of else self.entry_text()
        if self.pattern is not None:
            ok = isinstance(v, str) and re.fullmatch(self.pattern, v.strip(), re.IGNORECASE) is not None
            return None if ok else (self.words or f"a name matching {self.pattern}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None  # the type was checked when the value was read
        if isinstance(v, float) and not math.isfinite(v):
            return "a finite number"
        ok = (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
            and (self.multiple_of is None or v % self.multiple_of == 0)
        )
        return None if ok else self.bounds_text()

    def _near(self, v: Any) -> str:
        if self.one_of is None or not isinstance(v, str):
            return ""
        near = difflib.get_close_matches(v, list(self.one_of), n=1, cutoff=0.6)
        return f" (did you mean '{near[0]}'?)" if near else ""


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def allowed(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | Any = dataclasses.MISSING,
            **spec: Any) -> Any:
    """A dataclass field with default ``default`` (or ``factory()``) accepting what ``Allowed(**spec)``
    allows: ``heads: int = allowed(8, ge=1)``, ``norm: str = allowed("gn", one_of=NORMS)``."""
    meta = {METADATA_KEY: Allowed(**spec)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls: type, name: str) -> Allowed | None:
    """The :class:`Allowed` of field ``name`` of dataclass ``cls``: its own, or, for a field a subclass
    re-declares only to change its default, that of the nearest base class that declares it."""
    for base in cls.__mro__:
        f = getattr(base, "__dataclass_fields__", {}).get(name)
        if f is not None and METADATA_KEY in f.metadata:
            return f.metadata[METADATA_KEY]
    return None


@functools.lru_cache(maxsize=None)
def _nullable(cls: type) -> dict[str, bool]:
    hints = typing.get_type_hints(cls)
    out = {}
    for name, tp in hints.items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else ()
        out[name] = type(None) in args
    return out


def check_fields(obj: Any, prefix: str = "", *, where: Callable[[str], str | None] | None = None) -> None:
    """Check every declared field of dataclass ``obj``, and of the sections it holds, in field order;
    the first refusal is a one-line :class:`ConfigError` ``KEY must be WHAT, got VALUE``, prefixed with
    ``where(KEY) + ": "`` when ``where`` names the key's source. ``prefix`` starts every key
    (``"distill.options."``)."""
    cls = type(obj)
    nullable = _nullable(cls)
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, f"{key}.", where=where)
            continue
        spec = declared(cls, f.name)
        if spec is None:
            continue
        message = spec.problem(key, value, nullable=nullable.get(f.name, False))
        if message is not None:
            src = where(key) if where is not None else None
            raise ConfigError(f"{src}: {message}" if src else message)
