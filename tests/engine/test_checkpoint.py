"""Checkpoint files: atomic writes survive a crash mid-write, unreadable files are one-line errors,
finished files are readable as open() would make them, partial writes are found for clean-up."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from hmkd.engine import checkpoint as ck
from hmkd.errors import CheckpointError


def test_save_and_load_roundtrip(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    state = {"model": {"w": torch.arange(5.0)}, "iteration": 7}
    ck.save_checkpoint(state, path)
    back = ck.load_checkpoint(path)
    assert back["iteration"] == 7 and torch.equal(back["model"]["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary left behind


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last_checkpoint.pth")
    ck.save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 1}, path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temp file ...
        f.flush()
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = ck.load_checkpoint(path)
    assert back["iteration"] == 1 and torch.equal(back["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last_checkpoint.pth"]


def test_interrupt_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth")
    ck.save_checkpoint({"iteration": 1}, path)

    def interrupted(obj, f, *a, **kw):
        f.write(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"iteration": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["c.pth"]


def test_unreadable_files_are_one_line_checkpoint_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(100, 100)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint\n")
    for p in (truncated, garbage, tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError) as e:
            ck.load_checkpoint(str(p))
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg
    listy = tmp_path / "list.pth"
    torch.save([1, 2], listy)
    with pytest.raises(CheckpointError, match="not an hmkd checkpoint"):
        ck.load_checkpoint(str(listy))
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        ck.load_training_checkpoint(str(good))


def test_rng_state_roundtrip():
    ck.seed_everything(3)
    state = ck.capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(10)  # move on
    ck.restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_is_group_and_world_readable_under_umask_022(tmp_path):
    """Checkpoints get what open() would give (0o666 & ~umask), not mkstemp's private 0o600; the
    umask is read when hmkd.utils is imported, hence a fresh process."""
    path = tmp_path / "ckpt.pth"
    code = (
        "import os, sys; os.umask(0o022)\n"
        "from hmkd.engine import checkpoint as ck\n"
        "ck.save_checkpoint({'iteration': 1}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert ck.load_checkpoint(str(path))["iteration"] == 1


def test_partial_writes_finds_what_a_killed_save_leaves(tmp_path, monkeypatch):
    """The trainer removes the temporary files of checkpoint writes a killed run left: the names
    partial_writes looks for must be those save_checkpoint's temporary files get."""
    path = tmp_path / ck.LAST
    seen = []

    def stalled_save(obj, f, *a, **kw):  # look at the folder in the middle of the write
        f.write(b"half")
        seen.extend(ck.partial_writes(str(tmp_path)))
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", stalled_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"iteration": 1}, str(path))
    assert len(seen) == 1 and os.path.basename(seen[0]).startswith(f".{ck.LAST}.") and seen[0].endswith(".tmp")
    (tmp_path / ".metrics.json.abc123.tmp").write_text("{")  # not a checkpoint: left alone
    (tmp_path / f".{ck.BEST}.x1y2z3.tmp").write_text("x")
    (tmp_path / ck.FINAL).write_text("x")
    assert [os.path.basename(p) for p in ck.partial_writes(str(tmp_path))] == [f".{ck.BEST}.x1y2z3.tmp"]
