"""What distillation costs per training step: seconds, FLOPs, where they go, and peak memory (issues 8, 29).

:func:`run_cost_bench` trains every method (``none`` = no-KD first, then each distiller) for a few
steps **in one process on the same fixed batches** and reports, per method:

* **s/step**: median wall time of one full training step after ``warmup`` discarded steps. A step
  is the trainer's own: :func:`hmkd.training.step.train_step` (forward, the loss values read back,
  the finite check, ``zero_grad``, one ``backward`` of the sum, clipping of the main parameters
  and of each of the method's own optimisers at its clip, the main optimiser's step and the steps
  of the method's optimisers that got a gradient, e.g. HMKD's decoder AdamW), with mixed precision
  only when the config's ``train.amp`` asks for it on CUDA, as training does. No data loading (the
  batches are pre-loaded once) and no LR schedule. A non-finite loss stops the bench as it stops
  training (:class:`~hmkd.errors.NonFiniteLossError`).
  ``iteration`` is passed as ``7_207_200 + i``: the steady state, past any distiller warm-up (warm-up
  steps all pass ``7_207_200``, a multiple of every k <= 16, so every-k-th-step work runs in them).
  Each method is first built and warmed up on its own (``max(1, warmup)`` untimed steps); then the
  timed steps are **interleaved** (step i of every method, then step i+1, ...), so load changes
  on a shared machine hit every method alike and the ratios stay fair.
  The **mean** over the timed steps is reported too: for a method whose steps differ by schedule
  (HMKD with ``aux_every: k`` runs its decoder task on every k-th step only) the mean over a
  multiple of k steps is the cost per step, the median is not.
* the **split** of the step into: teacher forward (backbone + FPN under ``no_grad``; timed by
  wrapping the distiller instance's ``teacher_features``), the distillation losses' forward
  (wrapping ``distill_losses``), the student forward (the rest of the forward: the tapped detector
  forward and its losses), backward, and the optimiser steps (the last three from ``train_step``'s
  ``clock``). "Extra backward" is the method's backward minus the no-KD backward (the gradient of
  the distillation terms).
* for **HMKD and ICD** (plain, not variants), the forward time of each **part** of their losses,
  from ``torch.profiler`` on the real code: after the timed steps, ``profile_steps`` more steps of
  the method run under the profiler and the time inside each ``record_function`` range the
  distiller marks (``hmkd.<part>``: adapters, masks, inquiry_head, decoder_aux,
  decoder_attention, others, small_fg, attention_term, gcblock_bg; ``icd.<part>``) is summed per
  step (median over the steps; see :mod:`hmkd.bench.parts`). Each part's share is of the
  profiled step. **Backward is not split by part**: autograd runs a part's backward after the
  whole forward, outside its range, so the backward is reported as one number per method (extra
  backward over no-KD). The mask-building target uses the ``hmkd.masks`` range.
* **FLOPs** (machine-independent, so the headline ratio on a shared machine): after the timed steps
  each method runs one more, untimed step (as the warm-up steps run, so every-k-th-step work such as
  HMKD's ``aux_every`` task is in it: for ``aux_every > 1`` an upper bound of the mean step) under
  ``torch.utils.flop_counter.FlopCounterMode`` (:func:`hmkd.bench.parts.count_step_flops`):
  ``gflop_per_step`` (forward + backward; the optimiser step is counted too but FlopCounterMode has
  no formula for its ``_foreach`` updates, so it reads 0), ``gflop_phases``, ``gflop_split``
  (student, teacher forward, the method's own, outside the distiller) and ``gflop_x_floor``: the
  step over the floor in FLOPs (``gflop_floor``: no-KD's step FLOPs plus the teacher forward
  counted in the method's own step, from the counter's per-module breakdown: the teacher's
  modules are the ones outside the distiller). For plain **HMKD and ICD**, ``gflop_parts``: the
  forward + backward FLOPs of each part's modules (:data:`hmkd.bench.parts.FLOP_PARTS`: the
  Inquiry Head, the decoder's key/value projections, its aux layer and heads, HMKD's distillation
  attention pass, the student-side value projection, adapters, GcBlocks) and ``other`` (the
  method's FLOPs outside those modules). A module's backward is attributed to it by autograd node,
  not by FlopCounterMode's own module tracker, whose backward attribution leaks (see
  :mod:`hmkd.bench.parts`).
* the **biggest tensors** (``biggest_tensors``, default 8; 0: none), recorded in that same untimed
  FLOP-counted step, not a step of their own: FlopCounterMode's ``TorchDispatchMode`` already sees
  every aten op's outputs with the module tracker telling whose they are, so this adds a size
  comparison per op and cannot touch the timed numbers (:func:`hmkd.bench.parts.count_step_flops`).
  Per method, ``biggest_tensors`` (the step's N biggest new tensors: forward, backward, optimiser)
  and ``biggest_method_tensors`` (the method's own, outside student and teacher): shape, dtype, MB,
  op, module and profiler range, saved for backward or not. cost.md: no-KD's and each method's own.
* **peak memory** while the method's models are built and its warm-up steps run (alone), above
  what the process held just before (earlier methods' models stay alive and are in that baseline);
  see :mod:`hmkd.bench.peak_memory` (CUDA: peak allocated; CPU: the process's peak RSS). It counts
  the method's models (the teacher for KD methods), optimiser state and activations; the
  pre-loaded batches are in the baseline.

Teacher: cost does not depend on the teacher's weights, so ``random_teacher=True`` builds the
config's teacher architecture with random weights (no checkpoint needed). ``None`` (the default)
loads ``teacher.weights`` when that file exists and falls back to random weights otherwise; the
choice is recorded in the output. ``False`` requires the weights. For the same reason a
``backbone_weights: pretrain`` (the pretrained stand-in, student's or teacher's) is replaced by
random initial weights rather than made (``stand_ins_replaced`` in the output). A random ResNet
body with **frozen batch norms** (``model.norm: frozen_bn``, the COCO presets') normalises nothing:
its maps grow with depth (a random R101's last map ~1e4 on a 64 px image, beyond float16 under
AMP at 800 x 1333) and a random teacher's distillation losses (~1e11) turned the student NaN in two
steps; so every frozen norm still at its initial statistics is first given its input's statistics
on the first batch (:func:`calibrate_untrained_frozen_norms`, ``frozen_norms_calibrated`` in the
output). The maps are then normalised, as a trained network's are; the cost is the same. A random
student still differs from a random teacher far more than trained ones do: HMKD's summed losses on
the 800 x 1333 preset run at 160 px were ~4e4 and SGD at the preset's lr made the student NaN in
three steps, which stops the bench (a non-finite loss); pass a tiny ``train.lr`` (a step's cost does
not depend on it), as ``benchmarks/gpu/run_cost.sh`` does.

**Mixed precision** (``train.amp`` on CUDA): the step runs under ``torch.autocast`` (float16) with a
``GradScaler``, as training does; a scaler that finds inf gradients skips the optimiser step and
halves its scale, so after the warm-up steps more untimed steps run (at most 40) until one is not
skipped, and ``amp_scaler`` records the scale, those extra steps and any timed step still skipped.

Data: the configured training set (:func:`hmkd.data.build_data`, with its training transforms,
seeded), its first ``n_batches * batch_size`` images. A synthetic set that is not on disk yet is
generated with only those images into a temporary folder (``build_data`` on a copy of the config
with ``data.root`` there and ``data.synth.n_train`` that count; the generator's image ``i`` does
not depend on how many are generated, so they are the same images as the full set's first ones).

Outputs in ``out_dir``: ``cost.json`` (everything, with the machine and the command's arguments)
and ``cost.md`` (tables, with GFLOP/step and x floor (FLOPs) beside the times, + the issue-8
targets: HMKD step <= 1.2x no-KD, peak memory <= 1.5x, mask building < 2% of the step). Timings
on a shared machine are noisy; the load average at start and end is recorded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmkd.bench.cost_report import TARGETS, cost_markdown, cost_targets
from hmkd.bench.parts import FLOP_PARTS, count_step_flops, part_ranges, profile_parts, timed_range
from hmkd.bench.peak_memory import PeakMemory
from hmkd.config import PRETRAIN_BACKBONE, Config, parse_overrides, to_dict
from hmkd.errors import ConfigError
from hmkd.utils import machine_info, write_json, write_text

logger = logging.getLogger(__name__)

__all__ = ["run_cost_bench", "parse_method_spec", "calibrate_untrained_frozen_norms", "TARGETS"]

_STEADY_ITERATION = 7_207_200  # past any distiller warm-up; a multiple of every k <= 16 (10 x lcm(1..16))
_MAX_SCALER_STEPS = 40  # GradScaler's 65536 halved 40 times: ~6e-8


# ------------------------------------------------------------------------------------ helpers
def _device(cfg: Config, device: str | torch.device | None) -> torch.device:
    name = str(device or cfg.device or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class _Clock:
    """One step's phase times: ``mark(phase)`` (``train_step``'s ``clock``) closes a phase begun at
    the previous mark; ``wrap`` times a call inside it (and marks it for the profiler)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, float] = {}
        self._t0 = self._last = 0.0

    def start(self) -> None:
        self.phases = {}
        _sync(self.device)
        self._t0 = self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        _sync(self.device)
        t = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + t - self._last
        self._last = t

    def stop(self) -> dict[str, float]:
        self.phases["step"] = self._last - self._t0
        return self.phases

    def wrap(self, fn: Callable, phase: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with timed_range(phase):
                _sync(self.device)
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                _sync(self.device)
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0
            return out

        return timed


@contextlib.contextmanager
def _instance_wraps(obj: nn.Module, wrappers: dict[str, Callable[[Callable], Callable]]) -> Iterator[None]:
    """Shadow bound methods of ``obj`` by instance attributes (the class is left alone)."""
    for name, make in wrappers.items():
        object.__setattr__(obj, name, make(getattr(obj, name)))
    try:
        yield
    finally:
        for name in wrappers:
            obj.__dict__.pop(name, None)


# ------------------------------------------------------------------------------------ data
def _load_batches(cfg: Config, n_batches: int, device: torch.device) -> tuple[list[tuple[list, list]], int, dict]:
    """``n_batches`` training batches of the configured set (seeded transforms), its class count and
    where they came from."""
    from hmkd.data import build_data, collate_fn, synthetic_exists

    d = cfg.data
    bs = d.batch_size
    need = n_batches * bs
    info: dict[str, Any] = {"kind": d.kind, "batch_size": bs, "n_batches": n_batches}
    with contextlib.ExitStack() as stack:
        data_cfg = cfg
        if d.kind == "synthetic":
            synth = to_dict(d.synth)
            if synthetic_exists(d.root, **synth):
                info["source"] = f"{d.root} (existing synthetic set)"
            else:
                data_cfg = copy.deepcopy(cfg)
                data_cfg.data.root = stack.enter_context(tempfile.TemporaryDirectory(prefix="hmkd_cost_"))
                data_cfg.data.synth.n_train = need
                data_cfg.data.synth.n_val = 1
                info["source"] = (
                    f"synthetic {synth} generated with n_train={need} in a temporary folder "
                    "(the same first images as the full set)"
                )
        else:
            info["source"] = d.root
        ds = build_data(data_cfg, train=True)
        if len(ds) < need:
            raise ConfigError(f"the training set holds {len(ds)} images; the cost bench needs {need}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            batches = []
            for b in range(n_batches):
                images, targets = collate_fn([ds[b * bs + i] for i in range(bs)])
                images = [im.to(device) for im in images]
                targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                batches.append((images, targets))
        n_cls = cfg.model.num_classes or int(ds.num_classes)
    objs = [int(t["boxes"].shape[0]) for _, ts in batches for t in ts]
    info["objects_per_image"] = objs
    info["image_hw"] = [list(batches[0][0][0].shape[-2:])]
    return batches, n_cls, info


# ------------------------------------------------------------------------------------ one method
def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"hmkd"`` -> ("hmkd", {}); ``"hmkd:aux_every=4:alpha=5"`` -> ("hmkd", {"aux_every": 4, "alpha": 5})
    (a variant of a method: its options from the config, then these, values read as YAML)."""
    name, *items = spec.split(":")
    for item in items:
        if "=" not in item or item.startswith("=") or "." in item.split("=", 1)[0]:
            raise ConfigError(f"method variant {spec!r}: {item!r} must look like option=value (e.g. hmkd:aux_every=4)")
    return name, parse_overrides(items)


def _needs_teacher(spec: str) -> bool:
    from hmkd.distill import needs_teacher

    return needs_teacher(parse_method_spec(spec)[0])


def _without_stand_ins(cfg: Config) -> tuple[Config, list[str]]:
    """``cfg`` with every ``backbone_weights: pretrain`` (the pretrained stand-in, which may take
    minutes to make) replaced by random initial weights: a step's cost does not depend on them.
    Also returns the sections changed."""
    from hmkd.training import resolve_pretrained

    changed = [name for name, m in (("model", cfg.model), ("teacher", cfg.teacher))
               if m is not None and m.backbone_weights == PRETRAIN_BACKBONE]
    return resolve_pretrained(cfg, student=False, teacher=False, progress=False), changed


def _teacher_mode(cfg: Config, random_teacher: bool | None) -> tuple[bool, str]:
    """(load weights?, description)."""
    if cfg.teacher is None:
        raise ConfigError("the cost bench of a method with a teacher needs a 'teacher' section in the config")
    w = cfg.teacher.weights
    if random_teacher:
        return False, "random weights (random_teacher=True; cost does not depend on the weights)"
    if w and os.path.isfile(w):
        return True, f"weights {w}"
    if random_teacher is False:
        raise ConfigError(f"teacher.weights {w!r} is not a file (pass random_teacher=True to time with random weights)")
    return False, f"random weights (teacher.weights {w!r} not found; cost does not depend on the weights)"


def _untrained(norm: nn.Module) -> bool:
    return bool((norm.running_mean == 0).all() and (norm.running_var == 1).all() and (norm.weight == 1).all()
                and (norm.bias == 0).all())


def calibrate_untrained_frozen_norms(distiller: nn.Module, batch: tuple[list, list], amp: bool) -> int:
    """Give every frozen batch norm of the distiller and its teacher still at its initial statistics
    (mean 0, var 1, weight 1, bias 0: random weights) its input's statistics on ``batch``, in one
    no-grad forward (each layer set before it runs, on the set layers' output; the global RNG is
    left as it was); see the module doc. Returns how many norms were set."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    models = [distiller] + ([distiller.teacher] if getattr(distiller, "teacher", None) is not None else [])
    norms = [m for model in models for m in model.modules() if isinstance(m, FrozenBatchNorm2d) and _untrained(m)]
    if not norms:
        return 0

    def calibrate(norm: nn.Module, inputs: tuple) -> None:
        var, mean = torch.var_mean(inputs[0].float(), dim=(0, 2, 3))
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)

    handles = [m.register_forward_pre_hook(calibrate) for m in norms]
    images, targets = batch
    device = images[0].device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
            distiller(images, targets, _STEADY_ITERATION)
    finally:
        for h in handles:
            h.remove()
    return len(norms)


class _MethodRun:
    """One method's distiller, optimisers and timings (built and warmed up by :meth:`setup`)."""

    def __init__(self, cfg: Config, spec: str, device: torch.device, biggest: int = 0) -> None:
        self.cfg = cfg
        self.biggest = biggest
        self.label = spec
        self.method, overrides = parse_method_spec(spec)
        self.device = device
        self.options = copy.deepcopy(cfg.distill.options) if self.method == cfg.distill.method else {}
        self.options.update(overrides)
        self.variant = bool(overrides)
        self.amp = bool(cfg.train.amp) and device.type == "cuda"  # as the trainer: AMP on CUDA only
        self.clock = _Clock(device)
        self.steps: list[dict[str, float]] = []
        self.profiled: dict[str, Any] | None = None
        self.flops: dict[str, Any] = {}
        self.peak_memory_mb = float("nan")
        self.memory_method = ""
        self.norms_calibrated = 0
        self._scale: float | None = None
        self.amp_extra_warmup = self.amp_timed_skips = 0
        self.i = 0

    def setup(self, batches: list, n_cls: int, load_teacher: bool, warmup: int) -> None:
        """Build the models and optimisers and run ``max(1, warmup)`` untimed steps; the peak memory
        of all that (the method's models, optimiser state, one step's activations) is recorded."""
        from hmkd.distill.build import build_run

        with PeakMemory(self.device) as mem:
            torch.manual_seed(self.cfg.seed)
            # what a training run of this method builds (no decoder fit, no teacher copy: a step's
            # cost depends on neither)
            parts = build_run(self.cfg, n_cls, device=self.device, method=self.method, options=self.options,
                              load_teacher=load_teacher)
            self.distiller, self.main_params, self.clip_grad = parts.distiller, parts.main_params, parts.clip_grad
            self.opt, self.extra_opts = parts.optimizer, parts.extra_optimizers
            self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
            self._scale = float(self.scaler.get_scale()) if self.scaler is not None else None
            self.norms_calibrated = calibrate_untrained_frozen_norms(self.distiller, batches[0], self.amp)
            self._wraps = _instance_wraps(self.distiller, {
                "teacher_features": lambda f: self.clock.wrap(f, "teacher_forward"),
                "distill_losses": lambda f: self.clock.wrap(f, "distill_forward"),
            })
            self._wraps.__enter__()
            for _ in range(max(1, warmup)):
                self.step(batches, warm=True)
            # mixed precision: more untimed steps while the GradScaler still finds inf gradients and
            # skips the optimiser step (it halves its scale each time), so the timed steps are
            # training's steady state, optimiser step included
            while self.scaler is not None and self._skipped() and self.amp_extra_warmup < _MAX_SCALER_STEPS:
                self.amp_extra_warmup += 1
                self.step(batches, warm=True)
        self.peak_memory_mb = mem.peak_bytes / 2**20
        self.memory_method = mem.method

    def step(self, batches: list, *, warm: bool = False,
             on_mark: Callable[[str], None] | None = None) -> dict[str, float]:
        """One training step (:func:`hmkd.training.step.train_step`); returns its phase times.
        ``on_mark`` is also called at each of ``train_step``'s clock marks."""
        from hmkd.training import step as engine_step

        images, targets = batches[self.i % len(batches)]
        # warm-up steps all run as iteration _STEADY_ITERATION (a multiple of any small k), so a
        # method that does some work every k-th step only (HMKD's aux_every) does it on each of
        # them: the memory peak, taken over the warm-up, then includes that work
        it = _STEADY_ITERATION + (0 if warm else self.i)

        def clock(phase: str) -> None:
            self.clock.mark(phase)
            if on_mark is not None:
                on_mark(phase)

        self.clock.start()
        engine_step.train_step(
            self.distiller, self.opt, images, targets, it,
            main_params=self.main_params, clip_grad=self.clip_grad, extra_optimizers=self.extra_opts,
            scaler=self.scaler, amp=self.amp, clock=clock,
        )
        self.i += 1
        return self.clock.stop()

    def _skipped(self) -> bool:
        """Whether the GradScaler found inf/NaN gradients and skipped the optimiser step since the
        last call (its scale went down; read outside the timed step: it synchronises)."""
        scale = float(self.scaler.get_scale())
        skipped = self._scale is not None and scale < self._scale
        self._scale = scale
        return skipped

    def timed_step(self, batches: list) -> None:
        self.steps.append(self.step(batches))
        if self.scaler is not None and self._skipped():
            self.amp_timed_skips += 1

    def count_flops(self, batches: list) -> None:
        """Count the FLOPs of one more (untimed) step, run as the warm-up steps are (every-k-th-step
        work included); per part for the methods of :data:`~hmkd.bench.parts.FLOP_PARTS`; the same
        step records its ``biggest`` biggest tensors."""
        parts = None if self.variant else FLOP_PARTS.get(self.method)
        self.flops = count_step_flops(lambda mark: self.step(batches, warm=True, on_mark=mark), self.distiller, parts,
                                      biggest=self.biggest)

    def profile(self, batches: list, steps: int) -> None:
        """Profile ``steps`` more steps when the method marks its parts (plain methods only)."""
        ranges = part_ranges(self.method)
        if ranges is None or self.variant or steps < 1:
            return
        self.profiled = profile_parts(lambda: self.step(batches), ranges, steps, self.device)

    def result(self) -> dict[str, Any]:
        steps = self.steps
        keys = ["step", "forward", "teacher_forward", "distill_forward", "backward", "optimizer"]
        med = {k: _median([s.get(k, 0.0) for s in steps]) for k in keys}
        student_fwd = [s["forward"] - s.get("teacher_forward", 0.0) - s.get("distill_forward", 0.0) for s in steps]
        med["student_forward"] = _median(student_fwd)
        d = self.distiller
        out: dict[str, Any] = {
            "method": self.label,
            "base_method": self.method,
            "options": self.options,
            "step_s": med["step"],
            "step_s_mean": float(statistics.fmean(s["step"] for s in steps)) if steps else float("nan"),
            "step_s_all": [s["step"] for s in steps],
            "phases_s": {k: med[k] for k in ("forward", "student_forward", "teacher_forward", "distill_forward",
                                             "backward", "optimizer")},
            "teacher_forward_share": med["teacher_forward"] / med["step"] if med["step"] > 0 else float("nan"),
            "peak_memory_mb": self.peak_memory_mb,
            "memory_method": self.memory_method,
            "frozen_norms_calibrated": self.norms_calibrated,
            "parameters": {
                "student": sum(p.numel() for p in d.student_parameters()),
                "distiller": sum(p.numel() for p in d.distiller_parameters()),
                "extra": sum(p.numel() for m in d.extra_modules().values() for p in m.parameters()),
            },
        }
        if self.scaler is not None:
            out["amp_scaler"] = {"scale": float(self.scaler.get_scale()), "extra_warmup_steps": self.amp_extra_warmup,
                                 "timed_skipped_steps": self.amp_timed_skips}
        out.update(self.flops)
        if self.profiled is not None:
            out["parts"] = self.profiled["parts"]
            out["profile"] = self.profiled["profile"]
        return out

    def close(self) -> None:
        if hasattr(self, "_wraps"):
            self._wraps.__exit__(None, None, None)
        for k in ("distiller", "opt", "main_params", "clip_grad", "extra_opts", "scaler"):
            self.__dict__.pop(k, None)


# ------------------------------------------------------------------------------------ the bench
def run_cost_bench(
    cfg: Config,
    methods: Sequence[str] | None = None,
    out_dir: str | os.PathLike = "runs/cost",
    iters: int = 10,
    warmup: int = 2,
    *,
    random_teacher: bool | None = None,
    n_batches: int = 2,
    profile_steps: int = 3,
    device: str | torch.device | None = None,
    config_name: str | None = None,
    biggest_tensors: int = 8,
) -> dict[str, Any]:
    """Seconds per training step, its split, and peak memory of no-KD and each method (module doc).

    Args:
        cfg: the run config (student ``model``, ``teacher``, ``data``, ``train`` optimiser, clip
            and ``amp``; ``distill.options`` apply to ``distill.method`` only, other methods use
            their defaults).
        methods: methods to time (default: every registered method); ``none`` (no-KD) is always
            timed first, as the reference. ``NAME:option=value[:option=value...]`` times a variant
            of a method with those ``distill.options`` changed (e.g. ``hmkd:aux_every=4``); the
            per-part split is reported for plain ``hmkd`` and ``icd``, the targets for plain ``hmkd``.
        out_dir: where ``cost.json`` and ``cost.md`` go.
        iters, warmup: timed and discarded steps per method.
        random_teacher: ``True``: random teacher weights; ``None``: the weights file when it exists,
            else random; ``False``: the weights file is required.
        n_batches: distinct pre-loaded batches the steps cycle through.
        profile_steps: extra steps of HMKD and ICD run under ``torch.profiler`` for the part split
            (0: no split).
        device: overrides ``cfg.device``.
        config_name: label of the config in the report (default ``cfg.name``).
        biggest_tensors: how many of the biggest tensors of each method's FLOP-counted step to
            report (``biggest_tensors`` and ``biggest_method_tensors`` of each method; 0: none).

    Returns:
        ``{"table": Markdown, "methods": [per-method dicts], "targets": ..., "paths": ..., ...}``
        (the JSON written to ``cost.json`` plus ``table``).
    """
    from hmkd.distill import METHODS

    if iters < 1 or warmup < 0 or n_batches < 1 or profile_steps < 0 or biggest_tensors < 0:
        raise ConfigError("cost bench: iters and n_batches must be >= 1, warmup, profile_steps and biggest_tensors "
                          f">= 0 (got iters={iters}, n_batches={n_batches}, warmup={warmup}, "
                          f"profile_steps={profile_steps}, biggest_tensors={biggest_tensors})")
    names = list(methods) if methods else list(METHODS)
    for m in names:
        _needs_teacher(m)  # unknown method: ConfigError
    names = ["none"] + [m for m in dict.fromkeys(names) if m != "none"]
    dev = _device(cfg, device)
    cfg, stand_ins = _without_stand_ins(cfg)
    if stand_ins:
        logger.info("cost bench: %s backbone_weights: %s -> random initial weights (cost does not depend on them)",
                    " and ".join(stand_ins), PRETRAIN_BACKBONE)
    load_teacher, teacher_desc = False, "none needed"
    if any(_needs_teacher(m) for m in names):
        load_teacher, teacher_desc = _teacher_mode(cfg, random_teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    t_start = time.time()
    batches, n_cls, data_info = _load_batches(cfg, n_batches, dev)
    runs = [_MethodRun(cfg, m, dev, biggest_tensors) for m in names]
    try:
        for r in runs:  # one after the other, so each peak memory is the method's own
            logger.info("cost bench: building and warming up %s", r.method)
            r.setup(batches, n_cls, load_teacher, warmup)
        for _ in range(iters):  # interleaved: load changes on a shared machine hit every method alike
            for r in runs:
                r.timed_step(batches)
        for r in runs:  # untimed, after the timed steps
            r.count_flops(batches)
        for r in runs:
            r.profile(batches, profile_steps)
        rows = [r.result() for r in runs]
    finally:
        for r in runs:
            r.close()
        del runs
        gc.collect()
    base = rows[0]
    for r in rows:
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["memory_ratio"] = r["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9)
        r["extra_backward_s"] = r["phases_s"]["backward"] - base["phases_s"]["backward"]
        r["gflop_x_no_kd"] = r["gflop_per_step"] / base["gflop_per_step"]
        # the floor of a teacher-based method: the no-KD step plus one frozen teacher forward
        if r["phases_s"]["teacher_forward"] > 0:
            r["floor_s"] = base["step_s"] + r["phases_s"]["teacher_forward"]
            r["floor_ratio"] = r["step_s"] / r["floor_s"]
        # the same floor in FLOPs: no-KD's step + the teacher forward counted in the method's own step
        if r["gflop_split"]["teacher_forward"] > 0:
            r["gflop_floor"] = base["gflop_per_step"] + r["gflop_split"]["teacher_forward"]
            r["gflop_x_floor"] = r["gflop_per_step"] / r["gflop_floor"]
    res: dict[str, Any] = {
        "config": config_name or cfg.name,
        "machine": machine_info(dev),
        "iters": iters,
        "warmup": warmup,
        "n_batches": n_batches,
        "profile_steps": profile_steps,
        "biggest_tensors": biggest_tensors,
        "amp": bool(cfg.train.amp) and dev.type == "cuda",
        "teacher": teacher_desc + ("" if cfg.distill.teacher_dtype == "float32" else f", run in {cfg.distill.teacher_dtype}"),
        "data": data_info,
        "model": dataclasses.asdict(cfg.model),
        "teacher_model": dataclasses.asdict(cfg.teacher) if cfg.teacher is not None else None,
        "stand_ins_replaced": stand_ins,
        "train": {"optimizer": cfg.train.optimizer, "lr": cfg.train.lr, "clip_grad": cfg.train.clip_grad,
                  "amp": cfg.train.amp},
        "methods": rows,
        "targets": cost_targets(rows),
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.time() - t_start,
    }
    table = cost_markdown(res)
    paths = {"json": str(out / "cost.json"), "md": str(out / "cost.md")}
    res["paths"] = paths
    write_json(paths["json"], res)
    write_text(paths["md"], table)
    res["table"] = table
    return res
