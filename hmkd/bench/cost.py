"""What distillation costs per training step: seconds, where they go, and peak memory (issue 8).

:func:`run_cost_bench` trains every method (``none`` = no-KD first, then each distiller) for a few
steps **in one process on the same fixed batches** and reports, per method:

* **s/step**: median wall time of one full training step after ``warmup`` discarded steps. A step
  is what the trainer does: ``losses = distiller(images, targets, it)``, the loss values read back
  (as the trainer logs them), ``zero_grad``, one ``backward`` of the sum, gradient clipping of the
  main parameters, the main optimiser's step and the method's own optimisers
  (:meth:`~hmkd.distill.base.Distiller.step_extra_optimizers`: clip + step, e.g. HMKD's decoder
  AdamW). No data loading (the batches are pre-loaded once) and no LR schedule.
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
  forward and its losses), backward, and the optimiser steps. "Extra backward" is the method's
  backward minus the no-KD backward (the gradient of the distillation terms).
* for **HMKD**, the cost of each of its parts, measured separately (forward and backward, median
  of ``part_reps`` runs) on the real inputs of the last timed step: ``DistillInputs`` are captured
  by wrapping ``distill_losses`` and the building blocks are called directly the way
  :meth:`~hmkd.distill.hmkd.HMKDDistiller.distill_losses` calls them — fg/bg and small-object
  masks (:func:`~hmkd.distill.masks.fg_bg_masks`, :func:`~hmkd.distill.masks.box_mask`), Inquiry
  Head (head, targets, focal loss, candidates, widening), the decoder's auxiliary task
  (``aux_loss``), the decoder's distillation pass (``decoder(...)``: inquiries + attention m and
  teacher values), the small-distill terms (``L_others``, small-object fg imitation, the
  attention-weighted value term with the student value projection) and the GcBlock/background
  term. The distiller's code is not changed. The student-side gradients stop at leaf copies of
  the student maps, so a part's backward does not include the (shared) student backbone.
* **peak memory** while the method's models are built and its warm-up steps run (alone), above
  what the process held just before (earlier methods' models stay alive and are in that baseline): on CUDA ``torch.cuda.max_memory_allocated`` (after
  ``reset_peak_memory_stats``) minus the allocated bytes before; on CPU the process's resident
  set high-water mark (``VmHWM`` of ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` — a sampling thread reading ``VmRSS`` every 2 ms where that is not
  allowed) minus the RSS before, after ``gc.collect()`` and glibc ``malloc_trim(0)`` so memory
  freed by the previous method is given back first. Both count the method's models (the teacher
  for KD methods), optimiser state and activations; the pre-loaded batches are in the baseline.
  ``tracemalloc`` / ``ru_maxrss`` would miss torch's allocations or could not be reset.

Teacher: cost does not depend on the teacher's weights, so ``random_teacher=True`` builds the
config's teacher architecture with random weights (no checkpoint needed). ``None`` (the default)
loads ``teacher.weights`` when that file exists and falls back to random weights otherwise; the
choice is recorded in the output. ``False`` requires the weights.

Data: the configured training set's first ``n_batches * batch_size`` images (with its training
transforms, seeded). A synthetic set that is not on disk yet is generated with only those images
into a temporary folder (the generator's image ``i`` does not depend on how many are generated, so
they are the same images as the full set's first ones).

Outputs in ``out_dir``: ``cost.json`` (everything, with the machine and the command's arguments)
and ``cost.md`` (tables + the issue-8 targets: HMKD step <= 1.2x no-KD, peak memory <= 1.5x, mask
building < 2% of the step). Timings on a shared machine are noisy; the load average at start and
end is recorded.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmkd.config import Config, parse_overrides, to_dict
from hmkd.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["run_cost_bench", "TARGETS", "hmkd_part_costs"]

#: Issue 8's targets for HMKD against no-KD on the synthetic CPU preset.
TARGETS = {"step_ratio": 1.2, "memory_ratio": 1.5, "mask_share": 0.02}

_STEADY_ITERATION = 7_207_200  # past any distiller warm-up; a multiple of every k <= 16 (10 x lcm(1..16))


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


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _PeakMemory:
    """Peak memory above the current level while the ``with`` block runs (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.peak_bytes = 0
        self.base_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
            return self
        rss = _proc_status_kb("VmRSS")
        self.base_bytes = (rss or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM)
            self.method = "process VmHWM (reset via /proc/self/clear_refs) - VmRSS before"
        except OSError:
            self.method = "process VmRSS sampled every 2 ms (max) - VmRSS before"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, (_proc_status_kb("VmRSS") or 0) * 1024)
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        else:
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        self.peak_bytes = max(0, peak - self.base_bytes)


class _Clock:
    """Per-step phase timers filled by wrappers around the distiller's methods."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, float] = {}

    def wrap(self, fn: Callable, phase: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
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
    from hmkd.data import build_dataset, collate_fn
    from hmkd.data.synthetic import synthetic_exists

    d = cfg.data
    bs = d.batch_size
    need = n_batches * bs
    info: dict[str, Any] = {"kind": d.kind, "batch_size": bs, "n_batches": n_batches}
    tmp: tempfile.TemporaryDirectory | None = None
    kwargs: dict[str, Any] = dict(
        train=True, root=d.root, ann_file=d.train_ann, images_dir=d.train_images, hflip=d.hflip,
        scales=None, max_size=cfg.model.max_size, with_masks=bool(d.with_masks or cfg.model.detector == "mask_rcnn"),
    )
    try:
        if d.kind == "synthetic":
            synth = to_dict(d.synth)
            if synthetic_exists(d.root, **synth):
                kwargs["synth"] = synth
                info["source"] = f"{d.root} (existing synthetic set)"
            else:
                tmp = tempfile.TemporaryDirectory(prefix="hmkd_cost_")
                small = {**synth, "n_train": need, "n_val": 1}
                kwargs.update(root=tmp.name, synth=small)
                info["source"] = (
                    f"synthetic {synth} generated with n_train={need} in a temporary folder "
                    "(the same first images as the full set)"
                )
        else:
            info["source"] = d.root
        ds = build_dataset(d.kind, **kwargs)
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
        info["image_hw"] = [list(im.shape[-2:]) for im, _ in zip(batches[0][0], range(1))]
        return batches, n_cls, info
    finally:
        if tmp is not None:
            tmp.cleanup()


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


def _build(cfg: Config, method: str, n_cls: int, device: torch.device, load_teacher: bool, options: dict) -> Any:
    from hmkd.distill import build_distiller
    from hmkd.models import build_model

    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model, n_cls)
    teacher = None
    if _needs_teacher(method):
        torch.manual_seed(cfg.seed + 1)
        teacher = build_model(cfg.teacher, n_cls, load=load_teacher)
    torch.manual_seed(cfg.seed + 2)
    distiller = build_distiller(method, student=student, teacher=teacher, options=options)
    distiller.set_teacher_dtype(cfg.distill.teacher_dtype)
    distiller.to(device).train()
    return distiller


def _step(
    distiller: nn.Module,
    opt: torch.optim.Optimizer,
    main_params: list[nn.Parameter],
    clip: float | None,
    images: list[torch.Tensor],
    targets: list[dict],
    iteration: int,
    device: torch.device,
) -> dict[str, float]:
    """One training step as the trainer runs it; returns its phase times (seconds)."""
    from hmkd.engine.optim import clip_gradients

    _sync(device)
    t0 = time.perf_counter()
    losses = distiller(images, targets, iteration)
    total = sum(losses.values())
    values = torch.stack([v.detach().float().reshape(()) for v in [*losses.values(), total]]).tolist()
    _sync(device)
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for _, o, _ in distiller.extra_optimizers():
        o.zero_grad(set_to_none=True)
    total.backward()
    _sync(device)
    t2 = time.perf_counter()
    clip_gradients(main_params, clip)
    opt.step()
    distiller.step_extra_optimizers()
    _sync(device)
    t3 = time.perf_counter()
    if not all(v == v for v in values):
        logger.warning("non-finite loss in the cost bench (%s); timings still count", distiller.name)
    return {"step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}


class _MethodRun:
    """One method's distiller, optimiser and timings (built and warmed up by :meth:`setup`)."""

    def __init__(self, cfg: Config, spec: str, device: torch.device) -> None:
        self.cfg = cfg
        self.label = spec
        self.method, overrides = parse_method_spec(spec)
        self.device = device
        self.options = copy.deepcopy(cfg.distill.options) if self.method == cfg.distill.method else {}
        self.options.update(overrides)
        self.variant = bool(overrides)
        self.clock = _Clock(device)
        self.captured: dict[str, Any] = {}
        self.steps: list[dict[str, float]] = []
        self.peak_memory_mb = float("nan")
        self.memory_method = ""

    def _capture(self, fn: Callable) -> Callable:
        timed = self.clock.wrap(fn, "distill_forward")

        def inner(inputs: Any, iteration: Any) -> Any:
            self.captured["inputs"] = inputs
            return timed(inputs, iteration)

        return inner

    def setup(self, batches: list, n_cls: int, load_teacher: bool, warmup: int) -> None:
        """Build the models and optimisers and run ``max(1, warmup)`` untimed steps; the peak memory
        of all that (the method's models, optimiser state, one step's activations) is recorded."""
        from hmkd.engine.optim import build_optimizer

        with _PeakMemory(self.device) as mem:
            self.distiller = _build(self.cfg, self.method, n_cls, self.device, load_teacher, self.options)
            self.main_params = self.distiller.student_parameters() + self.distiller.distiller_parameters()
            self.opt = build_optimizer(self.cfg.train, self.main_params)
            self._wraps = _instance_wraps(
                self.distiller,
                {"teacher_features": lambda f: self.clock.wrap(f, "teacher_forward"), "distill_losses": self._capture},
            )
            self._wraps.__enter__()
            self.i = 0
            for _ in range(max(1, warmup)):
                self.step(batches, record=False)
        self.captured.clear()
        self.peak_memory_mb = mem.peak_bytes / 2**20
        self.memory_method = mem.method

    def step(self, batches: list, record: bool = True) -> None:
        images, targets = batches[self.i % len(batches)]
        self.clock.phases = {}
        # warm-up steps all run as iteration _STEADY_ITERATION (a multiple of any small k), so a
        # method that does some work every k-th step only (HMKD's aux_every) does it on each of
        # them: the memory peak, taken over the warm-up, then includes that work
        it = _STEADY_ITERATION + (self.i if record else 0)
        ph = _step(self.distiller, self.opt, self.main_params, self.cfg.train.clip_grad, images, targets,
                   it, self.device)
        ph.update(self.clock.phases)
        self.i += 1
        if record:
            self.steps.append(ph)

    def result(self, part_reps: int) -> dict[str, Any]:
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
            "parameters": {
                "student": sum(p.numel() for p in d.student_parameters()),
                "distiller": sum(p.numel() for p in d.distiller_parameters()),
                "extra": sum(p.numel() for m in d.extra_modules().values() for p in m.parameters()),
            },
        }
        if self.method == "hmkd" and not self.variant and "inputs" in self.captured:
            out["parts"] = hmkd_part_costs(d, self.captured["inputs"], reps=part_reps, device=self.device)
        return out

    def close(self) -> None:
        if hasattr(self, "_wraps"):
            self._wraps.__exit__(None, None, None)
        self.captured.clear()
        for k in ("distiller", "opt", "main_params"):
            self.__dict__.pop(k, None)


# ------------------------------------------------------------------------------------ HMKD parts
def _time_part(fn: Callable[[], Any], leaves: Callable[[], list[torch.Tensor]], reps: int, device: torch.device) -> dict[str, float]:
    """Median forward and backward seconds of ``fn`` (returns a scalar loss, or None: forward only)."""
    fwd, bwd = [], []
    peak = None
    for r in range(reps + 1):  # first run discarded
        for t in leaves():
            t.grad = None
        _sync(device)
        if device.type == "cuda" and r == reps:  # memory of the part's forward + backward, once
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        loss = fn()
        _sync(device)
        t1 = time.perf_counter()
        if loss is not None and loss.requires_grad:
            loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        if device.type == "cuda" and r == reps:
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        del loss
        if r:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    out = {"forward_s": _median(fwd), "backward_s": _median(bwd), "total_s": _median(fwd) + _median(bwd)}
    if peak is not None:
        out["peak_extra_mb"] = peak
    return out


def hmkd_part_costs(distiller: nn.Module, inputs: Any, *, reps: int = 5, device: torch.device | None = None) -> dict[str, dict[str, float]]:
    """Forward/backward seconds of each part of HMKD's losses on one batch's captured inputs.

    Calls the building blocks exactly as :meth:`HMKDDistiller.distill_losses` does (same options,
    modules and inputs), each part on its own; student maps are leaf copies (``requires_grad``)
    so a backward stops there. Parameter gradients these runs leave are cleared afterwards.
    Returns ``{part: {"forward_s", "backward_s", "total_s"}}`` (on CUDA also ``peak_extra_mb``: the
    peak memory of the part's forward + backward above what was allocated before); the parts are ``masks``,
    ``adapters``, ``inquiry_head``, ``decoder_aux``, ``decoder_attention``, ``others``,
    ``small_fg``, ``attention_term`` and ``gcblock_bg``. As in a step, ``decoder_aux`` includes
    the decoder's key/value projections (forward and backward) and ``decoder_attention`` reuses
    them without a graph.
    """
    from hmkd.distill.common import stride_of
    from hmkd.distill.losses import background_loss
    from hmkd.distill.losses import attention_weighted_mse, masked_feature_mse
    from hmkd.distill.masks import box_mask, fg_bg_masks
    from hmkd.models.backbones import level_index

    d = distiller
    o = d.options
    device = device or inputs.student.tensors.device
    t_feats = {k: v.detach() for k, v in inputs.teacher_features.items()}
    s_leaf = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.student.features.items()}
    leaves = lambda: list(s_leaf.values()) + [p for p in d.parameters() if p.requires_grad]  # noqa: E731
    pairs = [(s, f"P{level_index(s) - 1}") for s in d.pairs]
    mask_levels = sorted(set(d.levels) | {f for _, f in pairs}, key=level_index)
    small_boxes = [b[s] for b, s in zip(inputs.boxes, inputs.small)]
    keep = small_boxes if o.inquiries == "small" else inputs.boxes
    keep_labels = [lab[s] for lab, s in zip(inputs.labels, inputs.small)] if o.inquiries == "small" else inputs.labels
    res: dict[str, dict[str, float]] = {}

    def masks() -> None:
        for l in mask_levels:
            fg_bg_masks(inputs.boxes, tuple(t_feats[l].shape[-2:]), stride_of(l))
        for _, fine in pairs:
            box_mask(small_boxes, tuple(t_feats[fine].shape[-2:]), stride_of(fine))

    res["masks"] = _time_part(masks, leaves, reps, device)
    mk = {l: fg_bg_masks(inputs.boxes, tuple(t_feats[l].shape[-2:]), stride_of(l)) for l in mask_levels}

    def adapters() -> torch.Tensor:
        return sum(d.adapters[l](s_leaf[l]).sum() * 0.0 for l in d.adapters)

    res["adapters"] = _time_part(adapters, leaves, reps, device)
    with torch.no_grad():
        adapted_c = {l: d.adapters[l](s_leaf[l]) for l in d.adapters}

    def adapted(l: str) -> torch.Tensor:  # adapter inside the timed part only when it is a conv
        a = d.adapters[l]
        return s_leaf[l] if isinstance(a, nn.Identity) else a(s_leaf[l])

    small_fg_masks: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def inquiry() -> torch.Tensor | None:
        total = None
        for start, fine in pairs:
            loss, sfg, k_small, n_regions = d.small_object_region(
                start, s_leaf[start], small_boxes, tuple(t_feats[fine].shape[-2:]), mk[fine][1]
            )
            small_fg_masks[start] = (sfg, k_small, n_regions)
            if loss is not None:
                total = loss if total is None else total + loss
        return total

    if d.inquiry_heads is not None:
        res["inquiry_head"] = _time_part(inquiry, leaves, reps, device)
    else:
        inquiry()  # the small-object masks only

    kvs: dict[str, tuple] = {}

    def aux() -> torch.Tensor:
        total = None
        for start, fine in pairs:
            dec = d.decoders[start]
            q_map = t_feats[start] if o.query_feature else None
            kv = dec.keys_values([t_feats[fine]])  # as distill_losses: one key/value pass per step ...
            kvs[start] = tuple(x.detach() for x in kv)
            a = dec.aux_loss(keep, keep_labels, inputs.image_sizes, [t_feats[fine]], q_map, stride_of(start), kv=kv)
            s = sum(a.values())
            total = s if total is None else total + s
        return total

    res["decoder_aux"] = _time_part(aux, leaves, reps, device)
    att: dict[str, tuple] = {}

    def dec_pass() -> None:
        with torch.no_grad():  # ... which the distillation pass reuses, without a graph
            for start, fine in pairs:
                q_map = t_feats[start] if o.query_feature else None
                att[start] = d.decoders[start](keep, keep_labels, inputs.image_sizes, [t_feats[fine]], q_map,
                                               stride_of(start), kv=kvs[start])

    res["decoder_attention"] = _time_part(dec_pass, leaves, reps, device)
    n_img = max(1, len(inputs.boxes))
    n_obj = sum(int(b.shape[0]) for b in inputs.boxes)

    def others() -> torch.Tensor:
        total = None
        for l in d.levels:
            m, k = mk[l]
            v = masked_feature_mse(adapted(l), t_feats[l], m, k, bg_weight=o.others_bg_weight)
            total = v if total is None else total + v
        return o.beta * total * (n_img / max(1.0, float(n_obj)))

    res["others"] = _time_part(others, leaves, reps, device)

    def small_fg() -> torch.Tensor:
        total = None
        for start, fine in pairs:
            sfg, k_small, _ = small_fg_masks[start]
            v = masked_feature_mse(adapted(fine), t_feats[fine], sfg.to(k_small.dtype), k_small)
            total = v if total is None else total + v
        return o.beta * total

    res["small_fg"] = _time_part(small_fg, leaves, reps, device)

    def attention_term() -> torch.Tensor:
        total = None
        for start, fine in pairs:
            m_att, v_t, valid = att[start]
            v_s = d.value_proj[start](adapted(fine))
            v = o.beta * attention_weighted_mse(m_att.detach(), v_s, v_t.detach(), valid)
            total = v if total is None else total + v
        return total

    res["attention_term"] = _time_part(attention_term, leaves, reps, device)
    if d.gc is not None:

        def bg() -> torch.Tensor:
            total = None
            for l in d.levels:
                gc_t = d.gc_t[l] if d.gc_t is not None else None
                red = "mean" if o.reduction == "mean" else "sum"
                v = background_loss(t_feats[l], adapted(l), d.gc[l], form=o.bg_form, gc_t=gc_t, reduction=red)
                total = v if total is None else total + v
            return o.alpha * total

        res["gcblock_bg"] = _time_part(bg, leaves, reps, device)
    del adapted_c, att
    for p in d.parameters():
        p.grad = None
    return res


#: How the parts group into the rows the issue asks for.
PART_GROUPS = {
    "masks (fg/bg + small-object)": ["masks"],
    "inquiry head (head, targets, focal loss, candidates)": ["inquiry_head"],
    "decoder + aux task": ["decoder_aux", "decoder_attention"],
    "small-distill (others + small_fg + attention term)": ["others", "small_fg", "attention_term"],
    "GcBlock / background": ["gcblock_bg"],
    "adapters": ["adapters"],
}


# ------------------------------------------------------------------------------------ report
def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_ms(s: float) -> str:
    return f"{s * 1000:.0f}" if s >= 0.1 else f"{s * 1000:.1f}"


def _markdown(res: dict[str, Any]) -> str:
    rows = res["methods"]
    base = rows[0]
    lines = [
        f"Training-step cost on `{res['config']}` ({res['machine']['device']}, torch {res['machine']['torch']}, "
        f"{res['machine']['torch_threads']} threads), batch {res['data']['batch_size']}, "
        f"median of {res['iters']} steps after {res['warmup']} warm-up; teacher: {res['teacher']}.",
        "",
        "| method | s/step | x no-KD | mean s/step | x no-KD (mean) | teacher fwd share | peak memory (MB) | x no-KD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | "
            f"{r['step_s_mean']:.3f} | {r['step_s_mean'] / base['step_s_mean']:.2f} | "
            f"{100 * r['teacher_forward_share']:.1f}% | {r['peak_memory_mb']:.0f} | "
            f"{r['peak_memory_mb'] / max(base['peak_memory_mb'], 1e-9):.2f} |"
        )
    lines += [
        "",
        "Split of the step (median seconds): student forward | teacher forward | distillation forward | "
        "backward (extra over no-KD) | optimiser steps",
        "",
        "| method | student fwd | teacher fwd | distill fwd | backward | extra bwd | optimiser |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["phases_s"]
        lines.append(
            f"| {r['method']} | {p['student_forward']:.3f} | {p['teacher_forward']:.3f} | {p['distill_forward']:.3f} | "
            f"{p['backward']:.3f} | {p['backward'] - base['phases_s']['backward']:+.3f} | {p['optimizer']:.3f} |"
        )
    hm = next((r for r in rows if r["method"] == "hmkd"), None)
    if hm is not None and "parts" in hm:
        step = hm["step_s"]
        mem = all("peak_extra_mb" in p for p in hm["parts"].values())

        def mcol(names: list[str]) -> str:
            return f" {max(hm['parts'][n]['peak_extra_mb'] for n in names if n in hm['parts']):.0f} |" if mem else ""

        lines += [
            "",
            "HMKD parts, each timed on its own on the last step's captured inputs (ms, median):",
            "",
            "| part | forward | backward | total | % of HMKD step |" + (" extra peak memory (MB) |" if mem else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if mem else ""),
        ]
        for group, names in PART_GROUPS.items():
            parts = [hm["parts"][n] for n in names if n in hm["parts"]]
            if not parts:
                continue
            f = sum(p["forward_s"] for p in parts)
            b = sum(p["backward_s"] for p in parts)
            lines.append(f"| {group} | {_fmt_ms(f)} | {_fmt_ms(b)} | {_fmt_ms(f + b)} | {100 * (f + b) / step:.2f}% |"
                         + mcol(names))
            if len(names) > 1:
                for n in names:
                    p = hm["parts"][n]
                    lines.append(f"| &nbsp;&nbsp;{n} | {_fmt_ms(p['forward_s'])} | {_fmt_ms(p['backward_s'])} | "
                                 f"{_fmt_ms(p['total_s'])} | {100 * p['total_s'] / step:.2f}% |" + mcol([n]))
    t = res.get("targets")
    if t:
        lines += ["", "Issue-8 targets (HMKD against no-KD):", ""]
        for key, label, fmt in (
            ("step_ratio", "HMKD step / no-KD step", "{:.2f}x"),
            ("memory_ratio", "HMKD peak memory / no-KD", "{:.2f}x"),
            ("mask_share", "mask building share of the HMKD step", "{:.2%}"),
        ):
            if key in t:
                v = t[key]
                lines.append(f"- {label}: {fmt.format(v['value'])} (target {'<=' if key != 'mask_share' else '<'} "
                             f"{fmt.format(v['target'])}): {'met' if v['met'] else 'NOT met'}")
    lines += [
        "",
        f"Peak memory: {rows[0]['memory_method']}; it counts the method's models (the teacher for KD methods), "
        "optimiser state and activations. Load average at start/end: "
        f"{res['loadavg_start']} / {res['loadavg_end']} (timings on a shared machine are noisy).",
    ]
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = rows[0]
    hm = next((r for r in rows if r["method"] == "hmkd"), None)
    if hm is None:
        return {}
    out: dict[str, Any] = {}
    v = hm["step_s"] / base["step_s"]
    out["step_ratio"] = {"value": v, "target": TARGETS["step_ratio"], "met": v <= TARGETS["step_ratio"]}
    v = hm["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9)
    out["memory_ratio"] = {"value": v, "target": TARGETS["memory_ratio"], "met": v <= TARGETS["memory_ratio"]}
    if "parts" in hm:
        v = hm["parts"]["masks"]["total_s"] / hm["step_s"]
        out["mask_share"] = {"value": v, "target": TARGETS["mask_share"], "met": v < TARGETS["mask_share"]}
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_cost_bench(
    cfg: Config,
    methods: Sequence[str] | None = None,
    out_dir: str | os.PathLike = "runs/cost",
    iters: int = 10,
    warmup: int = 2,
    *,
    random_teacher: bool | None = None,
    n_batches: int = 2,
    part_reps: int = 5,
    device: str | torch.device | None = None,
    config_name: str | None = None,
) -> dict[str, Any]:
    """Seconds per training step, its split, and peak memory of no-KD and each method (module doc).

    Args:
        cfg: the run config (student ``model``, ``teacher``, ``data``, ``train`` optimiser and clip;
            ``distill.options`` apply to ``distill.method`` only, other methods use their defaults).
        methods: methods to time (default: every registered method); ``none`` (no-KD) is always
            timed first, as the reference. ``NAME:option=value[:option=value...]`` times a variant
            of a method with those ``distill.options`` changed (e.g. ``hmkd:aux_every=4``); the
            per-part split and the targets are reported for plain ``hmkd``.
        out_dir: where ``cost.json`` and ``cost.md`` go.
        iters, warmup: timed and discarded steps per method.
        random_teacher: ``True``: random teacher weights; ``None``: the weights file when it exists,
            else random; ``False``: the weights file is required.
        n_batches: distinct pre-loaded batches the steps cycle through.
        part_reps: repetitions of each HMKD part timing.
        device: overrides ``cfg.device``.
        config_name: label of the config in the report (default ``cfg.name``).

    Returns:
        ``{"table": Markdown, "methods": [per-method dicts], "targets": ..., "paths": ..., ...}``
        (the JSON written to ``cost.json`` plus ``table``).
    """
    from hmkd.distill import METHODS

    if iters < 1 or warmup < 0 or n_batches < 1 or part_reps < 1:
        raise ConfigError("cost bench: iters, n_batches and part_reps must be >= 1 and warmup >= 0")
    names = list(methods) if methods else list(METHODS)
    for m in names:
        _needs_teacher(m)  # unknown method: ConfigError
    names = ["none"] + [m for m in dict.fromkeys(names) if m != "none"]
    dev = _device(cfg, device)
    load_teacher, teacher_desc = False, "none needed"
    if any(_needs_teacher(m) for m in names):
        load_teacher, teacher_desc = _teacher_mode(cfg, random_teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    t_start = time.time()
    batches, n_cls, data_info = _load_batches(cfg, n_batches, dev)
    runs = [_MethodRun(cfg, m, dev) for m in names]
    try:
        for r in runs:  # one after the other, so each peak memory is the method's own
            logger.info("cost bench: building and warming up %s", r.method)
            r.setup(batches, n_cls, load_teacher, warmup)
        for i in range(iters):  # interleaved: load changes on a shared machine hit every method alike
            for r in runs:
                if i == iters - 1:
                    r.captured.clear()
                r.step(batches)
        rows = [r.result(part_reps) for r in runs]
    finally:
        for r in runs:
            r.close()
        del runs
        gc.collect()
    res: dict[str, Any] = {
        "config": config_name or cfg.name,
        "machine": _machine(dev),
        "iters": iters,
        "warmup": warmup,
        "n_batches": n_batches,
        "part_reps": part_reps,
        "teacher": teacher_desc + ("" if cfg.distill.teacher_dtype == "float32" else f", run in {cfg.distill.teacher_dtype}"),
        "data": data_info,
        "model": dataclasses.asdict(cfg.model),
        "teacher_model": dataclasses.asdict(cfg.teacher) if cfg.teacher is not None else None,
        "train": {"optimizer": cfg.train.optimizer, "lr": cfg.train.lr, "clip_grad": cfg.train.clip_grad},
        "methods": rows,
        "targets": _targets(rows),
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.time() - t_start,
    }
    base = rows[0]
    for r in rows:
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["memory_ratio"] = r["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9)
        r["extra_backward_s"] = r["phases_s"]["backward"] - base["phases_s"]["backward"]
    table = _markdown(res)
    paths = {"json": str(out / "cost.json"), "md": str(out / "cost.md")}
    res["paths"] = paths
    with open(paths["json"], "w") as f:
        json.dump(_json_safe(res), f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(table)
    res["table"] = table
    return res
