"""hmkd.bench.cost: the cost bench runs end to end on a tiny config and writes its files."""

from __future__ import annotations

import json

import pytest
import torch

from hmkd.bench.cost import run_cost_bench
from hmkd.config import load_config
from hmkd.errors import ConfigError

TINY = """
name: tiny_cost
seed: 0
device: cpu
data:
  kind: synthetic
  root: {root}
  batch_size: 2
  hflip: true
  synth: {{n_train: 1000, n_val: 200, size: 64, seed: 0, preset: default}}
model: {{detector: fcos, backbone: resnet18, fpn_channels: 32, levels: [P2, P3, P4, P5, P6],
        min_size: 64, max_size: 64, head_convs: 1}}
teacher: {{backbone: resnet18, fpn_channels: 64, weights: {root}/no_such_teacher.pth}}
distill:
  method: hmkd
  options: {{hidden: 16, heads: 2}}
"""


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def tiny_cfg(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(root=tmp_path / "data"))
    return load_config(str(p))


def test_cost_bench_tiny_writes_tables(tiny_cfg, tmp_path, one_thread):
    out = tmp_path / "cost"
    res = run_cost_bench(tiny_cfg, methods=["hmkd", "fitnet", "hmkd:aux_every=2"], out_dir=str(out), iters=2, warmup=1,
                         part_reps=1)
    assert "table" in res and "| method | s/step | x no-KD |" in res["table"]
    data = json.loads((out / "cost.json").read_text())
    md = (out / "cost.md").read_text()
    assert md == res["table"]
    assert [r["method"] for r in data["methods"]] == ["none", "hmkd", "fitnet", "hmkd:aux_every=2"]  # no-KD first
    for r in data["methods"]:
        for key in ("step_s", "step_s_all", "phases_s", "teacher_forward_share", "peak_memory_mb", "step_ratio",
                    "memory_ratio", "extra_backward_s"):
            assert key in r, key
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0
        assert r["step_s_mean"] == pytest.approx(sum(r["step_s_all"]) / 2)
        assert set(r["phases_s"]) == {"forward", "student_forward", "teacher_forward", "distill_forward", "backward",
                                      "optimizer"}
    none, hmkd = data["methods"][0], data["methods"][1]
    assert none["phases_s"]["teacher_forward"] == 0 and none["step_ratio"] == 1
    assert hmkd["phases_s"]["teacher_forward"] > 0 and hmkd["phases_s"]["distill_forward"] > 0
    assert hmkd["options"] == {"hidden": 16, "heads": 2}  # the config's options go to its own method
    parts = hmkd["parts"]
    for name in ("masks", "inquiry_head", "decoder_aux", "decoder_attention", "others", "small_fg",
                 "attention_term", "gcblock_bg"):
        assert parts[name]["forward_s"] > 0, name
    assert parts["decoder_aux"]["backward_s"] > 0 and parts["masks"]["backward_s"] == pytest.approx(0, abs=1e-3)
    variant = data["methods"][3]
    assert variant["base_method"] == "hmkd" and variant["options"] == {"hidden": 16, "heads": 2, "aux_every": 2}
    assert "parts" not in variant  # the split is for plain hmkd
    assert set(data["targets"]) == {"step_ratio", "memory_ratio", "mask_share"}
    assert "random weights" in data["teacher"]  # the weights file does not exist
    assert data["machine"]["torch"] == torch.__version__


def test_cost_bench_rejects_unknown_method_and_missing_teacher(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        run_cost_bench(tiny_cfg, methods=["nope"], out_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"method variant 'hmkd:aux_every': 'aux_every' must look like option=value"):
        run_cost_bench(tiny_cfg, methods=["hmkd:aux_every"], out_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="not a file"):
        run_cost_bench(tiny_cfg, methods=["fitnet"], out_dir=str(tmp_path / "x"), random_teacher=False)
