"""``hmkd demo``: the quick run goes through every stage (stand-ins, teacher, students, picture of
what each student finds), records the machine facts that explain numbers moving between machines,
and the sentence that sets the HMKD gain against the benchmark's seed spread reads the numbers right."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from hmkd.demo import METRICS, PICTURE_UPSCALE, benchmark_spread, format_table, small_object_images, verdict


def _bench_file(tmp_path, none_std: float, hmkd_std: float, n: int = 2) -> str:
    res = {"methods": {
        "none": {"n": n, "mean": {"mAP": 40.0}, "std": {"mAP": none_std}},
        "hmkd": {"n": n, "mean": {"mAP": 41.5}, "std": {"mAP": hmkd_std}},
    }}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    return str(path)


def test_benchmark_spread_is_the_larger_std_of_the_two_rows(tmp_path):
    b = benchmark_spread(_bench_file(tmp_path, 0.4, 0.9))
    assert b["gain"] == pytest.approx(1.5)
    assert b["spread"] == pytest.approx(0.9)
    assert b["seeds"] == 2
    assert benchmark_spread(tmp_path / "missing.json") is None


def test_verdict_says_larger_or_within_the_spread(tmp_path):
    b = benchmark_spread(_bench_file(tmp_path, 0.4, 0.9))
    assert "larger than the seed spread" in verdict(1.2, b)
    assert "within the seed spread" in verdict(0.5, b) and "noise" in verdict(0.5, b)
    assert "no paper-regime benchmark" in verdict(0.5, None)
    one = benchmark_spread(_bench_file(tmp_path, 0.0, 0.0, n=1))
    assert "no seed spread" in verdict(2.0, one)


def test_format_table_brackets_the_gain_over_the_student():
    row = dict.fromkeys(METRICS, 10.0)
    table = format_table({"teacher": dict.fromkeys(METRICS, 30.0), "student": row,
                          "hmkd": {**row, "mAP": 12.5, "APvt": float("nan")}})
    lines = table.splitlines()
    assert lines[0].startswith("| model | mAP | AP50 | APvt")
    assert "| hmkd | 12.5 (+2.5) | 10.0 (+0.0) | - |" in lines[-1]
    assert "(" not in lines[2] and "(" not in lines[3]  # teacher and student rows carry no gain


def test_quick_demo_runs_every_stage(tmp_path, monkeypatch, capsys):
    from hmkd.cli import main

    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["table"] in printed and res["verdict"] in printed and "wall time" in printed
    machine = res["machine"]  # what explains numbers that move between machines
    assert machine["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == torch.get_num_threads()
    assert machine["cpu"] and set(machine["cpu_flags"]) <= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                           "amx_tile", "amx_bf16"}
    assert f"ATen {machine['aten_cpu_capability']}" in printed and machine["cpu"] in printed
    if torch.backends.mkldnn.is_available():
        assert machine["onednn_isa"] and f"oneDNN {machine['onednn_isa']}" in printed
    assert set(res["models"]) == {"teacher", "student", "hmkd"}
    assert set(res["seconds"]) == {"stand-in resnet18", "stand-in resnet34", "teacher", "student", "hmkd",
                                   "picture", "total"}
    for name in ("resnet18", "resnet34"):  # both stand-ins made in the cache, not in the demo folder
        found = [d for d in os.listdir(tmp_path / "cache" / "backbones") if d.startswith(name + "-")]
        assert len(found) == 1 and os.path.isfile(tmp_path / "cache" / "backbones" / found[0] / "backbone.pth")
    assert len(res["pictures"]) == 3
    for p in res["pictures"]:
        with Image.open(p) as im:  # ground truth + two students side by side, each panel upscaled
            assert im.width == 3 * 96 * PICTURE_UPSCALE + 2 * 4
    drawn = json.loads((tmp_path / "demo" / "detections" / "detections.json").read_text())
    assert drawn["show"] == "found"  # what each student finds, not every detection
    for per_model in drawn["images"].values():
        assert list(per_model) == ["student (no-KD)", "student (HMKD)"]
        assert "versus" in per_model["student (HMKD)"]["counts"] and "versus" not in per_model["student (no-KD)"]["counts"]
    assert res["table"] in (tmp_path / "demo" / "results.md").read_text()


def test_small_object_images_picks_the_most_small_objects(tmp_path, monkeypatch):
    from hmkd.config import Config, from_dict
    from hmkd.data import build_data
    from hmkd.demo import demo_settings

    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    cfg = from_dict(Config, demo_settings(str(tmp_path), quick=True)["student"])
    ds = build_data(cfg, train=False)
    picked = small_object_images(ds, 2)
    counts = {}
    for img_id, rec in ds.coco.imgs.items():
        anns = ds.coco.imgToAnns.get(img_id, [])
        counts[os.path.join(ds.images_dir, rec["file_name"])] = sum(a["bbox"][2] * a["bbox"][3] < 1024 for a in anns)
    best = sorted(counts.values(), reverse=True)[:2]
    assert [counts[p] for p in picked] == best


def test_machine_facts_follow_the_kernel_settings(monkeypatch):
    """The facts read what torch runs, not what the CPU could: capping oneDNN's ISA shows."""
    from hmkd.demo import machine_facts, machine_line

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    facts = machine_facts()
    assert facts["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in machine_line(facts)
    if torch.backends.mkldnn.is_available() and "avx2" in facts["cpu_flags"]:
        assert facts["onednn_isa"] == "Intel AVX2"
