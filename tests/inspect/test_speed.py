"""Speed/FLOPs report on tiny detectors: files, keys, and a distilled student costing what the student costs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hmkd.bench.speed import count_flops, models_from_config, speed_report
from hmkd.config import Config, ModelConfig
from hmkd.errors import ConfigError
from hmkd.models import build_model, count_parameters, load_weights
from hmkd.models.specs import as_model


def tiny(detector: str = "fcos", backbone: str = "resnet18", **kw) -> ModelConfig:
    base = dict(
        detector=detector, backbone=backbone, num_classes=3, fpn_channels=32, min_size=160, max_size=160,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, topk_candidates=100, detections_per_img=50,
    )
    base.update(kw)
    return ModelConfig(**base)


def distilled_ckpt(cfg: ModelConfig, path, seed: int = 7) -> str:
    """A student-shaped checkpoint with other weights, as training with a distiller writes it."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "iteration": 10}, path)
    return str(path)


def test_speed_report_files_keys_and_distilled_cost(tmp_path):
    student = tiny()
    ckpt = distilled_ckpt(student, tmp_path / "hmkd.pt")
    models = {"teacher": tiny(fpn_channels=64), "student": student, "hmkd": (student, ckpt)}
    rep = speed_report(models, out_dir=tmp_path / "out", input_size=(160, 160), warmup=1, iters=2)
    out = tmp_path / "out"
    data = json.loads((out / "speed.json").read_text())
    assert data == json.loads(json.dumps(rep))
    for key in ("input_size", "device", "threads", "warmup", "iters", "flops_note", "not_counted", "models"):
        assert key in data
    assert data["flops_per_multiply_add"] == 2 and "2 FLOPs" in data["flops_note"]
    assert list(data["models"]) == ["teacher", "student", "hmkd"]
    for r in data["models"].values():
        for key in ("params", "params_m", "gflops", "flops", "latency_ms", "fps", "onnx", "network_input"):
            assert key in r
        assert r["gflops"] > 0 and r["latency_ms"]["n"] == 2 and r["fps"]["median"] > 0
        assert r["network_input"] == [160, 160] and r["onnx"] is None
    t, s, d = (data["models"][k] for k in ("teacher", "student", "hmkd"))
    assert d["params"] == s["params"] and d["flops"] == s["flops"] and d["arch"] == s["arch"]
    assert t["params"] > s["params"] and t["flops"] > s["flops"]
    md = (out / "speed.md").read_text()
    assert "| hmkd |" in md and "multiply-add = 2 FLOPs" in md and "ONNX Runtime" not in md
    with Image.open(out / "gflops_vs_params.png") as im:
        assert im.format == "PNG" and im.size == (720, 540)


def test_speed_report_onnx_runtime(tmp_path):
    rep = speed_report({"student": tiny()}, out_dir=tmp_path, input_size=(160, 192), warmup=1, iters=2, onnx=True)
    o = rep["models"]["student"]["onnx"]
    assert o["matches_torch"] and o["latency_ms"]["n"] == 2 and o["fps"]["median"] > 0
    assert (tmp_path / "onnx" / "student.onnx").is_file()
    assert "ONNX Runtime" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize("detector", ["fcos", "faster_rcnn"])
def test_distilled_checkpoint_costs_the_same_as_plain_student(tmp_path, detector):
    cfg = tiny(detector)
    ckpt = distilled_ckpt(cfg, tmp_path / "d.pt")
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    loaded = build_model(cfg).eval()
    load_weights(loaded, ckpt)  # the distilled weights in a plain student
    assert any((a != b).any() for a, b in zip(plain.state_dict().values(), loaded.state_dict().values()))
    img = torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(0))
    fp, fl = count_flops(plain, img), count_flops(loaded, img)
    assert count_parameters(plain) == count_parameters(loaded)
    if detector == "faster_rcnn":  # the box head's cost follows the proposal count: both at the cap
        assert fp["proposals"] == fl["proposals"] == cfg.rpn_post_nms_top_n_test
    assert fp["flops"] == fl["flops"] and fp["by_op"] == fl["by_op"]


def test_models_from_config_and_errors(tmp_path):
    cfg = Config(model=tiny(), teacher=tiny(backbone="resnet34"))
    specs = models_from_config(cfg, {"hmkd": "a.pt", "teacher": "t.pt"})
    assert list(specs) == ["teacher", "student", "hmkd"]
    assert specs["hmkd"] == (cfg.model, "a.pt") and specs["teacher"] == (cfg.teacher, "t.pt")
    assert list(models_from_config(Config(model=tiny()))) == ["student"]
    with pytest.raises(ConfigError, match="no models"):
        speed_report({}, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="num_classes"):
        speed_report({"s": tiny(num_classes=None)}, out_dir=tmp_path, iters=1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            speed_report({"s": tiny()}, out_dir=tmp_path, device="cuda")


def test_module_spec_keeps_its_transform(tmp_path):
    model = as_model(tiny())
    rep = speed_report({"m": model}, out_dir=tmp_path, input_size=(160, 224), warmup=0, iters=1)
    assert rep["models"]["m"]["network_input"] == [160, 224]  # its own transform would give [128, 160]
    assert model.transform.min_size == (160,) and model.transform.max_size == 160  # restored
