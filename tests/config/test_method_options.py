"""The config reads the distillation methods' options without importing hmkd.distill: the registry
fills the config's table (hmkd.config.METHOD_OPTIONS) when a method is defined, and one function
(hmkd.config.parse_method_options) turns a method's ``distill.options`` into its options object for
every caller (the config's check, the Distiller, the accuracy bench, ``hmkd config show``).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import hmkd.config as config
from hmkd.config import load_config, parse_method_options
from hmkd.distill import DESCRIPTIONS, METHODS, Distiller, register
from hmkd.distill.hmkd import HMKDOptions
from hmkd.distill.options import MethodOptions
from hmkd.errors import ConfigError

CONFIG_PY = Path(config.__file__)


def _hmkd_imports(path: Path) -> set[str]:
    """Every hmkd module ``path`` imports, lazy (in-function) imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hmkd"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hmkd"):
            out.add(node.module)
    return out


def test_the_config_imports_only_the_layers_below_it() -> None:
    assert _hmkd_imports(CONFIG_PY) <= {"hmkd.allowed", "hmkd.errors", "hmkd.utils"}, _hmkd_imports(CONFIG_PY)


def test_the_registry_fills_the_config_table_in_its_order() -> None:
    assert list(config.METHOD_OPTIONS) == list(METHODS)
    assert all(config.METHOD_OPTIONS[m] is cls.Options for m, cls in METHODS.items())
    assert list(config.METHOD_OPTIONS)[:5] == ["none", "fitnet", "fgd", "icd", "hmkd"]


def test_a_method_registered_later_is_read_by_the_config() -> None:
    @dataclasses.dataclass
    class ProbeOptions(MethodOptions):
        weight: float = 1.0

    class Probe(Distiller):
        Options = ProbeOptions

    register("probe_g", "test-only")(Probe)
    try:
        cfg = load_config(None, ["distill.method=probe_g", "distill.options.weight=2"])
        assert cfg.distill.options == {"weight": 2}
        with pytest.raises(ConfigError) as e:
            load_config(None, ["distill.method=probe_g", "distill.options.wieght=2"])
        assert str(e.value) == "command line: unknown key 'distill.options.wieght' (did you mean 'distill.options.weight'?)"
    finally:
        for table in (METHODS, DESCRIPTIONS, config.METHOD_OPTIONS):
            table.pop("probe_g", None)


def test_an_empty_table_is_a_clear_error_not_a_silent_pass(monkeypatch) -> None:
    # what the config would see had hmkd.distill never been imported (import hmkd imports it first)
    monkeypatch.setattr(config, "METHOD_OPTIONS", {})
    with pytest.raises(RuntimeError, match=re.escape("no distillation method is registered")):
        load_config(None)
    with pytest.raises(RuntimeError, match="import hmkd or hmkd.distill"):
        parse_method_options("none", {})


def test_one_function_reads_options_for_every_caller() -> None:
    opts = parse_method_options("hmkd", {"hidden": 32, "heads": 4})
    assert opts == HMKDOptions(hidden=32, heads=4)
    # by the options type itself (a Distiller's Options, registered or not): the same object
    assert parse_method_options(HMKDOptions, {"hidden": 32, "heads": 4}) == opts
    # unknown names and wrong types: always refused, naming the source
    with pytest.raises(ConfigError) as e:
        parse_method_options("hmkd", {"headz": 4}, check=False)
    assert str(e.value).startswith("config: unknown key 'distill.options.headz' (did you mean 'distill.options.heads'?)")
    with pytest.raises(ConfigError) as e:
        parse_method_options("hmkd", {"heads": "four"}, src="o.yaml", check=False)
    assert str(e.value) == "o.yaml: distill.options.heads must be an integer, got 'four'"
    # values: checked (with the source) only when asked; unchecked, the caller checks (the Distiller does)
    assert parse_method_options("hmkd", {"heads": 0}, check=False).heads == 0
    with pytest.raises(ConfigError) as e:
        parse_method_options("hmkd", {"heads": 0})
    assert str(e.value) == "config: distill.options.heads must be >= 1, got 0"
    with pytest.raises(ConfigError) as e:
        parse_method_options("hmkd", {"hidden": 32, "heads": 3}, src="o.yaml")
    assert str(e.value) == "o.yaml: distill.options.heads must be a divisor of hidden (32), got 3"
    with pytest.raises(ConfigError) as e:
        parse_method_options("hmdk", {}, origins={"distill.method": "command line"})
    known = ", ".join(config.METHOD_OPTIONS)  # none, fitnet, fgd, icd, hmkd (and what a test module registered)
    assert str(e.value) == f"command line: distill.method must be one of {known}, got 'hmdk' (did you mean 'hmkd'?)"
