"""Loading weights from local files only: torchvision-format state dicts or hmkd checkpoints; and
initialising a student from its teacher's FPN and heads (:func:`init_from_teacher`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hmkd.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model state dict inside ``path`` (an hmkd checkpoint's ``model`` entry, or a bare state dict)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected a dict of tensors or an hmkd checkpoint)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _fmt(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: nn.Module, path: str, *, prefix: str = "", strict: bool = True) -> None:
    """Load ``path`` into ``model`` (or its sub-module at ``prefix``), naming the keys that differ.

    A mismatch (another architecture, another class count) raises :class:`CheckpointError` with the
    missing, unexpected and wrongly-shaped keys. ``strict=False`` ignores unexpected keys only
    (e.g. the ``fc`` layer of an ImageNet classifier loaded into a backbone body).
    """
    target = model.get_submodule(prefix) if prefix else model
    sd = read_state_dict(path)
    own = target.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_fmt(shapes, 3)}")
    if problems:
        where = f" into {prefix}" if prefix else ""
        raise CheckpointError(f"{path}: does not fit {type(target).__name__}{where}; " + "; ".join(problems))
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)


# -- the student initialised from the teacher (FGD's init_student, ICD's PRELOAD_FPN/HEAD) ------------
#: What ``distill.init_student`` may copy from the teacher into the student.
INIT_PARTS = ("none", "neck", "neck_head")


@dataclass
class InitReport:
    """What :func:`init_from_teacher` did.

    Attributes:
        parts: ``none`` | ``neck`` | ``neck_head``.
        copied: the student's state-dict keys that now hold the teacher's tensors.
        skipped: ``(key, why)`` for the keys of the copied parts that were left as they were
            (the shapes differ, or the teacher has no such key).
    """

    parts: str
    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was copied and what was skipped."""
        if self.parts == "none":
            return "nothing copied (init_student: none)"
        line = f"copied {len(self.copied)} tensors of the teacher's {_PART_WORDS[self.parts]} into the student"
        if self.skipped:
            line += f"; skipped {len(self.skipped)}: {_fmt([f'{k} ({why})' for k, why in self.skipped], 3)}"
        return line


_PART_WORDS = {"none": "nothing", "neck": "FPN", "neck_head": "FPN and detection head"}


def _family(model: nn.Module) -> str:
    return type(getattr(model, "module", model)).__name__


def _in_parts(key: str, parts: str) -> bool:
    """Whether state-dict ``key`` of a torchvision FPN detector belongs to ``parts``: the FPN is
    ``backbone.fpn.*`` (lateral and output convs and the P6/P7 extra block); the head is every key
    outside ``backbone.*`` (FCOS/RetinaNet ``head.*``, Faster/Mask R-CNN ``rpn.*`` and ``roi_heads.*``)."""
    if key.startswith("backbone.fpn."):
        return True
    return parts == "neck_head" and not key.startswith("backbone.") and not key.startswith("transform.")


def init_from_teacher(student: nn.Module, teacher: nn.Module, parts: str = "neck_head") -> InitReport:
    """Copy the teacher's FPN (``parts="neck"``) and also its detection head (``"neck_head"``) into
    the student, tensor by tensor where the shapes match; the backbone body is never copied.

    This is FGD's ``init_student`` and ICD's ``PRELOAD_FPN`` + ``PRELOAD_HEAD``: the student keeps
    its own (e.g. ImageNet) backbone body and starts from the teacher's neck and head. Tensors whose
    shapes differ (the FPN's lateral 1x1 convs of a ResNet-50 teacher against a ResNet-18 student,
    another class count) or that the teacher lacks are skipped and named in one warning.

    Args:
        student: the detector to initialise (changed in place).
        teacher: a detector of the same family (class), e.g. the trained teacher.
        parts: ``none`` (nothing), ``neck`` or ``neck_head``.

    Returns:
        An :class:`InitReport` (``summary()`` gives one line for a log).

    Raises:
        ConfigError: ``parts`` unknown, the two detectors of different families, or nothing at all
            could be copied (one line each).
    """
    if parts not in INIT_PARTS:
        raise ConfigError(f"distill.init_student must be one of {', '.join(INIT_PARTS)}, got {parts!r}")
    report = InitReport(parts)
    if parts == "none":
        return report
    fs, ft = _family(student), _family(teacher)
    if fs != ft:
        raise ConfigError(
            f"distill.init_student: {parts} needs a teacher of the student's family, "
            f"got a {ft} teacher and a {fs} student (distill.init_student: none starts the student as it is)"
        )
    s_inner, t_inner = getattr(student, "module", student), getattr(teacher, "module", teacher)
    own = s_inner.state_dict()
    theirs = t_inner.state_dict()
    copy: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        if not _in_parts(key, parts):
            continue
        src = theirs.get(key)
        if src is None:
            report.skipped.append((key, "not in the teacher"))
        elif src.shape != value.shape:
            report.skipped.append((key, f"{tuple(src.shape)} vs {tuple(value.shape)}"))
        else:
            copy[key] = src
    if not copy:
        raise ConfigError(
            f"distill.init_student: nothing of the teacher's {_PART_WORDS[parts]} fits the {fs} student "
            f"({len(report.skipped)} tensors differ in shape or are missing; distill.init_student: none starts "
            "the student as it is)"
        )
    s_inner.load_state_dict(copy, strict=False)
    report.copied = list(copy)
    if report.skipped:
        logger.warning(
            "init_student %s: %d tensors skipped (shape differs or not in the teacher): %s",
            parts, len(report.skipped), _fmt([f"{k} {why}" for k, why in report.skipped], 3),
        )
    return report
