"""ONNX export of tiny detectors and the onnxruntime-vs-PyTorch check."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from hmkd.config import ModelConfig
from hmkd.errors import ConfigError
from hmkd.export.onnx import ExportError, check_onnx, export_onnx, onnx_session, read_label_map, resized_size
from hmkd.models.checkpoint_info import LabelMap
from hmkd.models.specs import as_model

H, W = 160, 192  # not square, so an H/W swap would show
LABELS = LabelMap((3, 7, 12), ("car", "person", "bike"))  # category ids that are not 1..K


def tiny(detector: str, **kw) -> ModelConfig:
    base = dict(
        detector=detector, backbone="resnet18", num_classes=3, fpn_channels=32, min_size=160, max_size=192,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, score_thresh=0.001,
        topk_candidates=100, detections_per_img=50,
    )
    base.update(kw)
    return ModelConfig(**base)


def images(n: int = 2) -> list[torch.Tensor]:
    return [torch.rand(3, H, W, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``detector -> (model, onnx path)``, each exported once for the module."""
    cache: dict[str, tuple[nn.Module, str]] = {}

    def get(detector: str) -> tuple[nn.Module, str]:
        if detector not in cache:
            torch.manual_seed(0)
            model = as_model(tiny(detector))
            d = tmp_path_factory.mktemp(detector)
            path = export_onnx(model, d / "m.onnx", input_size=(H, W), metadata={"classes": "a,b,c"}, label_map=LABELS)
            assert sorted(p.name for p in d.iterdir()) == ["m.onnx"]  # no temp file left
            cache[detector] = (model, path)
        return cache[detector]

    return get


@pytest.mark.parametrize("detector", ["fcos", "faster_rcnn", "retinanet"])
def test_export_matches_pytorch(detector, exported):
    model, path = exported(detector)
    proto = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["classes"] == "a,b,c" and meta["producer"] == "hmkd"
    assert meta["input_size"] == f"{H},{W}" and meta["resized_to"] == "{},{}".format(*resized_size(model, (H, W)))
    # the label map: output label -> the data set's category id and name, in the file and through onnxruntime
    expected = {1: {"category_id": 3, "name": "car"}, 2: {"category_id": 7, "name": "person"},
                3: {"category_id": 12, "name": "bike"}}
    assert read_label_map(path) == expected
    runtime = json.loads(onnx_session(path).get_modelmeta().custom_metadata_map["label_map"])
    assert {int(k): v for k, v in runtime.items()} == expected
    sess = onnx_session(path)
    assert sess.get_inputs()[0].shape == [3, H, W]
    assert {"boxes", "scores", "labels"} <= {o.name for o in sess.get_outputs()}
    res = check_onnx(model, path, images(), score_thresh=0.005)
    assert res["ok"], res
    assert res["atol"] == pytest.approx(1e-3 * W)
    assert all(r["n_torch"] > 0 and r["n_torch"] == r["n_onnx"] for r in res["per_image"])
    assert res["max_abs_diff_boxes"] <= res["atol"] and res["max_abs_diff_scores"] <= 1e-3
    assert not model.training


def test_check_detects_other_weights_and_wrong_size(exported):
    a, path = exported("fcos")
    torch.manual_seed(1)
    b = as_model(tiny("fcos"))
    assert not check_onnx(b, path, images(1), score_thresh=0.005)["ok"]
    with pytest.raises(ConfigError, match=r"\[3, 160, 192\]"):
        check_onnx(a, path, [torch.rand(3, W, H)])


def test_failed_export_keeps_existing_file(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(ExportError, match="not a torchvision detection model"):
        export_onnx(nn.Conv2d(3, 3, 1), out, input_size=(H, W))
    with pytest.raises(ConfigError, match="exporter"):
        export_onnx(as_model(tiny("fcos")), out, input_size=(H, W), exporter="tflite")
    assert out.read_bytes() == b"old"


def test_resized_size_and_no_label_map(tmp_path):
    model = as_model(tiny("fcos"))  # min_size 160, max_size 192
    assert resized_size(model, (H, W)) == (160, 192)
    assert resized_size(model, (320, 320)) == (160, 160)
    assert resized_size(model, (100, 400)) == (48, 192)  # the longer side capped at max_size
    path = export_onnx(model, tmp_path / "m.onnx", input_size=(64, 64))
    assert read_label_map(path) is None
