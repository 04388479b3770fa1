"""``hmkd viz attention``: the matching decoder's attention of small objects, fitted beside untrained,
on a tiny real setup (a tiny FCOS teacher, HMKD's decoder fitted for a few steps on a tiny synthetic
set, CPU): the PNGs, their size, the in-box masses, the errors, and the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hmkd.cli import main
from hmkd.config import load_config
from hmkd.data import build_data
from hmkd.data.image_files import resolve_images
from hmkd.distill.matching.fit import prepare_decoder
from hmkd.distill.matching.report import build_decoder_method
from hmkd.errors import ConfigError
from hmkd.models import build_model
from hmkd.viz.attention import figure_inches, viz_attention

TINY_MODEL = [
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
    "model.levels=[P3,P4,P5,P6]", "model.norm=gn",
    "model.min_size=128", "model.max_size=128", "model.detections_per_img=20", "model.topk_candidates=100",
]
HEADS = 4


def overrides(synth_root: str, teacher: str, *extra: str) -> list[str]:
    items = ["name=tiny", "device=cpu", "seed=3", "data.kind=synthetic", f"data.root={synth_root}",
             "data.synth.n_train=4", "data.synth.n_val=3", "data.synth.size=128", "data.batch_size=2",
             "data.eval_batch_size=2", "data.workers=0", *TINY_MODEL,
             f"teacher.weights={teacher}", "distill.method=hmkd", "distill.options.hidden=32",
             f"distill.options.heads={HEADS}", "distill.options.fit_iters=4", "distill.options.fit_lr=0.003",
             "distill.options.position_code=absolute", "distill.options.fakes=mixed",
             "distill.options.attention_supervision=1.0"]
    items += [f"teacher.{o.split('=', 1)[0].split('.', 1)[1]}={o.split('=', 1)[1]}" for o in TINY_MODEL]
    return items + list(extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(synthetic root, teacher checkpoint, fitted decoder file)."""
    root = tmp_path_factory.mktemp("attn")
    synth = str(root / "synth")
    cfg = load_config(None, TINY_MODEL + ["model.num_classes=6"])
    torch.manual_seed(5)
    teacher = str(root / "teacher.pth")
    torch.save(build_model(cfg.model).state_dict(), teacher)
    cfg = load_config(None, overrides(synth, teacher))
    train = build_data(cfg, train=True)
    distiller = build_decoder_method(cfg, train, torch.device("cpu"))
    decoder = str(root / "decoder.pt")
    prepare_decoder(distiller, cfg, train, torch.device("cpu"), output=decoder)
    return synth, teacher, decoder


def test_figures_masses_and_record(setup, tmp_path):
    synth, teacher, decoder = setup
    cfg = load_config(None, overrides(synth, "unused.pth"))
    val = build_data(cfg, train=False)
    name1 = val.coco.imgs[val.ids[1]]["file_name"]
    res = viz_attention(cfg, decoder=decoder, weights=teacher, images=[0, name1], out_dir=tmp_path / "out",
                        objects=2, dpi=60)
    assert len(res["paths"]) == 2 and [r["index"] for r in res["images"]] == [0, 1]
    drawn = 0
    for rec in res["images"]:
        (name, fig), = rec["figures"].items()
        assert name == "P4" and fig["key_level"] == "P3" and fig["stride"] == 8.0 and fig["heads"] == HEADS
        assert os.path.basename(fig["path"]) == os.path.splitext(os.path.basename(rec["file_name"]))[0] + "_attention_P3.png"
        with Image.open(fig["path"]) as im:
            h0, w0 = val.get_height_and_width(rec["index"])
            width, height = figure_inches(HEADS, len(fig["objects"]), h0 / w0)
            assert im.size == (round(width * 60), round(height * 60))
            arr = np.asarray(im.convert("RGB"))
        assert arr.std() > 10  # not a blank page
        assert len(fig["objects"]) == min(2, fig["inquiring"])
        areas = [o["area"] for o in fig["objects"]]
        assert areas == sorted(areas) and all(a < 32 * 32 for a in areas)  # the smallest small objects
        for o in fig["objects"]:
            fitted, untrained = o["in_box"]["fitted"], o["in_box"]["untrained"]
            assert len(fitted) == len(untrained) == HEADS
            assert all(0.0 <= v <= 1.0 + 1e-5 for v in fitted + untrained)
            assert not np.allclose(fitted, untrained)  # the fitted decoder is not the untrained one
            assert 0.0 < o["uniform"] < 1.0 and o["cells_in_box"] >= 1
            drawn += 1
    assert drawn >= 1, "the tiny set should have small objects"
    saved = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert saved["paths"] == res["paths"]
    assert saved["images"][0]["figures"]["P4"]["objects"][0]["in_box"] == res["images"][0]["figures"]["P4"]["objects"][0]["in_box"]
    # the untrained decoder is the same at every call (initialised under the config's seed)
    again = viz_attention(cfg, decoder=decoder, weights=teacher, images=[0], out_dir=tmp_path / "again", objects=1,
                          levels=["P3"], dpi=40)
    first = res["images"][0]["figures"]["P4"]["objects"][0]["in_box"]
    for state in ("fitted", "untrained"):
        assert again["images"][0]["figures"]["P4"]["objects"][0]["in_box"][state] == pytest.approx(first[state])


def test_one_line_errors(setup, tmp_path):
    synth, teacher, decoder = setup
    cfg = load_config(None, overrides(synth, teacher))
    val = build_data(cfg, train=False)
    assert resolve_images(val, ["2", 0, "images/" + os.path.basename(val.coco.imgs[val.ids[1]]["file_name"])]) == [2, 0, 1]
    with pytest.raises(ConfigError, match=r"--images 7: no validation image 7 \(the set has 3"):
        resolve_images(val, ["7"])
    with pytest.raises(ConfigError, match=r"--images nope\.png: neither a validation index .* nor a file name in .*val\.json"):
        resolve_images(val, ["nope.png"])
    with pytest.raises(ConfigError, match="--level P5: no decoder attends over that level .*P4 over P3"):
        viz_attention(cfg, decoder=decoder, images=[0], out_dir=tmp_path, levels=["P5"])
    other = str(tmp_path / "other.pth")
    sd = torch.load(teacher)
    next(iter(sd.values())).add_(1.0)
    torch.save(sd, other)
    with pytest.raises(ConfigError, match=r"decoder\.pt: fitted on another teacher"):
        viz_attention(cfg, decoder=decoder, weights=other, images=[0], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="the fitted decoder does not match"):
        viz_attention(load_config(None, overrides(synth, teacher, "distill.options.hidden=64")), decoder=decoder,
                      images=[0], out_dir=tmp_path)
    assert not os.path.exists(tmp_path / "attention.json")


def test_command_line(setup, tmp_path, capsys):
    synth, teacher, decoder = setup
    cfg_path = tmp_path / "hmkd.yaml"
    cfg_path.write_text(yaml.safe_dump({"name": "tiny"}))
    args = ["viz", "attention", str(cfg_path), *overrides(synth, "unused.pth"), "--weights", teacher,
            "--decoder", decoder, "--images", "0", "--objects", "1", "--level", "P3", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and printed[0].endswith("_attention_P3.png") and os.path.getsize(printed[0]) > 0
    assert main(args[:-2] + ["--images", "99", "--out", str(tmp_path / "bad")]) == 2
    assert "hmkd: error: --images 99: no validation image 99" in capsys.readouterr().err


def test_an_image_without_inquiring_objects_gets_the_image_alone(setup, tmp_path):
    synth, teacher, decoder = setup
    cfg = load_config(None, overrides(synth, teacher, "distill.options.small_area=0"))  # no object is small
    res = viz_attention(cfg, decoder=decoder, images=[0], out_dir=tmp_path, dpi=40)
    fig = res["images"][0]["figures"]["P4"]
    assert fig["inquiring"] == 0 and fig["objects"] == []
    with Image.open(fig["path"]) as im:
        width, height = figure_inches(HEADS, 0, 1.0)
        assert im.size == (round(width * 40), round(height * 40))


def test_icd_decoder_over_several_levels(setup, tmp_path):
    synth, teacher, _ = setup
    items = [o for o in overrides(synth, teacher) if not o.startswith("distill.method=")] + ["distill.method=icd"]
    cfg = load_config(None, items + ["distill.options.fit_iters=2"])
    train = build_data(cfg, train=True)
    decoder = str(tmp_path / "icd.pt")
    prepare_decoder(build_decoder_method(cfg, train, torch.device("cpu")), cfg, train, torch.device("cpu"), output=decoder)
    res = viz_attention(cfg, decoder=decoder, images=[0], out_dir=tmp_path, objects=1, dpi=40)
    (name, fig), = res["images"][0]["figures"].items()
    assert name == "" and fig["key_level"] == "P3-P6" and fig["stride"] == [8.0, 16.0, 32.0, 64.0]
    assert os.path.basename(fig["path"]).endswith("_attention_P3-P6.png") and os.path.getsize(fig["path"]) > 0
    (obj,) = fig["objects"]  # ICD: every object inquires, the smallest is drawn
    assert all(0.0 <= v <= 1.0 + 1e-5 for v in obj["in_box"]["fitted"] + obj["in_box"]["untrained"])
