"""What a run needs, built once: the trainer (:mod:`hmkd.training.trainer`), ``hmkd bench cost`` and
``hmkd fit-decoder`` (:mod:`hmkd.distill.matching.report`) all call :func:`build_run`.

From a config whose pretrained stand-ins are already resolved (:func:`hmkd.training.resolve_pretrained`)
it builds, in this order (the order the random stream is drawn in): the student; the teacher, loaded
and frozen, when the method distils from it or ``distill.init_student`` copies from it; that copy;
the distiller with its options; the teacher's precision; the method's one-off preparation
(:meth:`~hmkd.distill.base.Distiller.prepare`: ICD and HMKD fit their matching decoder on the
teacher alone, ``distill.options.decoder_fit``); then the parameter groups, the main optimiser
and schedule, and the method's own optimisers and their schedules over the run.

How a run uses its teacher is decided once, by :func:`teacher_use`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hmkd.config import Config
from hmkd.distill.base import Distiller
from hmkd.distill.registry import build_distiller, method_class, needs_teacher
from hmkd.engine import distributed as du
from hmkd.engine.optim import build_optimizer, build_scheduler, optimizer_params
from hmkd.errors import CheckpointError, ConfigError
from hmkd.models import build_model
from hmkd.models import weights as weights_io

__all__ = ["RunParts", "TeacherUse", "build_run", "teacher_use"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherUse:
    """How a run uses its teacher.

    Attributes:
        distils: the method distils from the teacher (every method but ``none``).
        init: ``distill.init_student`` resolved (``none`` | ``neck`` | ``neck_head``; ``null`` in the
            config is the method's own default).
    """

    distils: bool
    init: str


def teacher_use(cfg: Config) -> TeacherUse:
    """How ``cfg``'s run uses its teacher, checked: a one-line :class:`ConfigError` when the method or
    ``distill.init_student`` needs a teacher that the config does not give."""
    method = cfg.distill.method
    use = TeacherUse(distils=needs_teacher(method),
                     init=cfg.distill.init_student or method_class(method).default_init_student)
    if use.init != "none" and (cfg.teacher is None or not cfg.teacher.weights):
        raise ConfigError(
            f"distill.init_student {use.init} (method {method!r}) copies a trained teacher into the student: "
            "set teacher.weights to its checkpoint (or distill.init_student: none)"
        )
    if use.distils:
        if cfg.teacher is None:
            raise ConfigError(f"distill.method {method!r} needs a teacher: add a 'teacher' section with 'weights'")
        if not cfg.teacher.weights:
            raise ConfigError(f"distill.method {method!r} needs a trained teacher: set teacher.weights to its checkpoint")
    return use


@dataclass
class RunParts:
    """What :func:`build_run` built.

    Attributes:
        student: the detector being trained.
        distiller: the method around it and its teacher (``distiller.teacher``; a teacher built only
            for ``init_student`` is dropped after the copy), on the device, in train mode.
        clip_grad: where the main parameters' gradients are clipped (the method's own, e.g. FGD's
            35, or ``train.clip_grad``).
        main_params: the main optimiser's parameters (student + the distiller's own modules).
        sync_params: the parameters outside DDP whose gradients are averaged over processes (the
            distiller's own modules and its own optimisers' parameters).
        optimizer, scheduler: the main optimiser and its learning-rate schedule.
        extra_optimizers: ``(name, optimiser, clip)`` of the method's own optimisers.
        extra_schedulers: ``(name, schedule)`` of those optimisers over the run.
    """

    student: nn.Module
    distiller: Distiller
    clip_grad: float | None
    main_params: list[nn.Parameter]
    sync_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    extra_optimizers: list[tuple[str, torch.optim.Optimizer, float | None]]
    extra_schedulers: list[tuple[str, Any]]

    def state_dict(self) -> dict[str, Any]:
        """The trained state: the student's weights, the distiller's own modules, every optimiser and
        schedule (the resume checkpoint's entries ``model`` ... ``extra_schedulers``)."""
        return {
            "model": self.student.state_dict(),
            "distiller": {k: v for k, v in self.distiller.state_dict().items() if not k.startswith("student.")},
            "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": {name: opt.state_dict() for name, opt, _ in self.extra_optimizers},
            "scheduler": self.scheduler.state_dict(),
            "extra_schedulers": {name: sched.state_dict() for name, sched in self.extra_schedulers},
        }

    def load_state_dict(self, ckpt: dict[str, Any], *, path: str, scaler: Any = None) -> None:
        """Restore :meth:`state_dict`'s entries of the checkpoint ``ckpt`` read from ``path`` (and a
        ``GradScaler``'s ``scaler`` entry). The schedules' functions come from the config and the
        method, not the file. Anything that does not fit is a one-line :class:`CheckpointError`."""
        try:
            self.student.load_state_dict(ckpt["model"])
            own = {k for k in self.distiller.state_dict() if not k.startswith("student.")}
            saved = ckpt.get("distiller") or {}
            missing, unexpected = sorted(own - set(saved)), sorted(set(saved) - own)
            if missing or unexpected:
                raise CheckpointError(
                    f"{path}: distiller state does not fit method {self.distiller.name!r} "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            self.distiller.load_state_dict(saved, strict=False)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            saved_extra = ckpt.get("extra_optimizers") or {}
            for name, opt, _ in self.extra_optimizers:
                if name not in saved_extra:
                    raise CheckpointError(f"{path}: no state for extra optimiser {name!r}")
                opt.load_state_dict(saved_extra[name])
            sched = dict(ckpt["scheduler"])
            sched["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)  # the schedule comes from the config
            self.scheduler.load_state_dict(sched)
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
            saved_sched = ckpt.get("extra_schedulers") or {}
            for name, sched in self.extra_schedulers:
                if name not in saved_sched:
                    raise CheckpointError(f"{path}: no state for extra scheduler {name!r}")
                state = dict(saved_sched[name])
                if "lr_lambdas" in state:  # the schedule itself comes from the method and the config
                    state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
                sched.load_state_dict(state)
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError) as e:
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{path}: does not fit this run's model/optimiser ({msg})") from None


def build_run(
    cfg: Config,
    num_classes: int,
    *,
    device: torch.device,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    init: str = "none",
    load_teacher: bool = True,
    train_set: Any | None = None,
    ctx: du.DistContext | None = None,
    progress: bool = False,
) -> RunParts:
    """Build everything a run of ``cfg`` trains with (see the module docstring).

    Args:
        cfg: the run's config, stand-ins resolved.
        num_classes: the student's class count (the data set's).
        device: where the distiller goes.
        method, options: the method and its options (default: ``cfg.distill``'s); ``hmkd bench
            cost`` passes its method variants here.
        init: the teacher's parts copied into the student (:attr:`TeacherUse.init`; ``none`` when
            resuming, since the checkpoint holds the student, and in ``hmkd bench cost``, since a
            step's cost does not depend on it).
        load_teacher: load ``teacher.weights`` (``hmkd bench cost`` may time a random teacher).
        train_set: the training split the method prepares on (:meth:`Distiller.prepare`: ICD and
            HMKD fit their matching decoder, or load the cached fit); None: no preparation here.
        ctx: the process group: the main process fits the decoder first, the others load it.
        progress: show the decoder fit's progress bar.
    """
    method = method or cfg.distill.method
    options = cfg.distill.options if options is None else options
    distils = needs_teacher(method)
    main = ctx is None or ctx.is_main
    student = build_model(cfg.model, num_classes)
    teacher = build_model(cfg.teacher, num_classes, load=load_teacher) if distils or init != "none" else None
    if init != "none":
        report = weights_io.init_from_teacher(student, teacher, init)
        if main:
            logger.info("distill.init_student %s: %s", init, report.summary())
    if not distils:
        teacher = None  # only needed for the copy
    distiller = build_distiller(method, student=student, teacher=teacher, options=options)
    clip_grad = distiller.main_clip(cfg.train.clip_grad)
    if clip_grad != cfg.train.clip_grad and main:
        logger.info("method %r clips the main parameters' gradients at %s (not train.clip_grad %s)",
                    method, clip_grad, cfg.train.clip_grad)
    distiller.set_teacher_dtype(cfg.distill.teacher_dtype)
    distiller.to(device)
    if train_set is not None:
        # the method's one-off work (ICD, HMKD: the decoder fitted on the teacher alone, or the cached
        # fit): the main process does it first, the others then find its file in the cache
        def prepare() -> None:
            distiller.prepare(cfg, train_set, device, progress=progress)

        if ctx is None:
            prepare()
        else:
            du.main_first(ctx, prepare)
    distiller.train()
    main_params = distiller.student_parameters() + distiller.distiller_parameters()
    extras = list(distiller.extra_optimizers())
    extra: dict[int, nn.Parameter] = {}
    for m in distiller.extra_modules().values():
        extra.update((id(p), p) for p in m.parameters() if p.requires_grad)
    for _, opt, _ in extras:
        extra.update((id(p), p) for p in optimizer_params(opt))
    main_ids = {id(p) for p in main_params}
    extra_params = [p for k, p in extra.items() if k not in main_ids]
    optimizer = build_optimizer(cfg.train, main_params)
    return RunParts(
        student=student, distiller=distiller, clip_grad=clip_grad, main_params=main_params,
        sync_params=distiller.distiller_parameters() + extra_params,
        optimizer=optimizer, scheduler=build_scheduler(cfg.train, optimizer), extra_optimizers=extras,
        # the method's own optimisers' schedules over the run (e.g. ICD's cosine decoder lr)
        extra_schedulers=list(distiller.extra_schedulers(cfg.train.iters)),
    )
