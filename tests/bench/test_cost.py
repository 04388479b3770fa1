"""hmkd.bench.cost: the cost bench runs end to end on a tiny config and writes its files; its FLOP counts (issue 29)."""

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
  # the decoder trained on jointly over the whole map: every decoder part runs (the FLOP accounting below)
  options: {{hidden: 16, heads: 2, decoder_training: joint, attention_window: null}}
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


def _bare_parts(method: str) -> set[str]:
    import importlib

    parts = importlib.import_module(f"hmkd.distill.{method}").PROFILE_PARTS
    return {p.split(".", 1)[1] if p.startswith(f"{method}.") else p for p in parts}


@pytest.fixture()
def counted_steps(monkeypatch):
    """Every training step the bench runs goes through hmkd.training.step.train_step: count the calls
    and check, right after each, that the main optimiser (and HMKD's decoder AdamW) stepped."""
    import hmkd.training.step as engine_step

    real = engine_step.train_step
    calls: list[dict] = []

    def counting(distiller, optimizer, images, targets, iteration, **kw):
        before = {id(p): p.detach().clone() for p in kw["main_params"][:4]}
        out = real(distiller, optimizer, images, targets, iteration, **kw)
        assert optimizer.state, "the main optimiser did not step"
        moved = any(not torch.equal(before[id(p)], p) for p in kw["main_params"][:4])
        extra = [o for _, o, _ in kw.get("extra_optimizers", ())]
        calls.append({"method": distiller.name, "clock": kw.get("clock") is not None, "moved": moved,
                      "extra_stepped": all(o.state for o in extra), "n_extra": len(extra), "losses": out})
        return out

    monkeypatch.setattr(engine_step, "train_step", counting)
    return calls


def test_cost_bench_tiny_writes_tables(tiny_cfg, tmp_path, one_thread, counted_steps):
    import hmkd.bench.cost as cost

    assert not hasattr(cost, "hmkd_part_costs") and not hasattr(cost, "_time_part")  # no copy of the method
    out = tmp_path / "cost"
    res = run_cost_bench(tiny_cfg, methods=["hmkd", "fitnet", "icd", "hmkd:aux_every=2"], out_dir=str(out), iters=2,
                         warmup=1, profile_steps=2)
    assert "table" in res and "| method | s/step | x no-KD |" in res["table"]
    data = json.loads((out / "cost.json").read_text())
    md = (out / "cost.md").read_text()
    assert md == res["table"]
    assert [r["method"] for r in data["methods"]] == ["none", "hmkd", "fitnet", "icd", "hmkd:aux_every=2"]
    # every step is train_step's: 1 warm-up + 2 timed + 1 FLOP-counted per method, 2 profiled for hmkd and icd
    per_method = {}
    for c in counted_steps:
        per_method[c["method"]] = per_method.get(c["method"], 0) + 1
    assert per_method == {"none": 4, "hmkd": 4 + 2 + 4, "fitnet": 4, "icd": 4 + 2}
    assert all(c["clock"] and c["moved"] and c["extra_stepped"] for c in counted_steps)
    assert any(c["method"] == "hmkd" and c["n_extra"] > 0 for c in counted_steps)
    assert all("total" in c["losses"] for c in counted_steps)
    for r in data["methods"]:
        for key in ("step_s", "step_s_all", "phases_s", "teacher_forward_share", "peak_memory_mb", "step_ratio",
                    "memory_ratio", "extra_backward_s"):
            assert key in r, key
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0
        assert r["step_s_mean"] == pytest.approx(sum(r["step_s_all"]) / 2)
        assert set(r["phases_s"]) == {"forward", "student_forward", "teacher_forward", "distill_forward", "backward",
                                      "optimizer"}
        assert r["phases_s"]["backward"] > 0 and r["phases_s"]["optimizer"] > 0
        assert sum(r["phases_s"][k] for k in ("forward", "backward", "optimizer")) == pytest.approx(r["step_s"])
    none, hmkd, fitnet, icd, variant = data["methods"]
    assert none["phases_s"]["teacher_forward"] == 0 and none["step_ratio"] == 1
    assert hmkd["phases_s"]["teacher_forward"] > 0 and hmkd["phases_s"]["distill_forward"] > 0
    assert hmkd["options"] == {"hidden": 16, "heads": 2, "decoder_training": "joint", "attention_window": None}  # the config's options go to its own method

    # HMKD's and ICD's parts: the profiler's ranges in the real distill_losses
    for row, method in ((hmkd, "hmkd"), (icd, "icd")):
        parts = row["parts"]
        assert set(parts) == _bare_parts(method), method
        for name, p in parts.items():
            assert p["forward_s"] >= 0 and p["share"] >= 0 and p["calls"] >= 0, (method, name)
            assert set(p) >= {"forward_s", "forward_s_mean", "cpu_s", "calls", "share"}
        prof = row["profile"]
        assert prof["steps"] == 2 and 0 < prof["parts_s"] <= prof["distill_forward_s"] <= prof["step_s"]
        assert prof["unattributed_s"] >= 0
    assert hmkd["parts"]["masks"]["calls"] >= 1 and hmkd["parts"]["masks"]["forward_s"] > 0
    for name in ("decoder_aux", "decoder_attention", "others", "small_fg", "attention_term", "gcblock_bg"):
        assert hmkd["parts"][name]["calls"] >= 1 and hmkd["parts"][name]["forward_s"] > 0, name
    assert "parts" not in fitnet and "parts" not in none
    assert variant["base_method"] == "hmkd" and variant["options"] == {"hidden": 16, "heads": 2, "decoder_training": "joint", "attention_window": None, "aux_every": 2}
    assert "parts" not in variant  # the split is for plain methods
    assert set(data["targets"]) == {"step_ratio", "memory_ratio", "mask_share", "floor"}
    # the floor: no-KD step + the method's own teacher forward; every HMKD row is checked against it
    none = data["methods"][0]
    assert "floor_s" not in none and hmkd["floor_s"] == pytest.approx(none["step_s"] + hmkd["phases_s"]["teacher_forward"])
    assert hmkd["floor_ratio"] == pytest.approx(hmkd["step_s"] / hmkd["floor_s"])
    assert [f["method"] for f in data["targets"]["floor"]] == ["hmkd", "hmkd:aux_every=2"]
    assert all(f["target"] == 1.15 and f["decoder"] == "jointly trained" for f in data["targets"]["floor"])
    assert "Floor: the no-KD step plus one frozen teacher forward" in md
    assert data["targets"]["mask_share"]["value"] == pytest.approx(hmkd["parts"]["masks"]["share"])
    assert "hmkd parts" in md and "| masks (fg/bg + small-object) |" in md and "icd parts" in md
    assert "extra backward over no-KD" in md
    assert "random weights" in data["teacher"]  # the weights file does not exist
    assert data["machine"]["torch"] == torch.__version__ and data["profile_steps"] == 2 and data["amp"] is False


def test_cost_bench_rejects_unknown_method_and_missing_teacher(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        run_cost_bench(tiny_cfg, methods=["nope"], out_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"method variant 'hmkd:aux_every': 'aux_every' must look like option=value"):
        run_cost_bench(tiny_cfg, methods=["hmkd:aux_every"], out_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="not a file"):
        run_cost_bench(tiny_cfg, methods=["fitnet"], out_dir=str(tmp_path / "x"), random_teacher=False)


def test_cost_bench_clips_as_the_trainer_does(tiny_cfg, tmp_path, one_thread, monkeypatch):
    """Each method's steps clip the main parameters as training would: FGD at its own 35, the
    others at train.clip_grad."""
    import hmkd.training.step as engine_step

    real = engine_step.train_step
    clips: dict[str, set] = {}

    def spy(distiller, *args, **kw):
        clips.setdefault(distiller.name, set()).add(kw["clip_grad"])
        return real(distiller, *args, **kw)

    monkeypatch.setattr(engine_step, "train_step", spy)
    tiny_cfg.train.clip_grad = 10.0
    run_cost_bench(tiny_cfg, methods=["fgd", "fitnet"], out_dir=str(tmp_path / "c"), iters=1, warmup=1, profile_steps=0)
    assert clips == {"none": {10.0}, "fgd": {35.0}, "fitnet": {10.0}}


def test_cost_bench_times_a_pretrained_stand_in_config_without_making_the_stand_in(tiny_cfg, tmp_path, one_thread,
                                                                                   monkeypatch):
    import dataclasses

    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, backbone_weights="pretrain"),
                              teacher=dataclasses.replace(tiny_cfg.teacher, backbone_weights="pretrain"))
    res = run_cost_bench(cfg, ["fitnet"], out_dir=tmp_path / "out", iters=1, warmup=0, profile_steps=0,
                         random_teacher=True)
    assert res["stand_ins_replaced"] == ["model", "teacher"]
    assert [r["method"] for r in res["methods"]] == ["none", "fitnet"]
    assert not (tmp_path / "cache").exists()  # cost does not depend on weights: no stand-in was made


# ------------------------------------------------------------------------------------ FLOPs (issue 29)
G = 1e-9
# the tiny config: batch 2 of 64x64 images, FCOS on P2-P6 (16x16 ... 1x1 cells), student FPN 32
# channels, teacher FPN 64; HMKD's decoder (hidden 16) takes its keys/values at P2
B, CS, CT, HIDDEN = 2, 32, 64, 16
CELLS = {"P2": 256, "P3": 64, "P4": 16, "P5": 4, "P6": 1}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost_flops")
    p = root / "tiny.yaml"
    p.write_text(TINY.format(root=root / "data"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_cost_bench(load_config(str(p)), methods=["fitnet", "hmkd", "icd"], out_dir=str(root / "cost"),
                             iters=2, warmup=1, profile_steps=0)
    finally:
        torch.set_num_threads(n)
    data = json.loads((root / "cost" / "cost.json").read_text())
    return res, {r["method"]: r for r in data["methods"]}


def test_fitnet_costs_the_floor_plus_its_adapters(bench):
    _, rows = bench
    none, fitnet, hmkd = rows["none"], rows["fitnet"], rows["hmkd"]
    assert 0 < none["gflop_per_step"] < fitnet["gflop_per_step"]
    # the student's FLOPs (forward + backward) are no-KD's whole step in every method: the
    # distillation terms add gradient to the same maps, not products to the student's backward
    for r in (fitnet, hmkd, rows["icd"]):
        assert r["gflop_split"]["student"] == pytest.approx(none["gflop_per_step"], rel=1e-12)
    # the teacher forward is counted in each method's own step; the same teacher on the same batch
    t = fitnet["gflop_split"]["teacher_forward"]
    assert t > 0 and hmkd["gflop_split"]["teacher_forward"] == pytest.approx(t, rel=1e-12)
    assert none["gflop_split"]["teacher_forward"] == 0 and "gflop_x_floor" not in none
    assert fitnet["gflop_floor"] == pytest.approx(none["gflop_per_step"] + t)
    assert fitnet["gflop_x_floor"] == pytest.approx(fitnet["gflop_per_step"] / fitnet["gflop_floor"])
    # FitNet is the floor (measured: 0.33% above it here) ...
    assert 1.0 < fitnet["gflop_x_floor"] < 1.01
    # ... plus exactly its 1x1 adapters on P2-P6: forward, input gradient and weight gradient, each
    # 2 * Cs * Ct per cell (the MSE has no FLOP formula)
    adapters = 3 * 2 * CS * CT * B * sum(CELLS.values())
    assert fitnet["gflop_per_step"] - fitnet["gflop_floor"] == pytest.approx(adapters * G, rel=1e-9)
    # FlopCounterMode has no formula for the optimisers' _foreach updates: the optimiser counts 0
    for r in rows.values():
        ph = r["gflop_phases"]
        assert ph["optimizer"] == 0 and ph["forward"] + ph["backward"] == pytest.approx(r["gflop_per_step"])
        assert r["gflop_x_no_kd"] == pytest.approx(r["gflop_per_step"] / none["gflop_per_step"])


def test_hmkd_and_icd_flops_per_part(bench):
    _, rows = bench
    hmkd, icd = rows["hmkd"], rows["icd"]
    parts = hmkd["gflop_parts"]
    assert set(parts) == {"decoder_attention", "decoder_kv", "decoder_aux", "inquiry_head", "value_proj", "adapters",
                          "gcblock_bg", "other"}
    extra = hmkd["gflop_per_step"] - hmkd["gflop_floor"]
    assert sum(parts.values()) <= extra * (1 + 1e-9)
    assert sum(parts.values()) == pytest.approx(hmkd["gflop_split"]["method"], rel=1e-9)
    assert parts["inquiry_head"] > 0
    for name in ("decoder_attention", "decoder_kv", "decoder_aux", "value_proj", "adapters", "gcblock_bg"):
        assert parts[name] > 0, name
    # backward attributed by autograd node: the key/value pass at P2 is the key, value and position
    # projections' forward (3 products of Ct x hidden per cell), the keys' input gradient and the
    # three weight gradients (the teacher maps and the position code need none). FlopCounterMode's
    # own module tracker gave the value projection alone 1.26 GFLOP here (the rest of the backward).
    unit = 2 * CT * HIDDEN * B * CELLS["P2"]
    assert parts["decoder_kv"] == pytest.approx(7 * unit * G, rel=1e-9)
    assert hmkd["gflop_x_floor"] > 1
    ip = icd["gflop_parts"]
    assert set(ip) == {"decoder_kv", "decoder_aux", "value_proj", "other"}
    assert ip["decoder_kv"] > 0 and ip["decoder_aux"] > 0 and ip["value_proj"] > 0
    assert sum(ip.values()) == pytest.approx(icd["gflop_split"]["method"], rel=1e-9)
    assert "gflop_parts" not in rows["fitnet"] and "gflop_parts" not in rows["none"]


def test_flop_count_leaves_the_timed_results_alone(bench):
    res, rows = bench
    for r in rows.values():
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0  # the counted step is not a timed one
        assert set(r["phases_s"]) == {"forward", "student_forward", "teacher_forward", "distill_forward", "backward",
                                      "optimizer"}
        assert sum(r["phases_s"][k] for k in ("forward", "backward", "optimizer")) == pytest.approx(r["step_s"])
    md = res["table"]
    assert "| method | s/step | x no-KD | x floor | GFLOP/step | x no-KD (FLOPs) | x floor (FLOPs) |" in md
    assert f"| fitnet | {rows['fitnet']['step_s']:.3f} |" in md
    assert "Floor in FLOPs" in md and "hmkd FLOPs per part" in md and "| inquiry_head |" in md
    assert "icd FLOPs per part" in md


# ------------------------------------------------------------------------------------ biggest tensors (issue 29)
TENSOR_KEYS = {"mb", "shape", "dtype", "op", "module", "range", "owner", "phase", "saved_for_backward"}


def test_biggest_tensors_of_every_method(bench):
    res, rows = bench
    for name, r in rows.items():
        for key in ("biggest_tensors", "biggest_method_tensors"):
            ts = r[key]
            assert all(set(t) == TENSOR_KEYS for t in ts), (name, key)
            assert [t["mb"] for t in ts] == sorted((t["mb"] for t in ts), reverse=True), (name, key)
        assert len(r["biggest_tensors"]) == 8, name
        assert all(t["owner"] == "method" for t in r["biggest_method_tensors"]), name
        if name != "none":
            assert len(r["biggest_method_tensors"]) == 8, name
            # the method's own are among the step's tensors: none bigger than the step's biggest
            assert r["biggest_method_tensors"][0]["mb"] <= r["biggest_tensors"][0]["mb"]
    # no-KD's biggest: resnet18's biggest weight (layer4 3x3 512->512, float32: 9 MiB) gets its gradient
    # first in the backward, at layer4.1.conv2 (the batch's activations are at most 0.5 MiB here)
    assert rows["none"]["biggest_tensors"][0] == {
        "mb": 9.0, "shape": [512, 512, 3, 3], "dtype": "float32", "op": "aten.convolution_backward",
        "module": "student.backbone.body.layer4.1.conv2", "range": None, "owner": "student", "phase": "backward",
        "saved_for_backward": None}
    # FitNet's own: its P2 adapter (1x1, Cs -> Ct) output, batch 2 at 16x16, saved for the MSE's backward
    adapter = {"mb": B * CT * CELLS["P2"] * 4 / 2**20, "shape": [B, CT, 16, 16], "dtype": "float32",
               "op": "aten.convolution", "module": "losses.P2.adapter", "range": "hmkd_bench.distill_forward",
               "owner": "method", "phase": "forward", "saved_for_backward": True}
    assert adapter in rows["fitnet"]["biggest_method_tensors"]
    md = res["table"]
    assert "Biggest tensors of one step" in md
    assert "| 1 | 9 | 512x512x3x3 | float32 | `aten.convolution_backward` |" in md
    for name in ("fitnet", "hmkd", "icd"):
        assert f"{name}, the method's own biggest tensors" in md


def test_biggest_forward_tensor_and_n_zero_turns_the_report_off(tiny_cfg, tmp_path, one_thread):
    res = run_cost_bench(tiny_cfg, methods=["none"], out_dir=str(tmp_path / "a"), iters=1, warmup=0, profile_steps=0,
                         biggest_tensors=40)
    (none,) = res["methods"]
    assert len(none["biggest_tensors"]) == 40 and res["biggest_tensors"] == 40
    # the tiny config's biggest activation: the ResNet stem's conv output, batch 2 x 64 channels at half
    # the 64 px input, float32; the group norm's input, so saved for the backward
    fwd = [t for t in none["biggest_tensors"] if t["phase"] == "forward"]
    assert fwd[0] == {"mb": 0.5, "shape": [2, 64, 32, 32], "dtype": "float32", "op": "aten.convolution",
                      "module": "student.backbone.body.conv1", "range": None, "owner": "student", "phase": "forward",
                      "saved_for_backward": True}
    off = run_cost_bench(tiny_cfg, methods=["none"], out_dir=str(tmp_path / "b"), iters=1, warmup=0, profile_steps=0,
                         biggest_tensors=0)
    (none_off,) = off["methods"]
    assert "biggest_tensors" not in none_off and "biggest_method_tensors" not in none_off
    assert off["biggest_tensors"] == 0 and "Biggest tensors" not in off["table"] and "Biggest tensors" in res["table"]
    assert "biggest_tensors" not in json.loads((tmp_path / "b" / "cost.json").read_text())["methods"][0]
    with pytest.raises(ConfigError, match=r"biggest_tensors=-1\)$"):
        run_cost_bench(tiny_cfg, methods=["none"], out_dir=str(tmp_path / "c"), biggest_tensors=-1)


# ------------------------------------------------------------------------------------ AMP and random frozen norms
class _FakeScaler:
    """A GradScaler that finds inf gradients (halves its scale, skips the step) on its first 3 updates."""

    def __init__(self, *args, **kwargs):
        self.s, self.updates = 65536.0, 0

    def get_scale(self):
        return self.s

    def scale(self, loss):
        return loss

    def unscale_(self, opt):
        pass

    def step(self, opt):
        if self.updates >= 3:
            opt.step()

    def update(self):
        self.updates += 1
        if self.updates <= 3:
            self.s /= 2


def test_amp_warm_up_runs_until_the_grad_scaler_stops_skipping(tiny_cfg, tmp_path, one_thread, monkeypatch):
    import hmkd.bench.cost as cost

    real_init = cost._MethodRun.__init__

    def with_amp(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.amp = True  # as on CUDA with train.amp (the autocast itself does nothing to CPU tensors)

    monkeypatch.setattr(cost._MethodRun, "__init__", with_amp)
    monkeypatch.setattr(torch.amp, "GradScaler", _FakeScaler)
    res = run_cost_bench(tiny_cfg, methods=["none"], out_dir=str(tmp_path / "amp"), iters=2, warmup=1,
                         profile_steps=0, biggest_tensors=0)
    # 1 warm-up step skipped (scale 65536 -> 32768), then 2 more skipped ones and the one that was not
    assert res["methods"][0]["amp_scaler"] == {"scale": 8192.0, "extra_warmup_steps": 3, "timed_skipped_steps": 0}
    assert "Mixed precision: GradScaler scale after the timed steps" in res["table"]


def test_random_frozen_norms_get_their_input_statistics(tiny_cfg, tmp_path, one_thread):
    """A random R101 body with frozen norms is a stack of plain residual additions whose maps blow up
    (a random R101 teacher's distillation losses ~1e11 made the student NaN in two steps): the bench
    gives each untrained frozen norm its input's statistics first; trained ones are left alone."""
    import torchvision
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    from hmkd.bench.cost import calibrate_untrained_frozen_norms

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            body = torchvision.models.resnet101(norm_layer=FrozenBatchNorm2d)
            self.student = nn.Sequential(*list(body.children())[:-2])  # the body, up to its last map

        def forward(self, images, targets, iteration):
            return self.student(torch.stack(images))

    torch.manual_seed(0)
    net = Net()
    trained = net.student[4][0].bn1  # layer1's first norm
    trained.running_var.fill_(4.0)  # as loaded from a checkpoint: left alone
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        before = net(images, None, 0).std().item()
    rng = torch.get_rng_state()
    n = calibrate_untrained_frozen_norms(net, (images, []), amp=False)
    assert n == sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) - 1
    assert torch.equal(torch.get_rng_state(), rng) and torch.all(trained.running_var == 4.0)
    with torch.no_grad():
        after = net(images, None, 0).std().item()
    assert before > 1000 and after < 10  # measured: std 2178 -> 1.08 (max 14528 -> 7.1)
    assert calibrate_untrained_frozen_norms(net, (images, []), amp=False) == 0  # nothing untrained left
