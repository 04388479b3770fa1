"""Faults: SIGKILL in the middle of a checkpoint write, and SIGINT/SIGTERM during training.

* A run SIGKILLed while ``last_checkpoint.pth`` is being written leaves the previous checkpoint
  loadable, and ``resume`` continues from it to the end.
* Killed at random moments of a stream of checkpoint writes, ``last_checkpoint.pth`` is always
  absent or a complete, loadable checkpoint (never a partial file).
* ``hmkd train`` stopped by SIGINT (sent to the whole process group, as Ctrl-C is, DataLoader
  workers included) or SIGTERM (sent to the main process, as ``kill`` does) saves a checkpoint,
  exits with status 130 / 143 leaving no stray worker, and ``hmkd train --resume`` runs to the end
  with the right iteration count and an unbroken log.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hmkd.config import load_config
from hmkd.engine import checkpoint as ck
from hmkd.training import train

from reliability_helpers import TINY_MODEL, child_env, popen_cli, write_coco

TIMEOUT = 240


def _config_items(root: Path, iters: int, workers: int, ckpt_period: int) -> list[str]:
    return [
        "name=faults", "device=cpu", "seed=3", "data.kind=coco", f"data.root={root}", "data.train_ann=ann.json",
        "data.val_ann=ann.json", "data.train_images=images", "data.val_images=images", "data.batch_size=2",
        "data.eval_batch_size=3", f"data.workers={workers}", f"train.iters={iters}", "train.warmup_iters=0",
        "train.log_period=1", f"train.ckpt_period={ckpt_period}", *TINY_MODEL,
    ]


def _write_yaml(path: Path, items: list[str]) -> Path:
    """``key=value`` items as a nested YAML file (values are already YAML)."""
    tree: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    lines: list[str] = []

    def emit(node: dict, indent: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                lines.append(f"{indent}{k}:")
                emit(v, indent + "  ")
            else:
                lines.append(f"{indent}{k}: {v}")

    emit(tree, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _log_iterations(out: Path) -> list[int]:
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if l.strip()]
    return [r["iteration"] for r in recs if "lr" in r]


# ------------------------------------------------------------------------------ SIGKILL mid-write
_SLOW_SAVE_CHILD = r'''
import io, os, sys, time
import torch
from hmkd.config import load_config
from hmkd.engine import checkpoint as ck
from hmkd.training import train

out, marker, cfg_path = sys.argv[1:4]
real = torch


class SlowTorch:
    """checkpoint.py's view of torch: the second save writes half the file, then stalls."""

    calls = 0

    def __getattr__(self, name):
        return getattr(real, name)

    def save(self, obj, f, *args, **kwargs):
        SlowTorch.calls += 1
        if SlowTorch.calls < 2:
            return real.save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real.save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        open(marker, "w").close()
        time.sleep(600)


ck.torch = SlowTorch()
train(load_config(cfg_path, []), output_dir=out, progress=False)
'''


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    write_coco(tmp_path / "data")
    items = _config_items(tmp_path / "data", iters=3, workers=0, ckpt_period=1)
    cfg_path = _write_yaml(tmp_path / "cfg.yaml", items)
    out, marker = tmp_path / "out", tmp_path / "saving"
    script = tmp_path / "child.py"
    script.write_text(_SLOW_SAVE_CHILD)
    p = subprocess.Popen([sys.executable, str(script), str(out), str(marker), str(cfg_path)], env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert p.poll() is None, f"child exited early ({p.returncode}): {p.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "child never reached its second checkpoint write"
            time.sleep(0.02)
        partial = list(out.glob(".last_checkpoint.pth.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # caught mid-write
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    # the previous checkpoint (iteration 1) is intact; the half-written one never took its name
    state = ck.load_training_checkpoint(str(out / "last_checkpoint.pth"))
    assert state["iteration"] == 1
    assert not (out / "metrics.json").exists() and not (out / "model_final.pth").exists()
    # and the run resumes from it to the end
    metrics = train(load_config(str(cfg_path), []), output_dir=str(out), resume=True, progress=False)
    assert metrics["status"] == "finished" and metrics["iteration"] == 3
    assert ck.load_checkpoint(str(out / "model_final.pth"))["iteration"] == 3
    assert not (out / "last_checkpoint.pth").exists()  # a finished run's resume state is removed
    assert _log_iterations(out) == [1, 2, 3]
    assert not list(out.glob(".*.tmp")), "the killed run's partial write was not cleaned up"


def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path: Path) -> None:
    """Invariant over many kills: last_checkpoint.pth is absent or loadable (and never goes back)."""
    rng = random.Random(11)
    path = tmp_path / "last_checkpoint.pth"
    payload = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: a write takes a while
    # (the child makes no multi-threaded torch call: OpenMP is not safe to use after fork)
    last, mid_write, trials = -1, 0, 24
    for _ in range(trials):
        start = last + 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: write checkpoints as fast as it can until killed
            try:
                os.close(r)
                os.write(w, b"go")
                i = start
                while True:
                    tag = torch.full((256,), float(i))
                    ck.save_checkpoint({"iteration": i, "model": {"tag": tag, "w": payload, "tag2": tag}}, str(path))
                    i += 1
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 2) == b"go"
        os.close(r)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = list(tmp_path.glob(".last_checkpoint.pth.*.tmp"))
        mid_write += bool(leftovers)
        for f in leftovers:
            f.unlink()
        if path.exists():
            state = ck.load_checkpoint(str(path))
            m = state["model"]
            assert torch.equal(m["w"], payload), "checkpoint content is torn"
            assert (m["tag"] == state["iteration"]).all() and (m["tag2"] == state["iteration"]).all()
            assert state["iteration"] >= last
            last = state["iteration"]
    assert last >= 0, "no checkpoint was ever completed"
    assert mid_write >= trials // 4, f"only {mid_write} of {trials} kills landed during a write"


# ------------------------------------------------------------------------------ SIGINT / SIGTERM
ITERS = 16


def _signal_then_resume(d: Path, sig: signal.Signals, whole_group: bool, report: dict) -> None:
    """Start ``hmkd train``, signal it after its first log record, then ``--resume`` it to the end."""
    try:
        cfg = _write_yaml(d / "cfg.yaml", _config_items(d.parent / "data", iters=ITERS, workers=2, ckpt_period=0))
        out = d / "out"
        p = popen_cli(["train", str(cfg), "--output-dir", str(out), "--no-progress"], cwd=d, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        log = out / "log.jsonl"
        while not (log.exists() and log.read_text().endswith("\n")):
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                report["error"] = f"no log record before exit/timeout: {p.communicate()[1][-2000:]}"
                return
            time.sleep(0.02)
        if whole_group:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        _, err = p.communicate(timeout=TIMEOUT)
        report["first"] = (p.returncode, err)
        report["stray"] = _processes_in_group(p.pid)
        report["checkpoint"] = ck.load_training_checkpoint(str(out / "last_checkpoint.pth"))["iteration"]
        report["complete_after_stop"] = [n for n in ("metrics.json", "model_final.pth") if (out / n).exists()]
        q = popen_cli(["train", str(cfg), "--output-dir", str(out), "--resume", "--no-progress"], cwd=d)
        stdout, err = q.communicate(timeout=TIMEOUT)
        report["resume"] = (q.returncode, err, stdout)
        report["metrics"] = json.loads((out / "metrics.json").read_text())
        report["final_checkpoint"] = ck.load_checkpoint(str(out / "model_final.pth"))["iteration"]
        report["last_left"] = (out / "last_checkpoint.pth").exists()
        report["log"] = _log_iterations(out)
    except Exception as e:  # reported by the test, not lost in the thread
        report["error"] = f"{type(e).__name__}: {e}"


def _processes_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (DataLoader workers left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """Both signal scenarios, run concurrently."""
    base = tmp_path_factory.mktemp("signals")
    write_coco(base / "data")
    scenarios = {"SIGINT": (signal.SIGINT, True), "SIGTERM": (signal.SIGTERM, False)}
    reports: dict[str, dict] = {k: {} for k in scenarios}
    threads = []
    for name, (sig, group) in scenarios.items():
        (base / name).mkdir()
        t = threading.Thread(target=_signal_then_resume, args=(base / name, sig, group, reports[name]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return reports


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_checkpoint_exits_cleanly_and_resume_finishes(signal_runs, name, status) -> None:
    rep = signal_runs[name]
    assert "error" not in rep, rep["error"]
    rc, err = rep["first"]
    assert rc == status, f"exit status {rc}, expected {status}; stderr:\n{err}"
    assert "Traceback" not in err, err
    k = rep["checkpoint"]
    assert 1 <= k < ITERS, k
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last == (
        f"hmkd: training interrupted at iteration {k}; checkpoint {rep['metrics']['output_dir']}/last_checkpoint.pth; "
        "rerun with --resume to continue"
    ), last
    assert rep["stray"] == [], f"processes left running after exit: {rep['stray']}"
    assert rep["complete_after_stop"] == [], "an interrupted run wrote final outputs"
    rc, err, stdout = rep["resume"]
    assert rc == 0, err
    assert f"finished: {ITERS} iterations" in stdout  # the summary table
    assert rep["metrics"]["status"] == "finished" and rep["metrics"]["iteration"] == ITERS
    assert rep["final_checkpoint"] == ITERS and not rep["last_left"]
    assert rep["log"] == list(range(1, ITERS + 1))  # every iteration logged once, none lost or repeated
