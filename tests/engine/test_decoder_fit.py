"""Fitting the matching decoder on the teacher alone: the cache and its key, reuse, frozen training,
the quality measures and their shortcut probes (tiny FCOS pair on a tiny synthetic set, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from hmkd.config import load_config
from hmkd.data import build_data
from hmkd.distill.matching.decoder import KeyValues
from hmkd.distill.matching import fit as decoder_fit
from hmkd.distill.matching.fit import fit_key, load_fitted, prepare_decoder, teacher_digest
from hmkd.distill.matching.quality import measure_decoder, other_image_keys, quality_markdown, shuffled_keys
from hmkd.distill.matching.report import build_decoder_method, fit_decoder_report
from hmkd.training.step import train_step
from hmkd.errors import ConfigError
from hmkd.models import build_model

TINY_MODEL = [
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
    "model.levels=[P3,P4,P5,P6]", "model.norm=gn",
    "model.min_size=128", "model.max_size=128", "model.detections_per_img=20", "model.topk_candidates=100",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    cfg = load_config(None, TINY_MODEL + ["model.num_classes=6"])
    torch.manual_seed(5)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save(build_model(cfg.model).state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HMKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_cfg(synth_root, teacher, *extra):
    items = ["name=tiny", "device=cpu", "seed=3", "data.kind=synthetic", f"data.root={synth_root}",
             "data.synth.n_train=4", "data.synth.n_val=4", "data.synth.size=128", "data.batch_size=2",
             "data.eval_batch_size=2", "data.workers=0", *TINY_MODEL,
             "train.iters=2", "train.warmup_iters=1", "train.log_period=1", "train.ckpt_period=0", "train.eval_period=0",
             f"teacher.weights={teacher}", "distill.method=hmkd", "distill.options.hidden=32", "distill.options.heads=4",
             "distill.options.fit_iters=3", "distill.options.position_code=absolute", "distill.options.fakes=mixed",
             "distill.options.attention_supervision=1.0"]
    items += [f"teacher.{o.split('=', 1)[0].split('.', 1)[1]}={o.split('=', 1)[1]}" for o in TINY_MODEL]
    return load_config(None, items + list(extra))


def _method(cfg):
    train = build_data(cfg, train=True)
    return build_decoder_method(cfg, train, torch.device("cpu")), train


def test_fit_report_then_every_later_run_reuses_the_cached_fit(synth_root, teacher_weights, cache, monkeypatch):
    cfg = make_cfg(synth_root, teacher_weights)
    report = fit_decoder_report(cfg, quality_images=4, progress=False)
    path = report["decoder"]
    assert os.path.dirname(path) == str(cache / "decoders") and os.path.isfile(path)
    assert os.path.isfile(path + ".quality.json") and os.path.isfile(path + ".quality.md")
    obj = load_fitted(path)
    assert obj["teacher"]["sha256"] == teacher_digest(teacher_weights) and obj["fit"]["iters"] == 3
    res = report["results"]
    assert set(res) == {"untrained", "fitted"}
    q = res["fitted"]["P4"]
    assert 0.0 <= q["identification"]["accuracy"] <= 1.0
    assert 0.0 <= q["identification"]["keys_shuffled"] <= 1.0
    assert len(q["attention"]["heads"]) == 4
    for s in [q["attention"]["all_heads"], *q["attention"]["heads"]]:
        assert 0.0 <= s["in_box_median"] <= s["within2_median"] <= 1.0
        assert 1.0 <= s["exp_entropy_median"] <= 16 * 16

    # a later run of the same key loads the file and never fits
    def no_fit(*a, **k):
        raise AssertionError("fitted again")

    monkeypatch.setattr(decoder_fit, "fit_decoder", no_fit)
    d, train = _method(make_cfg(synth_root, teacher_weights, "distill.options.decoder_fit=auto"))
    assert prepare_decoder(d, cfg, train, torch.device("cpu")) == path
    for k, v in d.decoder_state().items():
        assert torch.equal(v, obj["state_dict"][k])


def test_the_cache_key_covers_teacher_task_and_input_but_not_the_distillation(synth_root, teacher_weights, tmp_path):
    base = make_cfg(synth_root, teacher_weights)
    d, _ = _method(base)
    sha = teacher_digest(teacher_weights)
    key = fit_key(d, base, sha)
    assert fit_key(d, base, "0" * 64) != key
    for change in ("distill.options.fakes=random", "distill.options.jitter=0.5", "model.min_size=96",
                   "data.label_map=category_id"):
        cfg = make_cfg(synth_root, teacher_weights, change)
        assert fit_key(_method(cfg)[0], cfg, sha) != key, change
    for same in ("distill.options.alpha=3.0", "distill.options.decoder_training=joint", "data.workers=1", "seed=11"):
        cfg = make_cfg(synth_root, teacher_weights, same)
        assert fit_key(_method(cfg)[0], cfg, sha) == key, same


def test_a_fit_does_not_depend_on_the_seed_the_distiller_was_built_with(synth_root, teacher_weights) -> None:
    states = []
    for seed in (1, 2):
        cfg = make_cfg(synth_root, teacher_weights, f"seed={seed}")
        torch.manual_seed(seed)
        d, train = _method(cfg)
        decoder_fit.fit_decoder(d, train, batch_size=2, device=torch.device("cpu"), iters=2)
        states.append(d.decoder_state())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_fitted_file_of_another_teacher_or_shape_is_refused(synth_root, teacher_weights, tmp_path):
    cfg = make_cfg(synth_root, teacher_weights)
    d, train = _method(cfg)
    out = str(tmp_path / "dec.pt")
    prepare_decoder(d, cfg, train, torch.device("cpu"), output=out)
    other = str(tmp_path / "other_teacher.pth")
    sd = torch.load(teacher_weights)
    next(iter(sd.values())).add_(1.0)
    torch.save(sd, other)
    cfg2 = make_cfg(synth_root, other, f"distill.options.decoder_fit={out}")
    d2, _ = _method(cfg2)
    with pytest.raises(ConfigError, match="fitted on another teacher"):
        prepare_decoder(d2, cfg2, train, torch.device("cpu"))
    cfg3 = make_cfg(synth_root, teacher_weights, f"distill.options.decoder_fit={out}", "distill.options.hidden=64")
    d3, _ = _method(cfg3)
    with pytest.raises(ConfigError, match=r"dec\.pt: the fitted decoder does not match"):
        prepare_decoder(d3, cfg3, train, torch.device("cpu"))


def test_a_frozen_fitted_decoder_runs_no_aux_task_and_has_no_optimiser(synth_root, teacher_weights, tmp_path):
    cfg = make_cfg(synth_root, teacher_weights)
    d, train = _method(cfg)
    out = str(tmp_path / "dec.pt")
    prepare_decoder(d, cfg, train, torch.device("cpu"), output=out)
    cfg = make_cfg(synth_root, teacher_weights, f"distill.options.decoder_fit={out}", "distill.options.decoder_training=frozen")
    d, train = _method(cfg)
    prepare_decoder(d, cfg, train, torch.device("cpu"))
    before = {k: v.clone() for k, v in d.decoder_state().items()}
    assert d.make_extra_optimizers() == []
    d.train()
    images, targets = zip(*[train[i] for i in range(2)])
    opt = torch.optim.SGD(d.student_parameters() + d.distiller_parameters(), lr=0.01)
    values = train_step(d, opt, list(images), list(targets), 5, main_params=d.student_parameters() + d.distiller_parameters(),
                        clip_grad=None)
    assert not any(k.startswith("aux.") for k in values)
    assert "distill.small_attn_p3" in values and "metric.in_box_p3" in values
    # metric.* is logged, never summed into the loss
    assert values["total"] == pytest.approx(sum(v for k, v in values.items() if k.split(".")[0] in ("student", "distill")),
                                            rel=1e-5)
    assert all(p.grad is None for p in d.decoder_modules().parameters())
    for k, v in d.decoder_state().items():
        assert torch.equal(v, before[k])


def test_distillation_fits_once_with_decoder_fit_auto(synth_root, teacher_weights, cache, tmp_path):
    from hmkd.training import train

    cfg = make_cfg(synth_root, teacher_weights, "distill.options.decoder_fit=auto", "distill.options.decoder_training=frozen",
                   "train.keep_last_checkpoint=true")
    train(cfg, output_dir=str(tmp_path / "run"), progress=False)
    files = [f for f in os.listdir(cache / "decoders") if f.endswith(".pt")]
    assert len(files) == 1
    fitted = load_fitted(str(cache / "decoders" / files[0]))["state_dict"]
    state = torch.load(tmp_path / "run" / "last_checkpoint.pth", weights_only=False)["distiller"]
    dec = {k.split("decoders.", 1)[1]: v for k, v in state.items() if k.startswith("decoders.")}
    assert dec.keys() == fitted.keys()
    for k, v in fitted.items():  # after training, the frozen decoder is exactly the fitted one
        assert torch.equal(dec[k], v)


# -- the shortcut probes ---------------------------------------------------------------------------
def test_shuffled_keys_move_content_within_each_image_only() -> None:
    keys = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 1, 6, 1).expand(2, 2, 6, 3).clone()
    pad = torch.tensor([[False, False, False, False, True, True], [False] * 6])
    kv = KeyValues(keys, keys + 100, pad, ((2, 3, 8.0),))
    s = shuffled_keys(kv, torch.Generator().manual_seed(0))
    assert torch.equal(s.keys[0, :, 4:], keys[0, :, 4:])  # padding stays
    assert sorted(s.keys[0, 0, :4, 0].tolist()) == [0.0, 1.0, 2.0, 3.0]  # image 0's valid content, permuted
    assert sorted(s.keys[1, 0, :, 0].tolist()) == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert not torch.equal(s.keys, keys)
    assert torch.equal(s.values - 100, s.keys)  # keys and values move together
    o = other_image_keys(kv)
    assert torch.equal(o.keys[0], keys[1]) and torch.equal(o.pad[1], pad[0])


def test_quality_measures_of_an_attention_spread_over_the_box(synth_root, teacher_weights, monkeypatch) -> None:
    # every head spreads its mass evenly over the object's cells: in box 1, top cell in box,
    # exp(entropy) = the box's cell count, in box / uniform = 1 / uniform share
    from hmkd.distill.matching.task import cells_in_boxes
    from hmkd.distill.masks import pad_boxes

    cfg = make_cfg(synth_root, teacher_weights, "distill.options.inquiries=all")
    d, _ = _method(cfg)
    real = d.distillation_attention
    cells, heads = [], []

    def spread(*args):
        out = {}
        for name, (m, valid, boxes, kv) in real(*args).items():
            inside = cells_in_boxes(pad_boxes(boxes)[0], kv.grid).float()
            cells.append(inside.sum(-1)[valid])
            even = inside / inside.sum(-1, keepdim=True).clamp(min=1)
            out[name] = (even[:, None].expand_as(m).contiguous(), valid, boxes, kv)
            heads.append(m.shape[1])
        return out

    monkeypatch.setattr(d, "distillation_attention", spread)
    a = measure_decoder(d, build_data(cfg, train=False), device=torch.device("cpu"), batch_size=2)["P4"]["attention"]
    n_cells = torch.cat(cells)
    m_heads = heads[0]
    assert a["inquiries"] == n_cells.numel() > 0
    s = a["all_heads"]
    assert s["in_box_median"] == pytest.approx(1.0) and s["within2_median"] == pytest.approx(1.0)
    assert s["top_in_box"] == 1.0
    assert s["exp_entropy_median"] == pytest.approx(float(n_cells.median()), rel=1e-4)
    assert s["in_box_over_uniform_median"] == pytest.approx(float((1.0 / torch.tensor(0.0 + a["uniform_median"]))), rel=0.5)
    assert a["goal_met"] == (s["in_box_over_uniform_median"] >= 10.0)
    # the mass a window around each inquiry keeps: all of a one-cell box's, more with a larger window
    win = a["window_inside"]
    means = [win[k]["mean"] for k in sorted(win)]
    assert sorted(win) == [3, 5, 7, 9, 11, 15] and means == sorted(means) and 0.0 < means[0] and means[-1] <= 1.0 + 1e-6
    assert means[0] >= float((n_cells == 1).float().mean()) - 1e-6
    p10 = [win[k]["p10"] for k in sorted(win)]
    assert p10 == sorted(p10) and p10[-1] <= 1.0 + 1e-6 and all(len(win[k]["heads_mean"]) == m_heads for k in win)
    assert "inside a window of k x k cells" in quality_markdown({"fitted": {"P4": {"attention": a}}})


def test_nothing_is_fitted_without_a_decoder(synth_root, teacher_weights, cache) -> None:
    cfg = make_cfg(synth_root, teacher_weights, "distill.options.decoder_fit=auto", "distill.options.attention_term=false")
    d, train = _method(cfg)
    assert prepare_decoder(d, cfg, train, torch.device("cpu")) is None
    assert not (cache / "decoders").exists()


def test_icd_fits_and_freezes_its_decoder_too(synth_root, teacher_weights, tmp_path) -> None:
    cfg = make_cfg(synth_root, teacher_weights, "distill.method=icd")
    d, train = _method(cfg)
    out = str(tmp_path / "icd.pt")
    prepare_decoder(d, cfg, train, torch.device("cpu"), output=out)
    assert load_fitted(out)["spec"]["method"] == "icd" and load_fitted(out)["spec"]["levels"] == ["P3", "P4", "P5", "P6"]
    cfg = make_cfg(synth_root, teacher_weights, "distill.method=icd", f"distill.options.decoder_fit={out}",
                   "distill.options.decoder_training=frozen")
    d, train = _method(cfg)
    prepare_decoder(d, cfg, train, torch.device("cpu"))
    (name, opt, _), = d.make_extra_optimizers()  # the student-side projection still learns
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in d.value_proj.parameters()}
    d.train()
    images, targets = zip(*[train[i] for i in range(2)])
    losses = d(list(images), list(targets), iteration=10**6)
    assert set(k for k in losses if not k.startswith("student.")) == {"distill.icd"}
