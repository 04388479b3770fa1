"""Iteration-based training of a student detector (with or without a teacher).

:func:`hmkd.training.train` runs torchvision's ``references/detection`` loop, reshaped around a
:class:`~hmkd.distill.base.Distiller` and counted in iterations; each iteration is one
:func:`~hmkd.training.step.train_step` followed by the learning-rate schedule's step:

    losses = distiller(images, targets, it)          # flat, prefixed loss dict
    total = sum(losses.values())                      # a non-finite term stops the run
    total.backward()                                  # once; DDP averages the student's gradients
    all-reduce the distiller's own gradients          # (outside DDP; multi-process only)
    clip, step the main optimiser and each of the distiller's extra optimisers, step the schedules
    (the main one and the distiller's ``extra_schedulers(train.iters)``, e.g. ICD's decoder cosine)

Method ``none`` is plain training of one detector (how teachers are trained). With
``distill.init_student`` (``neck`` | ``neck_head``; ``null`` = the method's own default, e.g.
``neck_head`` for FGD and ICD) the student's FPN (and detection head) are first copied from the
teacher (:func:`hmkd.models.weights.init_from_teacher`), once, at the start of a run, never when
resuming (the checkpoint holds the student); ``none`` with it is no-KD from the same start.
A method may clip the main parameters its own way (``Distiller.main_clip_grad``, FGD's 35): it
then replaces ``train.clip_grad``. Everything a run writes goes to ``output_dir`` (default ``runs/<cfg.name>``)::

    config.yaml          the resolved config, written at start
    log.jsonl            every log_period-th step: iteration, lr, each loss term, total, s/iter, memory
    last_checkpoint.pth  every ckpt_period iterations and on SIGINT/SIGTERM (resumable); removed at
                         the end of a finished run unless train.keep_last_checkpoint
    model_best.pth       best bbox mAP of the periodic evaluations (train.eval_period > 0 only)
    model_final.pth      the student at the end (a plain detector checkpoint)
    eval/                metrics.json + detections.json of the final evaluation
    metrics.json         final metrics, best, timing
    loss_curve.png       the logged terms by group (detection, distillation, auxiliary), lr, eval mAP

Console (rank 0, through :mod:`logging`): before iteration 1 a summary of the data (every image's
header read: :func:`hmkd.data.check.check_dataset`) and, when distilling, the teacher's own
recorded metrics; every ``log_period`` iterations one line (detectron2's shape: ETA, iteration,
total and each loss group, lr, iteration and data time, peak memory); a tqdm bar only when stderr
is a terminal. A resumed run says what changed in its config since the checkpoint.

Fault tolerance:

- checkpoints are written atomically (:mod:`hmkd.engine.checkpoint`);
- ``resume=True`` continues from ``last_checkpoint.pth`` and reaches the same weights, bit for bit,
  as an uninterrupted run with the same seed on CPU. What makes it exact: the data order is a
  function of (seed, iteration) (:class:`~hmkd.engine.sampler.InfiniteBatchSampler`, skipping
  consumed samples arithmetically), each sample's augmentation draws from its own seed
  (:class:`~hmkd.engine.sampler.SeededDataset`), and the Python/NumPy/torch/CUDA generator states
  of every rank, the optimisers, schedules (the distiller's own too) and AMP scaler are restored.
  This holds for any
  ``data.workers`` (workers only change who loads a sample, not what it is). Resuming with another
  number of processes (or batch size) continues the data stream at the consumed-sample count, but
  the random streams are then reseeded, so that resume is not bitwise. On GPU the data and
  random streams are equally exact, but CUDA kernels (atomics in backward, cuDNN algorithm
  choice) are not bitwise deterministic, so weights agree to floating-point noise only;
- a non-finite loss raises :class:`~hmkd.errors.NonFiniteLossError` naming the terms and the
  iteration before any parameter is touched; the last checkpoint stays as it was;
- SIGINT/SIGTERM: the current iteration finishes, a checkpoint is saved and
  :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised; a second SIGINT stops at once.

Distributed (``torchrun``): see :mod:`hmkd.engine.distributed`. Only rank 0 writes files and shows
progress; evaluation (:mod:`hmkd.engine.evaluation`) runs each rank on its shard and scores the
gathered detections on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hmkd.config import (
    Config,
    resolve_config,
    save_config,
    to_dict,
)
from hmkd.distill.build import build_run, teacher_use
from hmkd.engine import checkpoint as ckpt_io
from hmkd.engine import distributed as du
from hmkd.engine.evaluation import aitod_max_dets_of, evaluate_model, write_eval_outputs
from hmkd.engine.loaders import close_loader_iter, next_batch, seeded_loader, to_device
from hmkd.engine.logging_utils import (
    JsonlLogger,
    TensorBoardLogger,
    bar_wanted,
    config_changes,
    format_duration,
    peak_memory_mb,
    plot_loss_curve,
    read_jsonl,
    step_line,
)
from hmkd.engine.sampler import mix_seed
from hmkd.engine.signals import StopSignal
from hmkd.training.step import train_step
from hmkd.errors import CheckpointError, ConfigError, NonFiniteLossError
from hmkd.models import is_mask_model
from hmkd.models.checkpoint_info import LabelMap
from hmkd.models.weights import read_torch_file
from hmkd.utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingInterrupted", "resolve_output_dir"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved; ``--resume`` continues.

    Attributes: ``iteration`` reached, ``checkpoint`` path, ``output_dir``, ``signum`` (the signal;
    ``hmkd`` exits with status 128 + signum: 130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(
        self, iteration: int, checkpoint: str | None, output_dir: str, signum: int = signal.SIGINT
    ) -> None:
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.output_dir = output_dir
        self.signum = int(signum)
        super().__init__(
            f"training interrupted at iteration {iteration}; checkpoint {checkpoint}; rerun with --resume to continue"
        )


# ------------------------------------------------------------------------------------ helpers
def resolve_output_dir(cfg: Config, output_dir: str | None = None) -> str:
    """``output_dir`` argument, else ``cfg.output_dir``, else ``runs/<cfg.name>``."""
    return output_dir or cfg.output_dir or os.path.join("runs", cfg.name)


class Trainer:
    """One training run (kept as an object so the loop's state is in one place): :meth:`prepare`
    (checks, data), :meth:`build` (what the run trains, :func:`hmkd.distill.build.build_run`), :meth:`run`
    (resume state, the loop, the final evaluation); :func:`hmkd.training.run.train` calls the three."""

    def __init__(self, cfg: Config, ctx: du.DistContext, output_dir: str, resume: bool, progress: bool) -> None:
        self.ctx = ctx
        self.out = output_dir
        self.resume = resume
        self.progress = progress and ctx.is_main
        self.bars = bar_wanted(self.progress)  # tqdm only on a terminal; log lines either way
        self.device = ctx.device
        self.raw_cfg = cfg
        self.amp = bool(cfg.train.amp)
        if self.amp and self.device.type != "cuda":
            warnings.warn("train.amp is ignored on CPU (mixed precision needs CUDA)", stacklevel=3)
            self.amp = False

    # -- setup ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check what can be checked before any work (the resume state, the teacher), read both data
        splits and run their pre-flight check. Sets :attr:`resuming` and :attr:`teacher_use`."""
        from hmkd.data import build_data
        from hmkd.data.at_hand import class_count

        paths = self._paths()
        if self.resume and not os.path.isfile(paths["last"]):
            raise CheckpointError(self._no_resume_state(paths["last"]))
        cfg, ctx = self.raw_cfg, self.ctx
        method = cfg.distill.method
        self.teacher_use = use = teacher_use(cfg)
        self.resuming = self.resume and os.path.isfile(paths["last"])
        if not use.distils and cfg.teacher is not None and use.init == "none":
            logger.info("distill.method %r uses no teacher; the 'teacher' section is ignored", method)

        if ctx.is_main:
            os.makedirs(self.out, exist_ok=True)
        ckpt_io.seed_everything(cfg.seed)
        self.train_set = du.main_first(ctx, lambda: build_data(cfg, train=True))
        self.val_set = du.main_first(ctx, lambda: build_data(cfg, train=False))
        if len(self.train_set) == 0:
            raise ConfigError(f"the training split of data.root={cfg.data.root!r} holds no image")
        n = class_count(cfg, self.train_set, check=True)
        if int(self.val_set.num_classes) != n:
            raise ConfigError(f"train split has {n} classes but val split has {self.val_set.num_classes}")
        self.num_classes = n
        self.cfg = resolve_config(cfg, self.out, n)
        self._check_data(read_images=cfg.data.check_images)
        # category ids and names of labels 1..K, for eval / viz / export of the checkpoints
        self.label_map = LabelMap.from_dataset(self.train_set).to_dict()

    @property
    def builds_teacher(self) -> bool:
        """Whether :meth:`build` builds the teacher (to distil from, or to copy from when not resuming)."""
        use = self.teacher_use
        return use.distils or (use.init != "none" and not self.resuming)

    def build(self, cfg: Config) -> None:
        """Build what the run trains from ``cfg``, the run's config with its stand-ins resolved
        (:func:`hmkd.training.run.resolve_pretrained`)."""
        ctx, use, resuming = self.ctx, self.teacher_use, self.resuming
        parts = build_run(cfg, self.num_classes, device=self.device, init="none" if resuming else use.init,
                          train_set=None if resuming else self.train_set, ctx=ctx, progress=self.bars)
        if use.distils and ctx.is_main:
            self._say_teacher(cfg.teacher.weights)
        self.parts = parts
        self.distiller, self.student = parts.distiller, parts.student
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.extras, self.extra_scheds = parts.extra_optimizers, parts.extra_schedulers
        if ctx.distributed:
            du.broadcast_module(ctx, self.distiller)
            ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.distiller.wrap_student(ddp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp) if self.amp else None
        self.iteration = 0
        self.best = {"iteration": None, "mAP": None}
        self.evals: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.samples_seen = 0  # global data-stream position (all ranks together)

    def _check_data(self, read_images: bool = True) -> None:
        """The pre-flight check of both splits (rank 0; every rank raises its error) and the
        one-screen summary; ``read_images`` (``data.check_images``): every image's header too."""
        from hmkd.data.check import check_dataset, format_reports
        from hmkd.errors import DataError

        error = None
        if self.ctx.is_main:
            try:
                reports = [check_dataset(self.train_set, "train", read_images=read_images),
                           check_dataset(self.val_set, "val", read_images=read_images)]
                for line in format_reports(reports):
                    logger.info("data: %s", line)
            except DataError as e:
                error = str(e)
        error = du.broadcast_object(self.ctx, error)
        if error:
            raise DataError(error)

    def _say_teacher(self, path: str) -> None:
        """Log the teacher checkpoint's own recorded metrics (``model_final.pth`` holds them)."""
        try:
            obj = read_torch_file(path, mmap=True)
        except CheckpointError:  # the weights loader has already reported what matters
            return
        metrics = obj.get("metrics") if isinstance(obj, dict) else None
        bbox = (metrics or {}).get("bbox") if isinstance(metrics, dict) else None
        if not isinstance(bbox, dict) or not bbox:
            logger.info("teacher %s: its checkpoint records no metrics (hmkd eval scores it)", path)
            return
        keys = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
        nums = "  ".join(f"{k} {bbox[k]:.1f}" if isinstance(bbox.get(k), (int, float)) and math.isfinite(bbox[k])
                         else f"{k} -" for k in keys)
        run = (obj.get("config") or {}).get("name") if isinstance(obj.get("config"), dict) else None
        where = f"iteration {obj.get('iteration')}" + (f" of run {run!r}" if run else "")
        logger.info("teacher %s: bbox %s (its own evaluation, %s)", path, nums, where)

    def _paths(self) -> dict[str, str]:
        return {k: os.path.join(self.out, v) for k, v in (("last", ckpt_io.LAST), ("best", ckpt_io.BEST), ("final", ckpt_io.FINAL))}

    # -- checkpoints ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rng = du.all_gather_object(self.ctx, ckpt_io.capture_rng_state())  # collective: every rank
        return {
            **self.parts.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iteration": self.iteration,
            "rng": rng,
            "config": to_dict(self.cfg),
            "label_map": self.label_map,
            "method": self.cfg.distill.method,
            "trainer": {
                "best": dict(self.best),
                "evals": list(self.evals),
                "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds,
                "world_size": self.ctx.world_size,
                "samples_seen": self.samples_seen,
            },
        }

    def _save_last(self) -> str:
        state = self._state()
        path = self._paths()["last"]
        if self.ctx.is_main:
            ckpt_io.save_checkpoint(state, path)
        du.barrier(self.ctx)
        return path

    def _save_weights(self, key: str, metrics: dict[str, Any] | None = None) -> None:
        """``model_best.pth`` / ``model_final.pth``: the student's weights + config (rank 0)."""
        if not self.ctx.is_main:
            return
        ckpt_io.save_checkpoint(
            {
                "model": self.student.state_dict(),
                "iteration": self.iteration,
                "config": to_dict(self.cfg),
                "label_map": self.label_map,
                "method": self.cfg.distill.method,
                "metrics": metrics,
            },
            self._paths()[key],
        )

    def _load(self, path: str) -> None:
        ckpt = ckpt_io.load_training_checkpoint(path)
        self.parts.load_state_dict(ckpt, path=path, scaler=self.scaler)
        self.iteration = int(ckpt["iteration"])
        self._say_changes(path, ckpt.get("config"))
        tr = ckpt.get("trainer") or {}
        self.best = dict(tr.get("best") or self.best)
        self.evals = list(tr.get("evals") or [])
        self.train_seconds = float(tr.get("train_seconds", 0.0))
        self.eval_seconds = float(tr.get("eval_seconds", 0.0))
        self.samples_seen = int(
            tr.get("samples_seen", self.iteration * self.cfg.data.batch_size * int(tr.get("world_size", 1)))
        )
        rng = ckpt.get("rng") or []
        if len(rng) == self.ctx.world_size:
            ckpt_io.restore_rng_state(rng[self.ctx.rank])
        else:
            logger.warning(
                "%s was saved by %d process(es), this run has %d: random streams reseeded (not bitwise resumable)",
                path, len(rng), self.ctx.world_size,
            )
            ckpt_io.seed_everything(mix_seed(self.cfg.seed, self.ctx.rank, self.iteration))
        logger.info("resumed from %s at iteration %d", path, self.iteration)

    def _say_changes(self, path: str, saved: dict[str, Any] | None) -> None:
        """Warn about what differs between the checkpoint's config and this run's (rank 0)."""
        if not self.ctx.is_main or not isinstance(saved, dict):
            return
        changes = config_changes(saved, to_dict(self.cfg), ignore=("output_dir",))
        if not changes:
            return
        iters = [c for c in changes if c[0] == "train.iters"]
        if iters:
            _, old, new = iters[0]
            logger.warning("resuming %s at iteration %d with train.iters %s -> %s (the schedule is the new one's)",
                           path, self.iteration, old, new)
        others = [c for c in changes if c[0] != "train.iters"]
        if others:
            shown = ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in others[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            logger.warning("resuming %s with a changed config: %s%s", path, shown, more)

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, final: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics, dets = evaluate_model(
            self.student,
            self.val_set,
            device=self.device,
            batch_size=self.cfg.data.eval_batch_size,
            workers=self.cfg.data.workers,
            with_masks=is_mask_model(self.cfg),
            progress=self.bars,
            ctx=self.ctx,
            aitod_max_dets=aitod_max_dets_of(self.cfg),
        )
        self.distiller.train()
        self.eval_seconds += time.perf_counter() - t0
        bbox = metrics.get("bbox", {})
        summary = {k: v for k, v in bbox.items() if k != "per_class"}
        self.evals.append({"iteration": self.iteration, "bbox": summary})
        if self.ctx.is_main:
            self.log.write({"iteration": self.iteration, "eval": {k: {m: v for m, v in d.items() if m != "per_class"} for k, d in metrics.items()}})
            if self.tb is not None:
                self.tb.write(self.iteration, summary, prefix="val/")
            if final:
                write_eval_outputs(os.path.join(self.out, "eval"), metrics, dets)
        m = bbox.get("mAP")
        if m is not None and math.isfinite(m) and (self.best["mAP"] is None or m > self.best["mAP"]):
            self.best = {"iteration": self.iteration, "mAP": m}
            if self.cfg.train.eval_period:  # with the final evaluation only, it would be model_final.pth again
                self._save_weights("best", metrics)
        return metrics

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train (after :meth:`prepare` and :meth:`build`); returns the final metrics."""
        paths = self._paths()
        cfg, ctx, tcfg = self.cfg, self.ctx, self.cfg.train
        resumed = False
        if self.resume:
            self._load(paths["last"])
            resumed = True
        elif ctx.is_main and os.path.isfile(paths["last"]):
            logger.warning("%s exists and resume is off: starting from scratch (it will be overwritten)", paths["last"])
        if not resumed:
            ckpt_io.seed_everything(mix_seed(cfg.seed, ctx.rank) if ctx.distributed else cfg.seed)

        self.log = JsonlLogger(os.path.join(self.out, "log.jsonl"))
        self.tb = None
        if ctx.is_main:
            self._remove_partial_writes()
            save_config(cfg, os.path.join(self.out, "config.yaml"))
            if resumed:
                self.log.truncate_after(self.iteration)
            elif os.path.exists(self.log.path):
                os.remove(self.log.path)
            if tcfg.tensorboard:
                self.tb = TensorBoardLogger(os.path.join(self.out, "tensorboard"))
        try:
            # with a bar on the terminal, log lines are written above it (tqdm.write) instead of through it
            with StopSignal() as stop, logging_redirect_tqdm() if self.bars else contextlib.nullcontext():
                self._loop(stop)
            return self._finish()
        finally:
            if self.tb is not None:
                self.tb.close()

    def _no_resume_state(self, last: str) -> str:
        """Why ``--resume`` cannot continue: the folder is missing, holds a finished run whose
        resume state was removed, or holds no checkpoint."""
        if not os.path.isdir(self.out):
            why = f"the output folder {self.out} does not exist (mistyped --output-dir?)"
        elif os.path.isfile(os.path.join(self.out, "metrics.json")):
            why = (f"{self.out} holds a finished run whose resume state was removed at its end "
                   "(train.keep_last_checkpoint: true keeps it)")
        else:
            why = f"{self.out} holds no checkpoint"
        return f"--resume: no {last}: {why}; leave out --resume to start from scratch"

    def _remove_partial_writes(self) -> None:
        """Delete temporary checkpoint files a killed run left (``.last_checkpoint.pth.XXXX.tmp``):
        never complete, they would otherwise pile up, each as large as a checkpoint."""
        for path in ckpt_io.partial_writes(self.out):
            logger.warning("removing %s, a partial checkpoint write of an earlier run", path)
            os.remove(path)

    def _loader(self) -> DataLoader:
        return seeded_loader(
            self.train_set, self.cfg.data.batch_size, seed=self.cfg.seed,
            generator_seed=mix_seed(self.cfg.seed, self.iteration, 17),
            rank=self.ctx.rank, world_size=self.ctx.world_size, start_iter=self.iteration,
            start_position=self.samples_seen, workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
        )

    def _loop(self, stop: StopSignal) -> None:
        cfg, ctx, tcfg = self.cfg, self.ctx, self.cfg.train
        total_iters = tcfg.iters
        if self.iteration >= total_iters:
            return
        data = iter(self._loader())
        bar = tqdm(total=total_iters, initial=self.iteration, disable=not self.bars, desc=cfg.name, dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        win_time, win_data, win_n = 0.0, 0.0, 0
        self._session = (self.iteration, self.train_seconds)  # for the ETA: this process's own speed
        if self.progress:
            logger.info("training %s: iterations %d -> %d, %s (log every %s iterations) -> %s", cfg.name,
                        self.iteration, total_iters, self.cfg.distill.method if self.cfg.distill.method != "none"
                        else "no distillation", tcfg.log_period or total_iters, self.out)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        last_ckpt = self._paths()["last"] if os.path.isfile(self._paths()["last"]) else None
        try:
            while self.iteration < total_iters:
                it = self.iteration
                t0 = time.perf_counter()
                images, targets = next_batch(data)
                images, targets = to_device(images, targets, self.device)
                t_data = time.perf_counter() - t0

                lr = self.optimizer.param_groups[0]["lr"]
                try:
                    values = train_step(
                        self.distiller, self.optimizer, images, targets, it,
                        main_params=self.parts.main_params, clip_grad=self.parts.clip_grad, extra_optimizers=self.extras,
                        scaler=self.scaler, amp=self.amp, ctx=ctx, sync_params=self.parts.sync_params,
                    )
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"{e} (last good checkpoint: {last_ckpt or 'none yet'})") from None
                self.scheduler.step()
                for _, sched in self.extra_scheds:
                    sched.step()
                self.iteration = it + 1
                self.samples_seen += cfg.data.batch_size * ctx.world_size
                dt = time.perf_counter() - t0
                self.train_seconds += dt

                for k, v in values.items():
                    window.setdefault(k, []).append(v)
                win_time, win_data, win_n = win_time + dt, win_data + t_data, win_n + 1
                if self.bars:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}", refresh=False)

                done = self.iteration >= total_iters
                (stop_now,) = du.all_reduce_flags(ctx, stop.requested is not None)
                if done or (tcfg.log_period and self.iteration % tcfg.log_period == 0):
                    self._log_step(lr, window, win_time / win_n, win_data / win_n)
                    window, win_time, win_data, win_n = {}, 0.0, 0.0, 0
                if tcfg.eval_period and self.iteration % tcfg.eval_period == 0 and not done:
                    self._evaluate()
                if (tcfg.ckpt_period and self.iteration % tcfg.ckpt_period == 0) or stop_now or done:
                    last_ckpt = self._save_last()
                if stop_now and not done:
                    raise TrainingInterrupted(self.iteration, last_ckpt, self.out, stop.requested or signal.SIGINT)
        finally:
            bar.close()
            close_loader_iter(data)  # workers stop now, not at interpreter exit (where they would hang)

    def _log_step(self, lr: float, window: dict[str, list[float]], sec: float, data_sec: float) -> None:
        means = {k: sum(v) / len(v) for k, v in window.items()}
        if self.ctx.distributed:
            parts = du.all_gather_object(self.ctx, means)
            keys = {k for p in parts for k in p}
            means = {k: sum(p[k] for p in parts if k in p) / sum(1 for p in parts if k in p) for k in sorted(keys)}
        if not self.ctx.is_main:
            return
        rec: dict[str, Any] = {"iteration": self.iteration, "lr": lr}
        rec.update({k: v for k, v in means.items() if k != "total"})
        rec["total"] = means.get("total")
        rec["sec_per_iter"] = sec
        rec["data_sec"] = data_sec
        rec["peak_mem_mb"] = peak_memory_mb(self.device)
        self.log.write(rec)
        if self.tb is not None:
            self.tb.write(self.iteration, {k: v for k, v in rec.items() if k != "iteration"})
        if self.progress:
            it0, sec0 = self._session
            done = self.iteration - it0
            per_iter = (self.train_seconds - sec0) / done if done > 0 else sec
            eta = per_iter * (self.cfg.train.iters - self.iteration)
            logger.info("%s", step_line(rec, total_iters=self.cfg.train.iters, eta_sec=eta))

    def _finish(self) -> dict[str, Any]:
        metrics = self._evaluate(final=True)
        self._save_weights("final", metrics)
        ctx = self.ctx
        n = self.iteration
        outputs = {"final": self._paths()["final"], "metrics": os.path.join(self.out, "metrics.json"),
                   "log": self.log.path, "loss_curve": os.path.join(self.out, "loss_curve.png"),
                   "eval": os.path.join(self.out, "eval")}
        if self.cfg.train.eval_period and os.path.isfile(self._paths()["best"]):
            outputs["best"] = self._paths()["best"]
        if self.cfg.train.keep_last_checkpoint:
            outputs["last"] = self._paths()["last"]
        result: dict[str, Any] = dict(metrics)
        result.update(
            {
                "status": "finished",
                "iteration": n,
                "method": self.cfg.distill.method,
                "best": dict(self.best),
                "evals": list(self.evals),
                "timing": {
                    "train_seconds": self.train_seconds,
                    "sec_per_iter": self.train_seconds / n if n else None,
                    "eval_seconds": self.eval_seconds,
                    "images_per_sec": (n * self.cfg.data.batch_size * ctx.world_size / self.train_seconds)
                    if self.train_seconds > 0
                    else None,
                    "device": str(self.device),
                    "world_size": ctx.world_size,
                    "amp": self.amp,
                },
                "output_dir": self.out,
                "outputs": outputs,
            }
        )
        if ctx.is_main:
            write_json(os.path.join(self.out, "metrics.json"), result)
            try:
                plot_loss_curve(read_jsonl(self.log.path), outputs["loss_curve"])
            except Exception as e:  # a figure is not worth failing a finished run
                logger.warning("could not draw loss_curve.png: %s", e)
            if not self.cfg.train.keep_last_checkpoint and os.path.isfile(self._paths()["last"]):
                # the resume state (optimiser moments, schedules, random streams: ~3x the model) is
                # of no use once model_final.pth and metrics.json are written
                os.remove(self._paths()["last"])
                logger.info("removed %s (the resume state of a finished run; train.keep_last_checkpoint: true keeps it)",
                            self._paths()["last"])
            logger.info("finished %s: %d iterations in %s (%.3f s/iter), evaluation %s", self.cfg.name, n,
                        format_duration(self.train_seconds), self.train_seconds / n if n else float("nan"),
                        format_duration(self.eval_seconds))
        du.barrier(ctx)
        return result
