"""Bad input through the command line (``python -m hmkd ...`` in a subprocess): exit status 2, the
error as one ``hmkd: error: ...`` line (log lines may precede it, a traceback may not), no hang, and
no output that looks complete. The commands run concurrently. The library side of each case (and
more cases) is test_bad_input.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from hmkd.models import build_detector

from reliability_helpers import TINY_MODEL, TINY_MODEL_KW, VISDRONE_ROWS, error_line, popen_cli, write_coco, write_visdrone

TIMEOUT = 240  # far above the seconds each command needs; hitting it means a hang


def _yaml_config(root: Path, *, ann: str = "ann.json") -> str:
    lines = [
        "name: cli", "device: cpu", "seed: 0",
        "data:", "  kind: coco", f"  root: {root}", f"  train_ann: {ann}", f"  val_ann: {ann}",
        "  train_images: images", "  val_images: images", "  batch_size: 3", "  eval_batch_size: 1", "  workers: 0",
        "train:", "  iters: 2", "  warmup_iters: 0", "  log_period: 1", "  ckpt_period: 1",
        "model:", *[f"  {o.split('=', 1)[0].split('.', 1)[1]}: {o.split('=', 1)[1]}" for o in TINY_MODEL],
    ]
    return "\n".join(lines) + "\n"


CASES: dict[str, dict] = {}


def case(name: str, args: list[str], match: list[str], *, only_line: bool = False, absent: list[str] = ()):
    CASES[name] = dict(args=args, match=match, only_line=only_line, absent=list(absent))


# ``{d}`` is the test's folder. ``only_line``: the error is the whole of stderr (raised before any logging).
case("config-unknown-key", ["train", "{d}/badkey.yaml", "--output-dir", "{d}/out-key"],
     ["badkey.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)"], only_line=True, absent=["out-key"])
case("config-wrong-type", ["train", "{d}/good.yaml", "train.iters=many", "--output-dir", "{d}/out-type"],
     ["command line: train.iters must be an integer, got 'many'"], only_line=True, absent=["out-type"])
case("unknown-detector", ["train", "{d}/good.yaml", "model.detector=yolo", "--output-dir", "{d}/out-det"],
     ["command line: model.detector must be one of faster_rcnn, mask_rcnn, retinanet, fcos, torchvision:", "got 'yolo'"],
     absent=["out-det/config.yaml", "out-det/last_checkpoint.pth", "out-det/metrics.json"])
case("teacher-classes", ["distill", "{d}/good.yaml", "distill.method=fitnet", "teacher.num_classes=5",
                         "teacher.weights={d}/fcos.pth", "--output-dir", "{d}/out-tc"],
     # the teacher may have its own classes, but its file must then hold them
     ["fcos.pth: does not fit FCOS; shape mismatch: head.classification_head.cls_logits.weight",
      "(the file has 2 classes + background: set num_classes: 2, or weights_skip_classes: true"],
     absent=["out-tc/config.yaml"])
case("checkpoint-wrong-arch", ["eval", "{d}/good.yaml", "--weights", "{d}/retina.pth", "--out", "{d}/ev-arch"],
     ["retina.pth: checkpoint is retinanet/resnet18 (read off its keys), config says fcos/resnet18 (model.detector)"],
     absent=["ev-arch"])
case("annotation-not-json", ["train", "{d}/notjson.yaml", "--output-dir", "{d}/out-json"],
     ["notjson.json: not a JSON file"], absent=["out-json/config.yaml"])
case("visdrone-field-count", ["data", "visdrone", "--src", "{d}/vd", "--out", "{d}/conv/vd.json"],
     ["0000001.txt:2: expected 8 comma-separated fields, got 7"], only_line=True, absent=["conv"])
# Read by DataLoader workers: the worker's error comes back as one line and the process exits.
case("missing-image-workers", ["train", "{d}/missing.yaml", "data.workers=2", "--output-dir", "{d}/out-miss", "--no-progress"],
     ["b.png: image file not found (image id 2 in"], absent=["out-miss/last_checkpoint.pth", "out-miss/metrics.json"])
case("truncated-image-eval-workers", ["eval", "{d}/truncated.yaml", "data.workers=2", "--weights", "{d}/fcos.pth",
                                      "--out", "{d}/ev-trunc", "--no-progress"],
     ["a.png: unreadable or truncated image", "(image id 1 in"], absent=["ev-trunc/metrics.json", "ev-trunc/detections.json"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Write the inputs, start every command at once, collect ``{name: (returncode, stderr)}``."""
    d = tmp_path_factory.mktemp("cli")
    write_coco(d / "good")
    write_coco(d / "missing")
    os.remove(d / "missing" / "images" / "b.png")
    write_coco(d / "truncated")
    raw = (d / "truncated" / "images" / "a.png").read_bytes()
    (d / "truncated" / "images" / "a.png").write_bytes(raw[: len(raw) // 2])
    write_coco(d / "notjson", ann_name="notjson.json")
    (d / "notjson" / "notjson.json").write_text('{"images": [')
    (d / "good.yaml").write_text(_yaml_config(d / "good"))
    (d / "missing.yaml").write_text(_yaml_config(d / "missing"))
    (d / "truncated.yaml").write_text(_yaml_config(d / "truncated"))
    (d / "notjson.yaml").write_text(_yaml_config(d / "notjson", ann="notjson.json"))
    (d / "badkey.yaml").write_text(_yaml_config(d / "good").replace("train:\n", "train:\n  lrr: 0.1\n"))
    write_visdrone(d / "vd", rows=[VISDRONE_ROWS[0], "10,12,20,16,1,4,0"])
    torch.save(build_detector("fcos", "resnet18", num_classes=2, **TINY_MODEL_KW).state_dict(), d / "fcos.pth")
    torch.save(build_detector("retinanet", "resnet18", num_classes=2, **TINY_MODEL_KW).state_dict(), d / "retina.pth")

    procs = {name: popen_cli([a.format(d=d) for a in c["args"]], cwd=d) for name, c in CASES.items()}
    out = {}
    for name, p in procs.items():
        try:
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"'hmkd {' '.join(CASES[name]['args'])}' did not finish in {TIMEOUT} s (hang)")
        out[name] = (p.returncode, err)
    return d, out


@pytest.mark.parametrize("name", list(CASES))
def test_cli_error(results, name) -> None:
    d, out = results
    c = CASES[name]
    rc, err = out[name]
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    line = error_line(err)
    if c["only_line"]:
        assert err.strip() == line, err
    for m in c["match"]:
        assert m in line, line
    for rel in c["absent"]:
        assert not (d / rel).exists(), f"{rel} exists after a failed command"
