"""hmkd.utils: atomic writes leave either the old or the new file, with ordinary permissions;
json_safe gives strict JSON; machine_info names the machine."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from hmkd.utils import atomic_open, json_safe, machine_info, save_figure, write_json, write_text


def test_atomic_open_replaces_only_on_success(tmp_path) -> None:
    p = tmp_path / "a.txt"
    write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]  # the temporary file is gone
    write_text(p, "new")
    assert p.read_text() == "new"


def test_atomic_open_gives_the_mode_of_an_ordinary_file(tmp_path) -> None:
    p = tmp_path / "sub" / "ckpt.bin"
    with atomic_open(p, "wb", durable=True) as f:
        f.write(b"x")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    # the same mode as open() gives under this process's umask (a bare mkstemp file would be 0600)
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    mask = os.umask(0o022)
    os.umask(mask)
    if mask == 0o022:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_json_safe_and_write_json_are_strict(tmp_path) -> None:
    data = {1: float("nan"), "b": (np.float32(1.5), np.int64(3), torch.tensor(2.0)), "c": [math.inf, -0.5]}
    assert json_safe(data) == {"1": None, "b": [1.5, 3, 2.0], "c": [None, -0.5]}
    p = write_json(tmp_path / "x.json", data, indent=None, separators=(",", ":"))
    text = open(p).read()
    assert text == '{"1":null,"b":[1.5,3,2.0],"c":[null,-0.5]}'
    json.loads(text)


def test_save_figure_writes_a_png(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = save_figure(fig, tmp_path / "f.png")
    plt.close(fig)
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_machine_info_names_cpu_and_versions() -> None:
    info = machine_info("cpu")
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert info["cpu_count"] >= 1 and isinstance(info["cpu"], str) and info["cpu"]
