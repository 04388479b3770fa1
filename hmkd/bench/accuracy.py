"""Accuracy benchmark: every distillation method side by side (the paper's Table 1) and the HMKD
ablations (Tables 5-7), on the same budget and the same seeds, resumable run by run.

What :func:`run_accuracy_bench` does::

    teacher    --teacher CKPT, else cfg.teacher.weights (must exist), else trained once:
               out_dir/runs/teacher  (the teacher config: ``teacher_cfg``, else cfg with
               model := cfg.teacher and train.iters := teacher_iters [3 x cfg.train.iters])
    students   for every method (none fitnet fgd icd hmkd) or ablation variant, for every seed s
               in [cfg.seed, cfg.seed + seeds): cfg with seed := s, distill.method := method,
               trained by hmkd.engine.trainer.train into out_dir/runs/<key>_s<seed>
    outputs    out_dir/results.json, results.md, results.png
               (an ablation writes results_<ablation>.json/.md/.png, so it can share out_dir
               and reuse the teacher and the no-KD runs of the main benchmark)

Resumable: a run whose ``metrics.json`` says ``finished`` is reused, not retrained; a run that was
killed continues from its ``last_checkpoint.pth``. Each run directory records the config it was
started with (``bench_run.json``); a finished or partial run whose config differs from what the
benchmark would run now is an error (naming the keys), never silently reused or overwritten.

Options per method: ``cfg.distill.options`` apply to ``cfg.distill.method`` only (so
``configs/synth/bench.yaml`` with ``method: hmkd`` sets HMKD's options); every other method runs
with its own defaults, unless ``method_options={"icd": {...}}`` says otherwise. Ablation variants
change one HMKD option on top of those.

Isolation: on one process (no torchrun) each training run is a child process
(``python -c ...``), so that ``peak_mem_mb`` (the max RSS on CPU, which never decreases within a
process) is each run's own and no run inherits another's memory. Ctrl-C or SIGTERM is passed on as
one SIGTERM: the child finishes its iteration, saves a checkpoint and stops; rerunning the same
command continues. Under torchrun every rank runs the whole plan in-process (training is
collective) and rank 0 writes the files.

Statistics: mean and sample standard deviation (n - 1) over seeds; gain = method mean - no-KD
mean; share of the teacher-student gap closed = (method - student) / (teacher - student) per
metric (None where the teacher does not lead by more than 1e-6). The teacher is one run; on the
synthetic preset it wins by compute (3x the iterations), as in the paper's 3x-vs-1x setting.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from hmkd.config import Config, DistillConfig, ModelConfig, from_dict, to_dict
from hmkd.utils import json_safe as _json_safe  # one definition of JSON-safe floats (nan -> null)
from hmkd.errors import CheckpointError, ConfigError, HMKDError

logger = logging.getLogger(__name__)

__all__ = [
    "ABLATIONS",
    "LABELS",
    "METHOD_ORDER",
    "METRICS",
    "Variant",
    "ablation_variants",
    "format_table",
    "plan_runs",
    "run_accuracy_bench",
    "summarise",
]

METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
METHOD_ORDER = ("none", "fitnet", "fgd", "icd", "hmkd")
LABELS = {"teacher": "teacher", "none": "student (no-KD)", "fitnet": "FitNet", "fgd": "FGD", "icd": "ICD", "hmkd": "HMKD"}
ABLATIONS = {
    "supplement": "HMKD with the supplemental (background) distillation on/off (paper Table 5)",
    "heads": "HMKD with 1, 4, 8, 16 decoder heads (paper Table 6)",
    "start_level": "HMKD with the inquiries starting at P3, P4, P5 (keys one level finer; paper Table 7)",
    "inquiry_head": "HMKD with the Inquiry Head on/off",
    "others_bg": "HMKD with L_others on the foreground only (the paper's formula) or on fg + bg",
    "levels": "HMKD distilling L_others/L_bg on P2-P4 (default) or on every common level",
    "weight": "HMKD with its loss weights alpha = beta = 1 (default) or 5 (the loss scale)",
    "aux_every": "HMKD with the decoder's auxiliary task on every step (default) or every 4th (aux_every, a speed knob)",
}
#: keys of a run's config that do not change its result (ignored when deciding to reuse a run)
_VOLATILE = (
    ("name",), ("output_dir",), ("device",), ("data", "workers"), ("data", "root"), ("data", "eval_batch_size"),
    ("train", "log_period"), ("train", "ckpt_period"), ("train", "tensorboard"),
)
_EPS = 1e-6


@dataclass
class Variant:
    """One row of the table: ``key`` names its run folders (``<key>_s<seed>``)."""

    key: str
    method: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ plan
def _levels_of(m: ModelConfig) -> list[str]:
    from hmkd.models import DEFAULT_LEVELS

    return list(m.levels) if m.levels else list(DEFAULT_LEVELS.get(m.detector, []))


def _common_levels(cfg: Config, ablation: str) -> list[str]:
    """FPN levels both the student and the teacher have (they decide an ablation's choices)."""
    if cfg.teacher is None:
        raise ConfigError(f"ablation {ablation} needs a 'teacher' section (the common FPN levels decide the choices)")
    teacher_levels = _levels_of(cfg.teacher)
    return [lv for lv in _levels_of(cfg.model) if lv in teacher_levels]


def _effective(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with its defaults filled in (to tell equal variants apart from different ones)."""
    from hmkd.distill import method_class

    opts = from_dict(method_class(method).Options, dict(options), src="config", prefix="distill.options.")
    return dataclasses.asdict(opts)


def _method_options(cfg: Config, method: str, method_options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    base = dict(cfg.distill.options) if cfg.distill.method == method else {}
    base.update((method_options or {}).get(method, {}))
    return base


def ablation_variants(cfg: Config, ablation: str, method_options: dict[str, dict[str, Any]] | None = None) -> list[Variant]:
    """The HMKD variants of ``ablation`` (see :data:`ABLATIONS`) for this config's student and teacher.

    A variant whose options are those of the plain HMKD run gets the key ``hmkd`` (and so reuses
    that run when the main benchmark already made it in the same ``out_dir``).
    """
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r} (known: {', '.join(ABLATIONS)})")
    base = _method_options(cfg, "hmkd", method_options)
    base_eff = _effective("hmkd", base)
    hidden = base_eff["hidden"]
    changes: list[tuple[str, str, dict[str, Any]]] = []  # (slug, label, change)
    if ablation == "supplement":
        changes = [("supplement", "HMKD, supplement on", {"supplement": True}),
                   ("nosupplement", "HMKD, supplement off", {"supplement": False})]
    elif ablation == "inquiry_head":
        changes = [("inquiry", "HMKD, Inquiry Head on", {"inquiry_head": True}),
                   ("noinquiry", "HMKD, Inquiry Head off", {"inquiry_head": False})]
    elif ablation == "others_bg":
        changes = [("fgonly", "HMKD, L_others fg only", {"others_bg_weight": 0.0}),
                   ("fgbg", "HMKD, L_others fg + bg", {"others_bg_weight": 1.0})]
    elif ablation == "weight":
        changes = [(f"weight{w:g}", f"HMKD, alpha = beta = {w:g}", {"alpha": float(w), "beta": float(w)}) for w in (1, 5)]
    elif ablation == "aux_every":
        changes = [(f"auxevery{k}", f"HMKD, decoder task every {'step' if k == 1 else f'{k}th step'}", {"aux_every": k})
                   for k in (1, 4)]
    elif ablation == "levels":
        common = _common_levels(cfg, ablation)
        changes = [("levels3", f"HMKD, levels {common[0]}-{common[min(2, len(common) - 1)]}", {"levels": None}),
                   ("levelsall", f"HMKD, levels {common[0]}-{common[-1]}", {"levels": common})]
    elif ablation == "heads":
        for h in (1, 4, 8, 16):
            if hidden % h:
                logger.warning("ablation heads: %d heads do not divide hidden=%d; skipped", h, hidden)
                continue
            changes.append((f"heads{h}", f"HMKD, {h} head{'s' if h > 1 else ''}", {"heads": h}))
    else:  # start_level
        common = _common_levels(cfg, ablation)
        for lv in ("P3", "P4", "P5"):
            prev = f"P{int(lv[1:]) - 1}"
            if lv in common and prev in common:
                changes.append((f"start{lv.lower()}", f"HMKD, start {lv} (keys {prev})", {"start_level": lv, "pairs": None}))
        if not changes:
            raise ConfigError(f"ablation start_level: no starting level fits the common levels {common}")
    out: list[Variant] = []
    for slug, label, change in changes:
        opts = {**base, **change}
        eff = _effective("hmkd", opts)
        if change.get("start_level") and not base_eff.get("pairs") and not base_eff.get("start_level"):
            # the default start is the second-finest common level: an explicit one equal to it is the same run
            common = _common_levels(cfg, ablation)
            if len(common) > 1 and change["start_level"] == common[1]:
                eff["start_level"] = None
        same = eff == base_eff
        out.append(Variant("hmkd" if same else f"hmkd-{slug}", "hmkd", label + (" (= HMKD)" if same else ""), base if same else opts))
    return out


def plan_runs(
    cfg: Config,
    methods: Sequence[str] | None = None,
    ablation: str | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> list[Variant]:
    """The table's student rows, no-KD first (it is always included: every gain is measured from it)."""
    none = Variant("none", "none", LABELS["none"], {})
    if ablation:
        return [none] + ablation_variants(cfg, ablation, method_options)
    wanted = list(methods) if methods else list(METHOD_ORDER)
    for m in wanted:
        _effective(m, _method_options(cfg, m, method_options))  # unknown methods and bad options fail here
    ordered = [m for m in METHOD_ORDER if m in wanted] + [m for m in wanted if m not in METHOD_ORDER]
    out = [none]
    for m in dict.fromkeys(ordered):
        if m != "none":
            out.append(Variant(m, m, LABELS.get(m, m), _method_options(cfg, m, method_options)))
    return out


def _seed_list(cfg: Config, seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {seeds}")
        return [cfg.seed + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out:
        raise ConfigError("seeds: the list is empty")
    return out


# ------------------------------------------------------------------------------------------ configs
def _teacher_config(cfg: Config, teacher_cfg: Config | None, teacher_iters: int | None) -> Config:
    """The config the teacher is trained with (when no checkpoint is given)."""
    if teacher_cfg is not None:
        t = copy.deepcopy(teacher_cfg)
        if t.distill.method != "none":
            raise ConfigError(f"teacher config: distill.method must be 'none' to train a teacher, got {t.distill.method!r}")
        if cfg.teacher is not None:
            skip = {"weights", "backbone_weights", "num_classes"}
            a, b = to_dict(t.model), to_dict(cfg.teacher)
            diff = [k for k in a if k not in skip and a[k] != b[k]]
            if diff:
                detail = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in diff[:4])
                raise ConfigError(f"the teacher config's model differs from the student config's teacher section ({detail})")
        if teacher_iters is not None:
            t.train.iters = int(teacher_iters)
        t.teacher = None
        return t
    if cfg.teacher is None:
        raise ConfigError("the benchmark needs a 'teacher' section (the teacher's model), or --teacher CKPT with it")
    t = copy.deepcopy(cfg)
    t.name = f"{cfg.name}_teacher"
    t.model = dataclasses.replace(cfg.teacher, weights=None)
    t.teacher = None
    t.distill = DistillConfig()
    t.train.iters = int(teacher_iters) if teacher_iters is not None else 3 * cfg.train.iters
    if cfg.train.iters > 0 and cfg.train.ckpt_period:  # as many checkpoints per run as the students
        t.train.ckpt_period = max(1, round(cfg.train.ckpt_period * t.train.iters / cfg.train.iters))
    return t


def _run_config(cfg: Config, v: Variant, seed: int, teacher_weights: str | None, run_dir: str) -> Config:
    rc = copy.deepcopy(cfg)
    rc.seed = int(seed)
    rc.name = f"{cfg.name}-{v.key}_s{seed}"
    rc.output_dir = run_dir
    if v.method == "none":  # no teacher: nothing else of the distill section applies
        rc.distill = DistillConfig(method="none")
        rc.teacher = None
    else:  # the variant's method and options; the rest (teacher_dtype, ...) as the config says
        rc.distill = dataclasses.replace(cfg.distill, method=v.method, options=dict(v.options))
        if rc.teacher is None:
            raise ConfigError(f"method {v.method!r} needs a 'teacher' section in the config")
        rc.teacher = dataclasses.replace(rc.teacher, weights=os.path.abspath(teacher_weights) if teacher_weights else None)
    return rc


def _spec(cfg: Config) -> dict[str, Any]:
    d = json.loads(json.dumps(to_dict(cfg), default=str))
    for path in _VOLATILE:
        node = d
        for k in path[:-1]:
            node = node.get(k) or {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return d


def _with_defaults(spec: Any) -> Any:
    """A stored spec with the config keys it predates filled in with their defaults (a key added
    to the config later, at its default, does not make an old run "another config")."""
    if not isinstance(spec, dict):
        return spec
    defaults = _spec(Config(teacher=ModelConfig()))

    def fill(node: dict, dflt: dict) -> dict:
        out = dict(node)
        for k, v in dflt.items():
            if k not in out:
                out[k] = copy.deepcopy(v)
            elif isinstance(out[k], dict) and isinstance(v, dict):
                out[k] = fill(out[k], v)
        return out

    return fill(spec, defaults)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# ------------------------------------------------------------------------------------------ running
def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(data), f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _finished(run_dir: str) -> dict[str, Any] | None:
    m = _read_json(os.path.join(run_dir, "metrics.json"))
    if isinstance(m, dict) and m.get("status") == "finished" and isinstance(m.get("bbox"), dict):
        return m
    return None


_CHILD = (
    "import sys; from hmkd.bench.accuracy import _child_main; sys.exit(_child_main(sys.argv[1], sys.argv[2] == '1', sys.argv[3] == '1'))"
)
_SPEC_FILE = "bench_run.json"
_ERROR_FILE = "bench_error.json"


def _child_main(run_dir: str, resume: bool, progress: bool) -> int:
    """Entry point of a child process: train the run described by ``run_dir/bench_run.json``."""
    import traceback

    try:  # die with the benchmark (Linux): the parent's death sends us SIGTERM (checkpoint, then stop)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from hmkd.engine.trainer import TrainingInterrupted, train

    spec = _read_json(os.path.join(run_dir, _SPEC_FILE)) or {}
    try:
        cfg = from_dict(Config, spec["config"], src=os.path.join(run_dir, _SPEC_FILE))
        train(cfg, output_dir=run_dir, resume=resume, progress=progress)
        return 0
    except TrainingInterrupted as e:
        _write_json(os.path.join(run_dir, _ERROR_FILE), {"type": "TrainingInterrupted", "message": str(e),
                                                           "iteration": e.iteration, "checkpoint": e.checkpoint})
        return 130
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        _write_json(os.path.join(run_dir, _ERROR_FILE), {
            "type": type(e).__name__, "module": type(e).__module__, "message": str(e),
            "traceback": traceback.format_exc(),
        })
        return 1


def _train_isolated(cfg: Config, run_dir: str, resume: bool, progress: bool) -> None:
    """Train in a child process; re-raise its error here (same type for hmkd's own errors)."""
    from hmkd.engine.trainer import TrainingInterrupted

    err_path = os.path.join(run_dir, _ERROR_FILE)
    if os.path.exists(err_path):
        os.remove(err_path)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", _CHILD, run_dir, "1" if resume else "0", "1" if progress else "0"]
    # own session: a terminal's Ctrl-C reaches only us, and we pass it on exactly once
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    signals_seen = []

    def forward(signum: int, frame: Any) -> None:
        signals_seen.append(signum)
        try:
            proc.send_signal(signal.SIGTERM if len(signals_seen) == 1 else signal.SIGINT)
        except ProcessLookupError:  # pragma: no cover - already gone
            pass

    old = {}
    import threading

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, forward)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0:
        return
    err = _read_json(err_path) or {}
    kind, msg = err.get("type"), err.get("message") or f"training exited with status {rc}"
    if kind == "TrainingInterrupted" or (signals_seen and not kind):
        it = int(err.get("iteration") or 0)
        stop = TrainingInterrupted(it, err.get("checkpoint"), run_dir)
        stop.args = (f"benchmark stopped: {run_dir} at iteration {it} (checkpoint saved); "
                     "run the same command again to continue",)
        raise stop
    import hmkd.errors as errors

    cls = getattr(errors, kind or "", None)
    if isinstance(cls, type) and issubclass(cls, HMKDError):
        raise cls(msg)
    detail = f"{kind}: {msg}" if kind else msg
    raise RuntimeError(f"{run_dir}: training failed ({detail}); see {err_path}" if kind else f"{run_dir}: {detail}")


def _say(progress: bool, msg: str) -> None:
    if progress and _is_rank0():
        print(f"[bench] {msg}", file=sys.stderr, flush=True)
    else:
        logger.info(msg)


def _train_or_reuse(
    cfg: Config, run_dir: str, *, isolate: bool, progress: bool, what: str
) -> tuple[dict[str, Any], bool]:
    """Train ``cfg`` into ``run_dir`` unless a finished run of the same config is there."""
    from hmkd.engine.trainer import train

    spec_path = os.path.join(run_dir, _SPEC_FILE)
    new_spec = _spec(cfg)
    old = _read_json(spec_path)
    done = _finished(run_dir)
    started = os.path.isfile(os.path.join(run_dir, "last_checkpoint.pth"))
    if old is not None and (done or started):
        diff = _diff(_with_defaults(old.get("spec")), new_spec)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run of another config ({'; '.join(diff[:3])}); "
                "use another --out or delete that folder"
            )
    if done:
        if old is None:
            logger.warning("%s: finished run without %s; reused as it is", run_dir, _SPEC_FILE)
        _say(progress, f"{what}: reusing {run_dir}")
        return done, True
    _say(progress, f"{what}: {'resuming' if started else 'training'} -> {run_dir}")
    if _is_rank0():
        os.makedirs(run_dir, exist_ok=True)
        _write_json(spec_path, {"spec": new_spec, "config": to_dict(cfg)})
    if isolate:
        _train_isolated(cfg, run_dir, started, progress)
        metrics = _finished(run_dir)
        if metrics is None:
            raise RuntimeError(f"{run_dir}: training ended without a finished metrics.json")
    else:
        metrics = train(cfg, output_dir=run_dir, resume=started, progress=progress)
    return metrics, False


def _run_costs(run_dir: str, metrics: dict[str, Any]) -> dict[str, Any]:
    timing = metrics.get("timing") or {}
    peak = None
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                v = rec.get("peak_mem_mb")
                if isinstance(v, (int, float)):
                    peak = v if peak is None else max(peak, v)
    except OSError:
        pass
    return {
        "sec_per_iter": timing.get("sec_per_iter"),
        "train_seconds": timing.get("train_seconds"),
        "eval_seconds": timing.get("eval_seconds"),
        "images_per_sec": timing.get("images_per_sec"),
        "peak_mem_mb": peak,
        "iterations": metrics.get("iteration"),
        "device": timing.get("device"),
    }


def _bbox(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The six COCO box metrics (None where COCOeval has none, e.g. APl without large objects)."""
    b = metrics.get("bbox") or {}
    out: dict[str, float | None] = {}
    for k in METRICS:
        v = b.get(k)
        out[k] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return out


def _teacher(
    cfg: Config,
    out_dir: str,
    teacher: str | None,
    teacher_cfg: Config | None,
    teacher_iters: int | None,
    *,
    isolate: bool,
    progress: bool,
) -> dict[str, Any]:
    """Weights and metrics of the teacher: a given checkpoint (evaluated once) or one trained here."""
    from hmkd.engine.evaluation import evaluate

    weights = teacher or (cfg.teacher.weights if cfg.teacher is not None else None)
    if weights:
        src = "--teacher" if teacher else "teacher.weights"
        if not os.path.isfile(weights):
            raise ConfigError(f"{src} {weights}: file not found (train it first, or drop teacher.weights to let the benchmark train one)")
        if cfg.teacher is None:
            raise ConfigError("a teacher checkpoint needs the config's 'teacher' section (its model) to be built")
        ecfg = copy.deepcopy(cfg)
        ecfg.model = dataclasses.replace(cfg.teacher, weights=None)
        ecfg.teacher = None
        ecfg.distill = DistillConfig()
        st = os.stat(weights)
        source = {"weights": os.path.abspath(weights), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "model": _spec(ecfg)["model"], "data": _spec(ecfg)["data"]}
        eval_dir = os.path.join(out_dir, "teacher_eval")
        cached = _read_json(os.path.join(eval_dir, "source.json"))
        metrics = _read_json(os.path.join(eval_dir, "metrics.json")) if cached == _json_safe(source) else None
        if metrics is None:
            _say(progress, f"teacher: evaluating {weights}")
            metrics = evaluate(ecfg, weights=weights, out_dir=eval_dir, progress=progress)
            if _is_rank0():
                _write_json(os.path.join(eval_dir, "source.json"), source)
        else:
            _say(progress, f"teacher: reusing the evaluation of {weights}")
        return {"source": "checkpoint", "weights": os.path.abspath(weights), "metrics": _bbox(metrics),
                "config": to_dict(ecfg), "sec_per_iter": None, "peak_mem_mb": None, "iterations": None}
    tcfg = _teacher_config(cfg, teacher_cfg, teacher_iters)
    run_dir = os.path.join(out_dir, "runs", "teacher")
    tcfg.output_dir = run_dir
    metrics, reused = _train_or_reuse(tcfg, run_dir, isolate=isolate, progress=progress, what="teacher")
    final = os.path.join(run_dir, "model_final.pth")
    if not os.path.isfile(final):
        raise CheckpointError(f"{final}: the teacher run finished but its weights are missing")
    costs = _run_costs(run_dir, metrics)
    return {"source": "trained", "weights": os.path.abspath(final), "metrics": _bbox(metrics), "config": to_dict(tcfg),
            "reused": reused, "output_dir": run_dir, **costs}


# ------------------------------------------------------------------------------------------ summary
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def summarise(
    variants: list[Variant], runs: dict[str, dict[str, Any]], teacher_metrics: dict[str, float] | None
) -> dict[str, dict[str, Any]]:
    """Per row: mean/std over seeds, gain over no-KD, share of the teacher-student gap closed, cost."""
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        rs = [r for r in runs.values() if r["key"] == v.key]
        mean, std = {}, {}
        for k in METRICS:
            mean[k], std[k] = _mean_std([r["bbox"].get(k) for r in rs])
        sec, _ = _mean_std([r.get("sec_per_iter") for r in rs])
        mems = [r.get("peak_mem_mb") for r in rs if r.get("peak_mem_mb") is not None]
        iters = [r.get("iterations") for r in rs if r.get("iterations")]
        rows[v.key] = {"label": v.label, "method": v.method, "options": v.options, "seeds": [r["seed"] for r in rs],
                       "n": len(rs), "iterations": max(iters) if iters else None,
                       "mean": mean, "std": std, "sec_per_iter": sec,
                       "peak_mem_mb": max(mems) if mems else None}
    base = rows.get("none")
    for key, row in rows.items():
        gain, closed = {}, {}
        for k in METRICS:
            m, s = row["mean"].get(k), (base["mean"].get(k) if base else None)
            gain[k] = (m - s) if m is not None and s is not None else None
            t = (teacher_metrics or {}).get(k)
            closed[k] = (m - s) / (t - s) if None not in (m, s, t) and t - s > _EPS else None
        row["gain"], row["gap_closed"] = gain, closed
        b_sec = base.get("sec_per_iter") if base else None
        row["cost_vs_none"] = row["sec_per_iter"] / b_sec if row["sec_per_iter"] and b_sec else None
    return rows


def _fmt(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def format_table(rows: dict[str, dict[str, Any]], teacher: dict[str, Any] | None, seeds: list[int]) -> str:
    """Markdown shaped like the paper's Table 1: mean ± std, the gain over the student in brackets, cost."""
    head = "| model | " + " | ".join(METRICS) + " | s/iter | x no-KD | peak MB | x no-KD |"
    lines = [head, "|---|" + "---:|" * (len(METRICS) + 4)]
    b_mem = (rows.get("none") or {}).get("peak_mem_mb")

    def mem_cells(mem: float | None) -> str:
        return f" {_fmt(mem, 0)} | {_fmt(mem / b_mem if mem and b_mem else None, 2)} |"

    if teacher is not None:
        tm = teacher.get("metrics") or {}
        backbone = ((teacher.get("config") or {}).get("model") or {}).get("backbone", "")
        if teacher.get("source") == "checkpoint":
            label = f"teacher ({backbone}, checkpoint)"
        else:
            label = f"teacher ({backbone}, {teacher.get('iterations')} it)"
        t_sec, b_sec = teacher.get("sec_per_iter"), (rows.get("none") or {}).get("sec_per_iter")
        ratio = t_sec / b_sec if t_sec and b_sec else None
        lines.append(f"| {label} | " + " | ".join(_fmt(tm.get(k)) for k in METRICS)
                     + f" | {_fmt(t_sec, 2)} | {_fmt(ratio, 2)} |" + mem_cells(teacher.get("peak_mem_mb")))
    for key, r in rows.items():
        cells = []
        for k in METRICS:
            m, s, g = r["mean"].get(k), r["std"].get(k), r["gain"].get(k)
            cell = _fmt(m)
            if s is not None:
                cell += f" ± {s:.1f}"
            if key != "none" and g is not None:
                cell += f" ({g:+.1f})"
            cells.append(cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells)
                     + f" | {_fmt(r['sec_per_iter'], 2)} | {_fmt(r['cost_vs_none'], 2)} |" + mem_cells(r.get("peak_mem_mb")))
    lines.append("")
    lines.append(f"COCO box AP (%) on the val split; mean ± sample std over seeds {seeds} (teacher: one run); "
                 "(+x): gain over the student (no-KD); s/iter: the run's training seconds / iterations; peak MB: "
                 "its peak memory during training (CPU: max RSS of its own process; CUDA: peak allocated); "
                 "each with its ratio to no-KD.")
    s_iters = next((r.get("iterations") for r in rows.values() if r.get("iterations")), None)
    if teacher is not None and teacher.get("source") == "trained" and s_iters and teacher.get("iterations"):
        lines.append(f"The teacher trained {teacher['iterations'] / s_iters:.3g}x the students' {s_iters} iterations: "
                     "its lead comes from compute (the paper's 3x-vs-1x setting), not only from depth.")
    if rows and teacher is not None:
        lines.append("")
        lines.append("| share of the teacher-student gap closed | mAP | APs |")
        lines.append("|---|---:|---:|")
        for key, r in rows.items():
            if key == "none":
                continue
            cl = r["gap_closed"]
            pct = [("–" if cl.get(k) is None else f"{100 * cl[k]:.0f}%") for k in ("mAP", "APs")]
            lines.append(f"| {r['label']} | {pct[0]} | {pct[1]} |")
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], teacher: dict[str, Any] | None, path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, aps, aps_err, maps, maps_err = [], [], [], [], []
    if teacher is not None:
        tm = teacher.get("metrics") or {}
        names.append("teacher")
        aps.append(tm.get("APs") or 0.0)
        maps.append(tm.get("mAP") or 0.0)
        aps_err.append(0.0)
        maps_err.append(0.0)
    for r in rows.values():
        names.append(r["label"].replace(", ", "\n"))
        aps.append(r["mean"].get("APs") or 0.0)
        maps.append(r["mean"].get("mAP") or 0.0)
        aps_err.append(r["std"].get("APs") or 0.0)
        maps_err.append(r["std"].get("mAP") or 0.0)
    fig = Figure(figsize=(max(6.0, 1.3 * len(names) + 1.5), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    x = list(range(len(names)))
    w = 0.38
    ax.bar([i - w / 2 for i in x], aps, w, yerr=aps_err, capsize=3, label="APs", color="#2a9d8f")
    ax.bar([i + w / 2 for i in x], maps, w, yerr=maps_err, capsize=3, label="mAP", color="#e9c46a")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("AP (%)")
    top = max([a + e for a, e in zip(aps + maps, aps_err + maps_err)] + [1.0])
    ax.set_ylim(0.0, top * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _machine() -> dict[str, Any]:
    import torch
    import torchvision

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.cuda.is_available(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# ------------------------------------------------------------------------------------------ main
def run_accuracy_bench(
    cfg: Config,
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] = 2,
    out_dir: str = "runs/bench_accuracy",
    teacher: str | None = None,
    ablation: str | None = None,
    progress: bool = True,
    *,
    teacher_cfg: Config | None = None,
    teacher_iters: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    isolate: bool | None = None,
) -> dict[str, Any]:
    """Train and evaluate the teacher once and every method (or ablation variant) on every seed.

    Args:
        cfg: the student run (model, data, train) with a ``teacher`` section (the teacher's model;
            its ``weights``, when set, must exist and are used as the teacher).
        methods: methods to compare (default ``none fitnet fgd icd hmkd``); ``none`` is always run.
        seeds: how many seeds (``cfg.seed``, ``cfg.seed + 1``, ...) or an explicit list.
        out_dir: everything goes here (``runs/<key>_s<seed>``, ``runs/teacher``, ``results.*``).
        teacher: a trained teacher checkpoint (``--teacher``); overrides ``cfg.teacher.weights``.
        ablation: one of :data:`ABLATIONS`: HMKD variants (plus no-KD) instead of the methods.
        progress: progress bars and one line per run on stderr.
        teacher_cfg: the config to train the teacher with when there is no checkpoint (e.g.
            ``configs/synth/bench_teacher.yaml``; its model must match ``cfg.teacher``); default:
            ``cfg`` with ``model := cfg.teacher`` and ``train.iters := teacher_iters``.
        teacher_iters: the teacher's iterations (default: ``teacher_cfg``'s, else 3 x
            ``cfg.train.iters``, the paper's 3x-vs-1x setting).
        method_options: extra options per method, e.g. ``{"icd": {"hidden": 128}}``.
        isolate: train each run in a child process (default: yes unless under torchrun).

    Returns:
        The content of ``results.json`` (``runs``, ``methods``, ``teacher``, ``machine`` ...) with
        ``table`` (the Markdown of ``results.md``) and ``files``.
    """
    if ablation is not None and ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r} (known: {', '.join(ABLATIONS)})")
    if isolate is None:
        isolate = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    ctx = None
    if not isolate:
        # join the process group once (torchrun): every train() below reuses it instead of creating
        # and destroying one per run, which a second init under torchrun does not survive
        from hmkd.engine import distributed as du

        ctx = du.init_distributed(cfg.device)
    try:
        return _run_bench(cfg, methods, seeds, out_dir, teacher, ablation, progress, teacher_cfg, teacher_iters,
                          method_options, isolate)
    finally:
        if ctx is not None:
            du.cleanup(ctx)


def _run_bench(
    cfg: Config,
    methods: Sequence[str] | None,
    seeds: int | Sequence[int],
    out_dir: str,
    teacher: str | None,
    ablation: str | None,
    progress: bool,
    teacher_cfg: Config | None,
    teacher_iters: int | None,
    method_options: dict[str, dict[str, Any]] | None,
    isolate: bool,
) -> dict[str, Any]:
    seed_list = _seed_list(cfg, seeds)
    variants = plan_runs(cfg, methods, ablation, method_options)
    out_dir = os.path.abspath(out_dir)
    if _is_rank0():
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    t_start = time.time()
    n_runs = len(variants) * len(seed_list)
    _say(progress, f"{len(variants)} rows x {len(seed_list)} seeds = {n_runs} student runs -> {out_dir}")

    needs_teacher = any(v.method != "none" for v in variants)
    tinfo = _teacher(cfg, out_dir, teacher, teacher_cfg, teacher_iters, isolate=isolate, progress=progress) if (
        needs_teacher or teacher or teacher_cfg is not None or (cfg.teacher is not None)
    ) else None
    teacher_weights = tinfo["weights"] if tinfo else None

    runs: dict[str, dict[str, Any]] = {}
    i = 0
    for seed in seed_list:  # seed-major: a stopped benchmark has complete seeds first
        for v in variants:
            i += 1
            name = f"{v.key}_s{seed}"
            run_dir = os.path.join(out_dir, "runs", name)
            rc = _run_config(cfg, v, seed, teacher_weights, run_dir)
            metrics, reused = _train_or_reuse(rc, run_dir, isolate=isolate, progress=progress,
                                              what=f"[{i}/{n_runs}] {v.label} seed {seed}")
            runs[name] = {"key": v.key, "method": v.method, "label": v.label, "seed": seed, "output_dir": run_dir,
                          "options": v.options, "bbox": _bbox(metrics), "reused": reused, **_run_costs(run_dir, metrics)}

    rows = summarise(variants, runs, tinfo["metrics"] if tinfo else None)
    table = format_table(rows, tinfo, seed_list)
    stem = "results" if ablation is None else f"results_{ablation}"
    files = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    title = ("accuracy benchmark" if ablation is None else f"ablation: {ablation}") + f" ({len(seed_list)} seed(s))"
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "ablation": ablation,
        "ablation_description": ABLATIONS.get(ablation) if ablation else None,
        "seeds": seed_list,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "config": to_dict(cfg),
        "teacher": tinfo,
        "runs": runs,
        "methods": rows,
        "machine": _machine(),
        "wall_seconds_this_call": time.time() - t_start,
        "table": table,
        "files": files,
    }
    if _is_rank0():
        _write_json(files["json"], result)
        with open(files["md"] + ".tmp", "w") as f:
            f.write(f"# {title}\n\n{table}\n")
        os.replace(files["md"] + ".tmp", files["md"])
        try:
            _plot(rows, tinfo, files["png"], title)
        except Exception as e:  # a figure is not worth failing a finished benchmark
            logger.warning("could not draw %s: %s", files["png"], e)
    return result
