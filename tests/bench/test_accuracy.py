"""The accuracy benchmark end to end at toy size, and every preset under configs/ loading and building.

- a tiny benchmark (no-KD + HMKD, one seed, a few iterations, a teacher trained by the benchmark)
  writes results.json / .md / .png with the expected keys, each run in its own child process;
- a second call reuses every finished run (no file of a run is rewritten) and an ablation in the
  same folder reuses the teacher, the no-KD run and the variant equal to plain HMKD;
- a run folder holding another config is refused, not silently reused;
- every YAML under configs/ loads, and its student, teacher and distiller build (weights files
  that do not exist here are skipped: models are built with ``load=False``).
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from hmkd.bench.accuracy import (
    METRICS,
    ablation_variants,
    plan_runs,
    run_accuracy_bench,
    run_config,
    run_spec,
    spec_diff,
    with_defaults,
)
from hmkd.bench.accuracy.plan import AITOD_METRICS
from hmkd.config import load_config
from hmkd.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = [
    "name=tinybench", "device=cpu", "seed=3",
    "data.kind=synthetic", "data.synth.n_train=4", "data.synth.n_val=2", "data.synth.size=96",
    "data.synth.preset=hard", "data.batch_size=2", "data.eval_batch_size=2", "data.workers=0",
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
    "model.levels=[P2,P3,P4,P5]", "model.min_size=96", "model.max_size=96",
    "model.detections_per_img=20", "model.topk_candidates=50",
    "teacher.backbone=resnet18",
    "train.iters=1", "train.warmup_iters=0", "train.log_period=1", "train.ckpt_period=0",
    "distill.method=hmkd", "distill.options.hidden=32", "distill.options.heads=4", "distill.options.fit_iters=2",
]


def _tiny_cfg(data_root: str, *extra: str):
    return load_config(None, TINY + [f"data.root={data_root}", *extra])


def _log(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def _mtimes(folder: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def test_tiny_benchmark_writes_results_and_resumes(tmp_path):
    data_root = str(tmp_path / "data")
    out = str(tmp_path / "bench")
    cfg = _tiny_cfg(data_root)
    # in-process here (fast); the ablation call below runs its new variant in a child process
    res = run_accuracy_bench(cfg, methods=["hmkd"], seeds=1, out_dir=out, progress=False, teacher_iters=1,
                             isolate=False)

    for ext in ("json", "md", "png"):
        assert os.path.getsize(os.path.join(out, f"results.{ext}")) > 0, ext
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["table"] == res["table"]
    assert set(saved) >= {"runs", "methods", "teacher", "machine", "command", "config", "seeds", "table"}
    assert saved["seeds"] == [3]
    assert set(saved["machine"]) >= {"platform", "cpu_count", "torch"}
    assert set(saved["runs"]) == {"none_s3", "hmkd_s3"}  # none is always there
    for name, run in saved["runs"].items():
        assert run["seed"] == 3 and not run["reused"]
        assert set(run["bbox"]) == set(METRICS) | set(AITOD_METRICS)  # eval.aitod is on by default
        assert run["sec_per_iter"] > 0 and run["peak_mem_mb"] > 0
        assert os.path.isfile(os.path.join(out, "runs", name, "model_final.pth"))
        assert json.load(open(os.path.join(out, "runs", name, "metrics.json")))["iteration"] == 1
    hm = saved["methods"]["hmkd"]
    assert set(hm) >= {"mean", "std", "gain", "gap_closed", "sec_per_iter", "cost_vs_none", "peak_mem_mb"}
    assert hm["std"]["mAP"] is None  # one seed: no spread
    assert hm["gain"]["mAP"] == pytest.approx(hm["mean"]["mAP"] - saved["methods"]["none"]["mean"]["mAP"])
    assert saved["teacher"]["source"] == "trained" and saved["teacher"]["iterations"] == 1
    assert set(saved["teacher"]["metrics"]) == set(METRICS) | set(AITOD_METRICS)
    assert set(hm["mean"]) == set(METRICS) | set(AITOD_METRICS)
    md = open(os.path.join(out, "results.md")).read()
    for row in ("| teacher (resnet18, 1 it) |", "| student (no-KD) |", "| HMKD |", "s/iter", "x no-KD",
                "| AI-TOD size buckets |"):
        assert row in md, row

    # a second call: every run is reused, nothing is retrained or rewritten
    before = _mtimes(os.path.join(out, "runs"))
    again = run_accuracy_bench(cfg, methods=["hmkd"], seeds=1, out_dir=out, progress=False, teacher_iters=1,
                               isolate=False)
    assert _mtimes(os.path.join(out, "runs")) == before
    assert all(r["reused"] for r in again["runs"].values()) and again["teacher"]["reused"]
    assert again["methods"]["hmkd"]["mean"] == hm["mean"]

    # an ablation in the same folder trains only the variant that differs from plain HMKD
    abl = run_accuracy_bench(cfg, seeds=1, out_dir=out, progress=False, teacher_iters=1, ablation="supplement",
                             isolate=True)
    assert _mtimes(os.path.join(out, "runs", "hmkd_s3")) == {k: v for k, v in before.items() if "/hmkd_s3/" in k}
    assert set(abl["runs"]) == {"none_s3", "hmkd_s3", "hmkd-nosupplement_s3"}
    new_run = abl["runs"]["hmkd-nosupplement_s3"]
    assert not new_run["reused"] and new_run["sec_per_iter"] > 0 and new_run["peak_mem_mb"] > 0
    assert not any(k.startswith("distill.bg") for r in _log(new_run["output_dir"]) for k in r)  # supplement off
    assert any(k.startswith("distill.bg") for r in _log(os.path.join(out, "runs", "hmkd_s3")) for k in r)
    assert os.path.isfile(os.path.join(out, "results_supplement.md"))
    assert "supplement off" in abl["table"]

    # a run folder of another config is refused, not reused
    with pytest.raises(ConfigError, match="another config"):
        run_accuracy_bench(_tiny_cfg(data_root, "train.lr=0.002"), methods=["hmkd"], seeds=1, out_dir=out,
                           progress=False, teacher_iters=1)


def test_run_configs_keep_the_distill_section_beyond_method_and_options(tmp_path):
    """A run's config is the bench config with the variant's method and options: other distill
    keys (teacher_dtype) must survive (they were silently reset to their defaults)."""
    cfg = _tiny_cfg(str(tmp_path / "data"), "distill.teacher_dtype=bfloat16")
    runs = {v.key: run_config(cfg, v, 0, "t.pth", str(tmp_path / v.key)) for v in plan_runs(cfg, ["fitnet", "hmkd"])}
    assert runs["hmkd"].distill.teacher_dtype == "bfloat16" and runs["hmkd"].distill.options == {"hidden": 32, "heads": 4, "fit_iters": 2}
    assert runs["fitnet"].distill.teacher_dtype == "bfloat16" and runs["fitnet"].distill.method == "fitnet"
    assert runs["none"].distill.teacher_dtype == "float32" and runs["none"].teacher is None  # no teacher to run


def test_plans_and_ablation_variants(tmp_path):
    cfg = _tiny_cfg(str(tmp_path / "data"))
    assert [v.key for v in plan_runs(cfg)] == ["none", "fitnet", "fgd", "icd", "hmkd"]
    assert [v.key for v in plan_runs(cfg, ["icd", "fitnet"])] == ["none", "fitnet", "icd"]
    hm = [v for v in plan_runs(cfg) if v.method == "hmkd"][0]
    assert hm.options == {"hidden": 32, "heads": 4, "fit_iters": 2}  # cfg.distill.options go to cfg.distill.method only
    assert [v for v in plan_runs(cfg) if v.method == "icd"][0].options == {}
    heads = ablation_variants(cfg, "heads")
    assert [v.key for v in heads] == ["hmkd-heads1", "hmkd", "hmkd-heads8"]  # the paper's Table 6: 1, 4, 8
    starts = ablation_variants(cfg, "start_level")  # student and teacher have P2-P5
    assert [v.key for v in starts] == ["hmkd", "hmkd-startp4", "hmkd-startp5"]  # P3 is the default start
    bg = ablation_variants(cfg, "others_bg")
    assert [v.key for v in bg] == ["hmkd", "hmkd-fgbg"] and bg[1].options["others_bg_weight"] == 1.0
    lv = ablation_variants(cfg, "levels")  # student and teacher have P2-P5; the default is P2-P4
    assert [v.key for v in lv] == ["hmkd", "hmkd-levelsall"] and lv[1].options["levels"] == ["P2", "P3", "P4", "P5"]
    assert lv[0].label == "HMKD, levels P2-P4 (= HMKD)"
    wt = ablation_variants(cfg, "weight")
    assert [v.key for v in wt] == ["hmkd", "hmkd-weight5"] and wt[1].options["alpha"] == wt[1].options["beta"] == 5.0
    ax = ablation_variants(cfg, "aux_every")
    assert [v.key for v in ax] == ["hmkd", "hmkd-auxevery4"] and ax[1].options["aux_every"] == 4
    assert ax[0].label == "HMKD, decoder task every step (= HMKD)"
    st = ablation_variants(cfg, "small_terms")  # attention term off: the attention_term ablation's runs
    assert [v.key for v in st] == ["hmkd", "hmkd-nosmallfg", "hmkd-noattn", "hmkd-nosmallterms"]
    assert st[2].key == ablation_variants(cfg, "attention_term")[1].key
    assert st[3].options["small_foreground"] is False and st[3].options["attention_term"] is False
    with pytest.raises(ConfigError, match="ablation"):
        ablation_variants(cfg, "nonsense")
    with pytest.raises(ConfigError, match="unknown method"):
        plan_runs(cfg, ["hmkd", "bogus"])


def test_method_variant_rows(tmp_path):
    """``method:option=value`` rows (as ``hmkd bench cost`` takes them): the method's config options, then
    these; their own run folders; a bad option fails before any run."""
    cfg = _tiny_cfg(str(tmp_path / "data"))
    rows = plan_runs(cfg, ["hmkd", "hmkd:decoder_training=frozen:inquiry_weight=0.5"])
    assert [v.key for v in rows] == ["none", "hmkd", "hmkd+decoder-training-frozen+inquiry-weight-0.5"]
    assert rows[2].method == "hmkd" and rows[2].options == {"hidden": 32, "heads": 4, "fit_iters": 2,
                                                            "decoder_training": "frozen", "inquiry_weight": 0.5}
    assert rows[2].label == "HMKD (decoder_training=frozen, inquiry_weight=0.5)"
    with pytest.raises(ConfigError, match="bogus"):
        plan_runs(cfg, ["hmkd:bogus=1"])
    with pytest.raises(ConfigError, match="option=value"):
        plan_runs(cfg, ["hmkd:frozen"])


PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_presets_exist():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in PRESETS}
    assert {"synth/bench.yaml", "synth/bench_teacher.yaml", "coco/faster_rcnn_r101_r50_hmkd.yaml",
            "coco/retinanet_r101_r50_hmkd.yaml", "coco/mask_rcnn_r101_r50_hmkd.yaml", "coco/fcos_r101_r50_hmkd.yaml",
            "coco/faster_rcnn_r101_mobilenetv2_hmkd.yaml", "coco/faster_rcnn_vovnet57_vovnet19_hmkd.yaml",
            "visdrone/retinanet_r101_r50_hmkd.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.relpath(p, ROOT) for p in PRESETS])
def test_every_preset_loads_and_builds(path):
    import torch

    from hmkd.distill import build_distiller, needs_teacher
    from hmkd.models import build_model

    cfg = load_config(path)
    n = cfg.model.num_classes or 80

    def build(m):
        files = [f for f in (m.weights, m.backbone_weights) if f]
        return build_model(m, n, load=bool(files) and all(os.path.isfile(f) for f in files))

    with torch.device("meta"):  # shapes only: building R101s at full size stays fast and small
        student = build(cfg.model)
        teacher = build(cfg.teacher) if cfg.teacher is not None else None
        if needs_teacher(cfg.distill.method):
            if teacher is not None:
                build_distiller(cfg.distill.method, student=student, teacher=teacher, options=cfg.distill.options)
        else:
            build_distiller(cfg.distill.method, student=student, options=cfg.distill.options)


def test_run_costs_read_the_peak_memory_past_a_torn_last_line(tmp_path):
    """The peak memory comes from log.jsonl as the trainer's own reader reads it (a run killed
    mid-write leaves a torn last line, skipped); no log: no peak."""
    from hmkd.bench.accuracy.store import run_costs

    timing = {"timing": {"sec_per_iter": 0.5}, "iteration": 3}
    assert run_costs(str(tmp_path), timing)["peak_mem_mb"] is None
    with open(tmp_path / "log.jsonl", "w") as f:
        f.write(json.dumps({"iteration": 1, "peak_mem_mb": 10.5}) + "\n")
        f.write(json.dumps({"iteration": 2, "eval": {"mAP": 0.1}}) + "\n")
        f.write(json.dumps({"iteration": 3, "peak_mem_mb": 30}) + "\n")
        f.write('{"iteration": 4, "peak_mem_mb": 99')  # torn
    costs = run_costs(str(tmp_path), timing)
    assert costs["peak_mem_mb"] == 30 and costs["sec_per_iter"] == 0.5 and costs["iterations"] == 3


def test_run_spec_from_before_a_new_config_key_still_matches(tmp_path):
    # a run recorded before distill.teacher_dtype existed is the same config when the key is at
    # its default, and another config when it is not
    cfg = _tiny_cfg(str(tmp_path / "data"))
    old = run_spec(cfg)
    del old["distill"]["teacher_dtype"]
    assert spec_diff(with_defaults(old), run_spec(cfg)) == []
    cfg.distill.teacher_dtype = "bfloat16"
    assert spec_diff(with_defaults(old), run_spec(cfg)) == ["distill.teacher_dtype: 'float32' -> 'bfloat16'"]


def test_runs_recorded_before_the_split_are_reused(tmp_path):
    """``data/bench_runs_before_split.json`` holds the ``bench_run.json`` contents that the
    accuracy bench wrote before it became a package (configs/synth/bench.yaml, --out
    /runs/bench_synth). The same runs made now must compare equal to them, and a folder holding
    such a record and a finished ``metrics.json`` must be reused, not retrained; a change of
    substance must still be seen."""
    from hmkd.bench.accuracy.runs import train_or_reuse
    from hmkd.bench.accuracy.spec import teacher_config

    stored = json.load(open(os.path.join(ROOT, "tests", "bench", "data", "bench_runs_before_split.json")))["runs"]
    cfg = load_config(os.path.join(ROOT, "configs", "synth", "bench.yaml"))
    out = "/runs/bench_synth"
    teacher_weights = f"{out}/runs/teacher/model_final.pth"
    now = {"teacher": teacher_config(cfg, None, None)}
    for v in plan_runs(cfg) + ablation_variants(cfg, "aux_every"):
        now[f"{v.key}_s0"] = run_config(cfg, v, 0, teacher_weights, f"{out}/runs/{v.key}_s0")
    assert set(now) == set(stored)
    for name, rc in now.items():
        assert spec_diff(with_defaults(stored[name]["spec"]), run_spec(rc)) == [], name

    # through the decision itself, in another folder (the folder is not part of the spec)
    run_dir = tmp_path / "runs" / "hmkd_s0"
    run_dir.mkdir(parents=True)
    (run_dir / "bench_run.json").write_text(json.dumps(stored["hmkd_s0"]))
    finished = {"status": "finished", "iteration": 360, "bbox": {k: 1.0 for k in METRICS}}
    (run_dir / "metrics.json").write_text(json.dumps(finished))
    rc = now["hmkd_s0"]
    rc.output_dir = str(run_dir)
    metrics, reused = train_or_reuse(rc, str(run_dir), isolate=True, progress=False, what="hmkd")
    assert reused and metrics == finished

    rc.train.lr = 0.002
    assert spec_diff(with_defaults(stored["hmkd_s0"]["spec"]), run_spec(rc)) == ["train.lr: 0.001 -> 0.002"]
    with pytest.raises(ConfigError, match="another config"):
        train_or_reuse(rc, str(run_dir), isolate=True, progress=False, what="hmkd")


# -- distill.init_student in the benchmark -------------------------------------------------------------
def test_init_student_set_once_for_every_row_and_the_teacher_initialised_no_kd_row(tmp_path):
    from hmkd.bench.accuracy import NONE_INIT

    cfg = _tiny_cfg(str(tmp_path / "data"), "distill.init_student=neck_head")
    variants = plan_runs(cfg)
    assert [v.key for v in variants] == ["none", NONE_INIT, "fitnet", "fgd", "icd", "hmkd"]
    runs = {v.key: run_config(cfg, v, 0, "t.pth", str(tmp_path / v.key)) for v in variants}
    # the plain no-KD row stays exactly as it was: no teacher, no distill section
    assert runs["none"].teacher is None and runs["none"].distill.init_student is None
    assert run_spec(runs["none"]) == run_spec(run_config(_tiny_cfg(str(tmp_path / "data")), variants[0], 0, None,
                                                         str(tmp_path / "none")))
    ni = runs[NONE_INIT]
    assert ni.distill.method == "none" and ni.distill.init_student == "neck_head" and ni.distill.options == {}
    assert ni.teacher is not None and ni.teacher.weights == os.path.abspath("t.pth")
    assert variants[1].label == "student (no-KD, teacher-initialised)"
    for key in ("fitnet", "fgd", "icd", "hmkd"):
        assert runs[key].distill.init_student == "neck_head", key
    assert run_spec(runs["fitnet"])["distill"]["init_student"] == "neck_head"

    # not set: every method starts as its authors' do, and the row is there only when asked for
    plain = _tiny_cfg(str(tmp_path / "data"))
    assert NONE_INIT not in [v.key for v in plan_runs(plain)]
    asked = plan_runs(plain, [NONE_INIT, "fgd"])
    assert [v.key for v in asked] == ["none", NONE_INIT, "fgd"]
    assert asked[1].init_student == "neck_head"  # FGD's and ICD's default
    assert run_config(plain, asked[2], 0, "t.pth", str(tmp_path / "f")).distill.init_student is None
    neck = plan_runs(_tiny_cfg(str(tmp_path / "data"), "distill.init_student=neck"), ["fgd"])
    assert [v.key for v in neck] == ["none", NONE_INIT, "fgd"] and neck[1].init_student == "neck"
    assert neck[1].label == "student (no-KD, teacher-initialised FPN)"
    assert [v.key for v in plan_runs(cfg, ablation="weight")][:2] == ["none", NONE_INIT]
    with pytest.raises(ConfigError, match="none_init: distill.init_student is none"):
        plan_runs(_tiny_cfg(str(tmp_path / "data"), "distill.init_student=none"), [NONE_INIT])


def test_run_spec_from_before_init_student_still_matches(tmp_path):
    cfg = _tiny_cfg(str(tmp_path / "data"))
    old = run_spec(cfg)
    assert old["distill"]["init_student"] is None
    del old["distill"]["init_student"]
    assert spec_diff(with_defaults(old), run_spec(cfg)) == []
    cfg.distill.init_student = "neck_head"
    assert spec_diff(with_defaults(old), run_spec(cfg)) == ["distill.init_student: None -> 'neck_head'"]


def test_tiny_benchmark_with_the_teacher_initialised_no_kd_row(tmp_path):
    import torch

    out = str(tmp_path / "bench")
    cfg = _tiny_cfg(str(tmp_path / "data"), "train.iters=0")  # students at their start: the copy itself
    res = run_accuracy_bench(cfg, methods=["none_init"], seeds=1, out_dir=out, progress=False, teacher_iters=1,
                             isolate=False)
    assert set(res["runs"]) == {"none_s3", "none_init_s3"}
    assert "| student (no-KD, teacher-initialised) |" in res["table"]
    teacher = torch.load(res["teacher"]["weights"], weights_only=False)["model"]
    init = torch.load(os.path.join(out, "runs", "none_init_s3", "model_final.pth"), weights_only=False)["model"]
    plain = torch.load(os.path.join(out, "runs", "none_s3", "model_final.pth"), weights_only=False)["model"]
    heads = [k for k in init if k.startswith(("backbone.fpn.", "head."))]
    assert all(torch.equal(init[k], teacher[k]) for k in heads)
    assert not all(torch.equal(plain[k], teacher[k]) for k in heads)
    body = [k for k in init if k.startswith("backbone.body.")]
    assert all(torch.equal(init[k], plain[k]) for k in body)  # same seed: the same student body


def test_paper_regime_rows_pretrained_stand_in_and_stage_times(tmp_path, monkeypatch):
    """Named rows (ICD with the pre-fitted decoder) and the pretrained stand-in: made once before the
    teacher, recorded with its wall time, and every run's wall time kept across starts."""
    monkeypatch.delenv("HMKD_CACHE", raising=False)  # the benchmark's own cache: OUT/cache
    out = str(tmp_path / "bench")
    cfg = _tiny_cfg(str(tmp_path / "data"), "model.backbone_weights=pretrain", "teacher.backbone_weights=pretrain",
                    "teacher.backbone=resnet34", "pretrain.iters=1", "pretrain.synth.n_train=2",
                    "pretrain.synth.n_val=1", "pretrain.synth.size=96", "pretrain.batch_size=2")
    res = run_accuracy_bench(cfg, methods=["icd_fitted"], seeds=1, out_dir=out, progress=False, teacher_iters=1,
                             isolate=False)
    assert set(res["pretrained"]) == {"student", "teacher"}
    assert res["pretrained"]["teacher"]["backbone"] == "resnet34"
    for p in res["pretrained"].values():
        assert p["weights"].startswith(os.path.join(out, "cache", "backbones")) and p["wall_seconds"] > 0
    assert set(res["runs"]) == {"none_s3", "icd-fitted_s3"}
    run = res["runs"]["icd-fitted_s3"]
    assert run["method"] == "icd" and run["options"] == {"decoder_fit": "auto"} and run["wall_seconds"] > 0
    assert os.listdir(os.path.join(out, "cache", "decoders"))  # the decoder was fitted before training
    md = open(os.path.join(out, "results.md")).read()
    assert "| pretrained stand-in, teacher (resnet34, 1 it) |" in md and "| ICD (decoder pre-fitted" in md
