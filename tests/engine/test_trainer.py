"""The training engine end to end on a tiny synthetic set (CPU, a few iterations each).

Covers: the files a run writes, a resumed run reaching bit-identical weights to an uninterrupted
one (interrupted by SIGINT, and after a crash on a non-finite loss), the non-finite-loss stop,
teacher configuration errors, ``evaluate`` agreeing with the run's own final evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
import signal
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmkd.config import load_config
from hmkd.distill import Distiller, MethodOptions, register
from hmkd.engine import checkpoint as ck
from hmkd.engine.sampler import InfiniteBatchSampler
from hmkd.engine.evaluation import evaluate
from hmkd.engine.optim import WarmupSchedule
from hmkd.training import TrainingInterrupted, train
from hmkd.errors import CheckpointError, ConfigError, NonFiniteLossError
from hmkd.models import build_model, fpn_channels_of


# -- a tiny distiller exercising every part of the interface ---------------------------------------
@dataclass
class ToyOptions(MethodOptions):
    weight: float = 0.5
    nan_at: int | None = None  # make distill.toy NaN at this (0-based) iteration
    interrupt_at: int | None = None  # send ourselves SIGINT during this iteration
    aux_every: int = 1  # the aux probe's loss only on every k-th iteration (as HMKD's aux_every)


@register("toy_test", "test-only: adapter MSE to the teacher's P3 with noise, plus an aux probe")
class ToyDistiller(Distiller):
    Options = ToyOptions
    needs_teacher = True

    def __init__(self, student, teacher=None, options=None):
        super().__init__(student=student, teacher=teacher, options=options)
        self.adapter = nn.Conv2d(fpn_channels_of(student), fpn_channels_of(teacher), 1)
        self.probe = nn.Linear(fpn_channels_of(teacher), 1)
        self._extra = None

    def extra_modules(self):
        return {"probe": self.probe}

    def extra_optimizers(self):
        if self._extra is None:
            self._extra = [("probe", torch.optim.AdamW(self.probe.parameters(), lr=1e-2), 1.0)]
        return self._extra

    def make_extra_schedulers(self, total_iters):
        # a schedule over the run (like ICD's cosine decoder lr): resume must restore it
        (_, opt, _), = self.extra_optimizers()
        return [("probe", torch.optim.lr_scheduler.LambdaLR(opt, WarmupSchedule(total_iters, "cosine")))]

    def distill_losses(self, inputs, iteration):
        t = inputs.teacher_features["P3"]
        noise = 1 + 0.1 * torch.rand_like(t)  # draws from the global RNG: resume must restore it
        loss = self.options.weight * F.mse_loss(self.adapter(inputs.student.features["P3"]), t * noise)
        if self.options.nan_at == iteration:
            loss = loss * float("nan")
        if self.options.interrupt_at == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        if iteration % self.options.aux_every:
            return {"distill.toy": loss}
        aux = (self.probe(t.mean((2, 3))) - 1).pow(2).mean()
        return {"distill.toy": loss, "aux.toy": aux}


TINY_MODEL = [
    "model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
    "model.levels=[P3,P4,P5,P6]",
    "model.min_size=128", "model.max_size=128", "model.detections_per_img=20", "model.topk_candidates=100",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory, synth_root):
    cfg = load_config(None, TINY_MODEL + ["model.num_classes=6"])
    torch.manual_seed(123)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save(build_model(cfg.model).state_dict(), path)
    return path


def make_cfg(synth_root, *extra, teacher=None):
    items = [
        "name=tiny", "device=cpu", "seed=7",
        "data.kind=synthetic", f"data.root={synth_root}", "data.synth.n_train=4", "data.synth.n_val=3",
        "data.synth.size=128", "data.batch_size=2", "data.eval_batch_size=2", "data.workers=0",
        *TINY_MODEL,
        "train.iters=4", "train.warmup_iters=2", "train.lr=0.001", "train.log_period=1", "train.ckpt_period=0",
        "train.eval_period=0", "train.keep_last_checkpoint=true",  # the tests compare the resume states
    ]
    if teacher:
        items += [f"teacher.{o.split('=', 1)[0].split('.', 1)[1]}={o.split('=', 1)[1]}" for o in TINY_MODEL]
        items += [f"teacher.weights={teacher}", "distill.method=toy_test"]
    return load_config(None, items + list(extra))


def _no_nan(x):
    """nan -> None, recursively (nan != nan would fail a dict comparison)."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return None if isinstance(x, float) and x != x else x


def _same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            _same_state(va, vb, f"{what}.{k}")
        elif torch.is_tensor(va):
            assert torch.equal(va, vb), f"{what}.{k} differs"
        else:
            assert va == vb, f"{what}.{k}: {va} != {vb}"


# -- tests ---------------------------------------------------------------------------------------------
def test_end_to_end_writes_outputs_and_weights_load(synth_root, tmp_path):
    out = str(tmp_path / "run")
    cfg = make_cfg(synth_root, "train.iters=3", "train.eval_period=2", "train.ckpt_period=2", "train.amp=true")
    with pytest.warns(UserWarning, match="amp"):
        metrics = train(cfg, output_dir=out, progress=False)
    for f in ("config.yaml", "log.jsonl", "metrics.json", "loss_curve.png", "model_final.pth", "model_best.pth",
              "last_checkpoint.pth", "eval/metrics.json", "eval/detections.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert metrics["status"] == "finished" and metrics["iteration"] == 3
    assert set(metrics["bbox"]) >= {"mAP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert metrics["timing"]["sec_per_iter"] > 0 and metrics["timing"]["amp"] is False
    assert [e["iteration"] for e in metrics["evals"]] == [2, 3]

    steps = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    train_steps = [r for r in steps if "total" in r]
    assert [r["iteration"] for r in train_steps] == [1, 2, 3]
    for r in train_steps:
        assert {"lr", "total", "sec_per_iter", "peak_mem_mb", "student.classification"} <= set(r)
        assert r["total"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("student.")), rel=1e-5)
    assert train_steps[0]["lr"] == pytest.approx(0.001 * 0.001)  # warm-up starts at lr * warmup_factor
    assert json.load(open(os.path.join(out, "metrics.json")))["iteration"] == 3

    saved = load_config(os.path.join(out, "config.yaml"))
    assert saved.model.num_classes == 6 and saved.output_dir == out
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    saved.model.weights = os.path.join(out, "model_final.pth")
    again = build_model(saved.model)
    for k, v in again.state_dict().items():
        assert torch.equal(v, final["model"][k])

    ev = evaluate(cfg, weights=os.path.join(out, "model_final.pth"), out_dir=str(tmp_path / "ev"), progress=False)
    assert json.load(open(tmp_path / "ev" / "detections.json")) == json.load(open(os.path.join(out, "eval", "detections.json")))
    assert _no_nan(ev) == _no_nan({"bbox": metrics["bbox"]})


@pytest.fixture(scope="module")
def straight_run(synth_root, teacher_weights, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    train(make_cfg(synth_root, teacher=teacher_weights), output_dir=out, progress=False)
    return out


def _assert_same_run(a: str, b: str) -> None:
    fa = ck.load_checkpoint(os.path.join(a, "model_final.pth"))
    fb = ck.load_checkpoint(os.path.join(b, "model_final.pth"))
    _same_state(fa["model"], fb["model"], "model")
    la = ck.load_checkpoint(os.path.join(a, "last_checkpoint.pth"))
    lb = ck.load_checkpoint(os.path.join(b, "last_checkpoint.pth"))
    assert la["iteration"] == lb["iteration"] == 4
    _same_state(la["distiller"], lb["distiller"], "distiller")
    _same_state(la["optimizer"]["state"], lb["optimizer"]["state"], "optimizer")
    _same_state(la["extra_optimizers"]["probe"]["state"], lb["extra_optimizers"]["probe"]["state"], "probe")
    assert la["scheduler"]["last_epoch"] == lb["scheduler"]["last_epoch"]
    # the distiller's own schedule (cosine over the 4 iterations): restored, and stepped once per iteration
    sa, sb = la["extra_schedulers"]["probe"], lb["extra_schedulers"]["probe"]
    assert sa["last_epoch"] == sb["last_epoch"] == 4 and sa["_last_lr"] == sb["_last_lr"] == [0.0]
    ga, gb = la["extra_optimizers"]["probe"]["param_groups"], lb["extra_optimizers"]["probe"]["param_groups"]
    assert [g["lr"] for g in ga] == [g["lr"] for g in gb] == [0.0]
    log_a = [json.loads(x) for x in open(os.path.join(a, "log.jsonl"))]
    log_b = [json.loads(x) for x in open(os.path.join(b, "log.jsonl"))]
    assert [r["iteration"] for r in log_a] == [r["iteration"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        if "total" in ra:
            assert ra["total"] == rb["total"] and ra["lr"] == rb["lr"]


def test_sigint_then_resume_matches_uninterrupted_run(synth_root, teacher_weights, straight_run, tmp_path, caplog):
    out = str(tmp_path / "interrupted")
    cfg = make_cfg(synth_root, "distill.options.interrupt_at=1", teacher=teacher_weights)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, output_dir=out, progress=False)
    assert e.value.iteration == 2 and isinstance(e.value, KeyboardInterrupt)
    assert ck.load_checkpoint(os.path.join(out, "last_checkpoint.pth"))["iteration"] == 2
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored

    with caplog.at_level(logging.WARNING, logger="hmkd.training.trainer"):
        train(make_cfg(synth_root, teacher=teacher_weights), output_dir=out, resume=True, progress=False)
    _assert_same_run(straight_run, out)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("with a changed config: distill.options.interrupt_at 1 -> None" in m for m in said), said


def test_console_lines_outputs_and_summary(synth_root, teacher_weights, tmp_path, caplog, capsys):
    """What a finished run says and leaves: the data summary and the teacher's own metrics before
    iteration 1, one detectron2-style line per log_period (no tqdm when stderr is not a terminal),
    the checkpoints a user needs (no resume state, no model_best.pth copy of the final model) with
    the mode every other output has, and a short summary table."""
    teacher = str(tmp_path / "teacher_final.pth")
    sd = torch.load(teacher_weights, weights_only=True)
    nan = float("nan")
    torch.save({"model": sd, "iteration": 90, "config": {"name": "tiny_teacher"},
                "metrics": {"bbox": {"mAP": 31.25, "AP50": 50.0, "AP75": 30.0, "APs": 20.0, "APm": 40.0, "APl": nan}}},
               teacher)
    out = str(tmp_path / "run")
    cfg = make_cfg(synth_root, "train.log_period=2", "train.keep_last_checkpoint=false", "train.ckpt_period=2",
                   teacher=teacher)
    with caplog.at_level(logging.INFO):
        metrics = train(cfg, output_dir=out, progress=True)
    said = [r.getMessage() for r in caplog.records if r.name == "hmkd.training.trainer"]
    first_step = next(i for i, m in enumerate(said) if m.startswith("eta: "))
    before = said[:first_step]
    assert any(m.startswith("data: train: 4 images, ") and "small" in m for m in before), before
    assert any(m.startswith("data: val: 3 images, ") for m in before), before
    assert any(m == f"teacher {teacher}: bbox mAP 31.2  AP50 50.0  AP75 30.0  APs 20.0  APm 40.0  APl - "
               "(its own evaluation, iteration 90 of run 'tiny_teacher')" for m in before), before
    steps = [m for m in said if m.startswith("eta: ")]
    assert [m.split("iter: ")[1].split()[0] for m in steps] == ["2/4", "4/4"]
    for m in steps:
        for part in ("total: ", "detection: ", "distillation: ", "auxiliary: ", "lr: ", "time: ", "data_time: ", "max_mem: "):
            assert part in m, (part, m)
    assert "\r" not in capsys.readouterr().err  # no tqdm bar: stderr is not a terminal here

    files = sorted(os.listdir(out))
    assert "last_checkpoint.pth" not in files and "model_best.pth" not in files, files
    assert {"model_final.pth", "metrics.json", "log.jsonl", "loss_curve.png", "config.yaml", "eval"} <= set(files)
    mode = stat.S_IMODE(os.stat(os.path.join(out, "metrics.json")).st_mode)
    assert stat.S_IMODE(os.stat(os.path.join(out, "model_final.pth")).st_mode) == mode
    assert set(metrics["outputs"]) == {"final", "metrics", "log", "loss_curve", "eval"}

    from hmkd.engine.logging_utils import format_summary

    text = format_summary(metrics)
    assert text.startswith("finished: 4 iterations (toy_test) in ")
    assert "| bbox |" in text and "nan" not in text.lower() and len(text.splitlines()) < 20
    assert "model_final.pth" in text and "last_checkpoint.pth" not in text

    # --resume where there is nothing to resume is an error naming the path, never a fresh start
    with pytest.raises(CheckpointError, match=r"holds a finished run whose resume state was removed"):
        train(cfg, output_dir=out, resume=True, progress=False)
    typo = str(tmp_path / "rnu")
    with pytest.raises(CheckpointError, match=rf"^--resume: no {typo}/last_checkpoint.pth: the output folder {typo} does not exist"):
        train(cfg, output_dir=typo, resume=True, progress=False)
    assert not os.path.exists(typo)


def test_extra_optimiser_without_gradients_is_skipped(synth_root, teacher_weights, tmp_path):
    """A method whose own module gets a loss only on some steps (HMKD's aux_every): the trainer
    steps that optimiser only when it has gradients, and logs the term where it exists."""
    out = str(tmp_path / "aux_every")
    train(make_cfg(synth_root, "distill.options.aux_every=2", teacher=teacher_weights), output_dir=out, progress=False)
    last = ck.load_checkpoint(os.path.join(out, "last_checkpoint.pth"))
    steps = {int(s["step"]) for s in last["extra_optimizers"]["probe"]["state"].values()}
    assert steps == {2}  # iterations 0 and 2 of 4
    log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [r["iteration"] for r in log if "aux.toy" in r] == [1, 3]
    assert [r["iteration"] for r in log if "distill.toy" in r] == [1, 2, 3, 4]


def test_nonfinite_loss_stops_keeps_checkpoint_and_resume_matches(synth_root, teacher_weights, straight_run, tmp_path):
    out = str(tmp_path / "nan")
    cfg = make_cfg(synth_root, "distill.options.nan_at=2", "train.ckpt_period=2", teacher=teacher_weights)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, output_dir=out, progress=False)
    msg = str(e.value)
    assert "distill.toy" in msg and "iteration 3" in msg and "\n" not in msg
    assert "student." not in msg  # only the bad term is named (and the total)
    last = ck.load_checkpoint(os.path.join(out, "last_checkpoint.pth"))
    assert last["iteration"] == 2
    # the last good checkpoint resumes to exactly the uninterrupted run
    train(make_cfg(synth_root, "train.ckpt_period=2", teacher=teacher_weights), output_dir=out, resume=True, progress=False)
    _assert_same_run(straight_run, out)


def test_teacher_configuration_errors(synth_root, teacher_weights, tmp_path):
    cfg = make_cfg(synth_root, "distill.method=toy_test")
    with pytest.raises(ConfigError, match="needs a teacher"):
        train(cfg, output_dir=str(tmp_path / "a"), progress=False)
    cfg = make_cfg(synth_root, "teacher.weights=null", teacher=teacher_weights)
    with pytest.raises(ConfigError, match="teacher.weights"):
        train(cfg, output_dir=str(tmp_path / "b"), progress=False)
    # the teacher may have its own classes (its heads are never run), but then its file must hold them
    cfg = make_cfg(synth_root, "teacher.num_classes=3", teacher=teacher_weights)
    with pytest.raises(CheckpointError, match="the file has 6 classes \\+ background: set num_classes: 6"):
        train(cfg, output_dir=str(tmp_path / "c"), progress=False)
    with pytest.raises(ConfigError, match="distill.method must be one of none, .*, got 'nope'"):
        train(make_cfg(synth_root, "distill.method=nope"), output_dir=str(tmp_path / "d"), progress=False)


def test_tensorboard_is_optional(synth_root, tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard"):
            train(make_cfg(synth_root, "train.tensorboard=true", "train.iters=1"), output_dir=str(tmp_path), progress=False)
    else:  # pragma: no cover - not installed here
        pytest.skip("tensorboard is installed")


def test_sampler_order_is_resumable_without_loading():
    s = InfiniteBatchSampler(5, 2, seed=3)
    it = iter(s)
    stream = [next(it) for _ in range(8)]  # crosses three epochs
    resumed = iter(InfiniteBatchSampler(5, 2, seed=3, start_iter=5))
    assert [next(resumed) for _ in range(3)] == stream[5:]
    for epoch in range(3):  # each epoch is a permutation
        idx = [i for b in stream for i, _ in b][epoch * 5 : epoch * 5 + 5]
        assert sorted(idx) == list(range(5))
    assert len({seed for b in stream for _, seed in b}) == 16  # one augmentation seed per draw
    # resuming with another batch size (or process count) goes on at the consumed-sample position
    other = InfiniteBatchSampler(5, 3, seed=3, start_iter=2, start_position=4)
    assert other.batch(2) == stream[2] + stream[3][:1] and other.batch(3) == stream[3][1:] + stream[4]


# -- distill.init_student: the student starts from the teacher's FPN and head --------------------------
def _keys(sd: dict, *prefixes: str) -> list[str]:
    return [k for k in sd if k.startswith(prefixes)]


def test_init_student_with_method_none_is_teacher_initialised_no_kd(synth_root, teacher_weights, tmp_path):
    out = str(tmp_path / "none_init")
    cfg = make_cfg(synth_root, "distill.method=none", "distill.init_student=neck_head", "train.iters=0",
                   teacher=teacher_weights)
    train(cfg, output_dir=out, progress=False)
    final = ck.load_checkpoint(os.path.join(out, "model_final.pth"))["model"]
    teacher = torch.load(teacher_weights, weights_only=True)
    copied = _keys(final, "backbone.fpn.", "head.")
    assert copied and all(torch.equal(final[k], teacher[k]) for k in copied)
    body = _keys(final, "backbone.body.")
    assert not any(torch.equal(final[k], teacher[k]) for k in body if k.endswith("conv1.weight"))
    # the same run without init_student: the student's own random FPN and head
    plain = str(tmp_path / "none_plain")
    train(make_cfg(synth_root, "train.iters=0"), output_dir=plain, progress=False)
    own = ck.load_checkpoint(os.path.join(plain, "model_final.pth"))["model"]
    assert not torch.equal(own["head.classification_head.cls_logits.weight"], teacher["head.classification_head.cls_logits.weight"])
    assert all(torch.equal(own[k], final[k]) for k in body)  # same seed, same body


def test_init_student_copies_at_the_start_only_never_on_resume(synth_root, teacher_weights, tmp_path, monkeypatch, caplog):
    import hmkd.models.weights as weights_io

    calls = []
    real = weights_io.init_from_teacher

    def spy(student, teacher, parts):
        calls.append(parts)
        return real(student, teacher, parts)

    monkeypatch.setattr(weights_io, "init_from_teacher", spy)
    out = str(tmp_path / "run")
    # FGD's default is neck_head (null = the method's authors' default); 2 iterations then 1 more on resume
    train(make_cfg(synth_root, "distill.method=none", "distill.init_student=neck", "train.iters=2",
                   teacher=teacher_weights), output_dir=out, progress=False)
    assert calls == ["neck"]
    with caplog.at_level(logging.WARNING, logger="hmkd.training.trainer"):
        metrics = train(make_cfg(synth_root, "distill.method=none", "distill.init_student=neck", "train.iters=3",
                                 teacher=teacher_weights), output_dir=out, resume=True, progress=False)
    assert calls == ["neck"] and metrics["iteration"] == 3  # resumed: the checkpoint holds the student
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("at iteration 2 with train.iters 2 -> 3" in m for m in said), said  # a changed length is said
    # the method's default: toy_test (like fitnet and hmkd) none, so nothing is copied
    train(make_cfg(synth_root, "train.iters=1", teacher=teacher_weights), output_dir=str(tmp_path / "toy"), progress=False)
    assert calls == ["neck"]


def test_init_student_configuration_errors(synth_root, teacher_weights, tmp_path):
    with pytest.raises(ConfigError, match=r"^distill.init_student neck_head \(method 'none'\) copies a trained teacher"):
        train(make_cfg(synth_root, "distill.init_student=neck_head"), output_dir=str(tmp_path / "a"), progress=False)
    with pytest.raises(ConfigError, match=r"^command line: distill.init_student must be one of none, neck, neck_head, got 'all'$"):
        train(make_cfg(synth_root, "distill.init_student=all"), output_dir=str(tmp_path / "b"), progress=False)


def test_a_method_clip_replaces_train_clip_grad(synth_root, teacher_weights, tmp_path, monkeypatch):
    import hmkd.training.trainer as trainer_mod

    seen = []
    real = trainer_mod.train_step

    def spy(*args, **kw):
        seen.append(kw["clip_grad"])
        return real(*args, **kw)

    monkeypatch.setattr(trainer_mod, "train_step", spy)
    train(make_cfg(synth_root, "train.iters=1", "train.clip_grad=10", teacher=teacher_weights),
          output_dir=str(tmp_path / "a"), progress=False)
    monkeypatch.setattr(ToyDistiller, "main_clip_grad", 3.5)  # as FGD's clip_grad
    train(make_cfg(synth_root, "train.iters=1", "train.clip_grad=10", teacher=teacher_weights),
          output_dir=str(tmp_path / "b"), progress=False)
    assert seen == [10.0, 3.5]


def test_fgd_runs_as_its_authors_by_default(synth_root, teacher_weights, tmp_path, monkeypatch):
    """method fgd with nothing set: the student from the teacher's FPN and head, clip 35, FGD's levels."""
    import hmkd.training.trainer as trainer_mod
    import hmkd.models.weights as weights_io

    inits, clips = [], []
    real_init, real_step = weights_io.init_from_teacher, trainer_mod.train_step
    monkeypatch.setattr(weights_io, "init_from_teacher",
                        lambda s, t, parts: inits.append(parts) or real_init(s, t, parts))
    monkeypatch.setattr(trainer_mod, "train_step", lambda *a, **kw: clips.append(kw["clip_grad"]) or real_step(*a, **kw))
    out = str(tmp_path / "fgd")
    train(make_cfg(synth_root, "distill.method=fgd", "train.iters=1", "train.clip_grad=10", teacher=teacher_weights),
          output_dir=out, progress=False)
    assert inits == ["neck_head"] and clips == [35.0]
    log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    fg = sorted(k for k in log[0] if k.startswith("distill.fgd_fg_"))
    assert fg == ["distill.fgd_fg_p3", "distill.fgd_fg_p4", "distill.fgd_fg_p5", "distill.fgd_fg_p6"]  # P3-P7 ∩ P3-P6
