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


def read_torch_file(path: str | os.PathLike, *, kind: str = "weights", map_location: Any = "cpu",
                    mmap: bool = False) -> Any:
    """What the torch file ``path`` holds: the one reader of every weights file and checkpoint hmkd opens.

    ``kind`` names the file in the errors (``weights`` or ``checkpoint``): a missing file is ``PATH:
    weights file not found``, an unreadable one (truncated, not a torch file, pickle errors) ``PATH: not
    a readable torch checkpoint (...)`` (``checkpoint``: ``... not a readable checkpoint``), one line each.
    ``mmap``: memory-map the tensors where the file allows it (zip format), else read it plainly.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {kind} file not found")
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        except Exception:  # noqa: BLE001 - not a zip-format file (mmap needs one), or unreadable: the plain way says which
            pass
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated, not a torch file, pickle errors ...
        msg = " ".join(str(e).split())[:200]
        what = "torch checkpoint" if kind == "weights" else kind
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {msg})") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model state dict inside ``path`` (an hmkd checkpoint's ``model`` entry, or a bare state dict)."""
    obj = read_torch_file(path)
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


#: State-dict key endings of the layers whose shape depends on the class count (torchvision's
#: detectors, ours and theirs): the R-CNN box predictor and mask logits, the one-stage classifiers.
CLASS_DEPENDENT = (
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
    "head.classification_head.cls_logits.weight",
    "head.classification_head.cls_logits.bias",
)


def is_class_dependent(key: str) -> bool:
    """Whether state-dict ``key`` belongs to a layer whose shape depends on the class count."""
    return key.endswith(CLASS_DEPENDENT)


def _file_classes(sd: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """The class count (with background) of a state dict's classifier, read with the model's anchors."""
    w = sd.get("roi_heads.box_predictor.cls_score.weight")
    if w is not None:
        return int(w.shape[0])
    w = sd.get("head.classification_head.cls_logits.weight")
    head = getattr(getattr(model, "head", None), "classification_head", None)
    anchors = getattr(head, "num_anchors", None)
    if w is not None and anchors:
        return int(w.shape[0]) // int(anchors)
    return None


def upgrade_legacy_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Rename old-format keys of ``sd`` in place the way torchvision does on load, by calling the
    ``_load_from_state_dict`` of every module that overrides it and holds no tensors of its own
    (torchvision's FPN, RPN head, Mask R-CNN and RetinaNet heads: e.g. ``rpn.head.conv.weight`` ->
    ``rpn.head.conv.0.0.weight`` in the 2019 COCO checkpoints). Those calls only rename keys."""
    for name, module in model.named_modules():
        if type(module)._load_from_state_dict is nn.Module._load_from_state_dict:
            continue
        if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None:
            continue
        module._load_from_state_dict(sd, f"{name}." if name else "", {}, True, [], [], [])


def load_weights(
    model: nn.Module, path: str, *, prefix: str = "", strict: bool = True, skip_classes: bool = False
) -> list[str]:
    """Load ``path`` into ``model`` (or its sub-module at ``prefix``), naming the keys that differ.

    A mismatch (another architecture, another class count) raises :class:`CheckpointError` with the
    missing, unexpected and wrongly-shaped keys. ``strict=False`` ignores unexpected keys only
    (e.g. the ``fc`` layer of an ImageNet classifier loaded into a backbone body). Batch-norm
    ``num_batches_tracked`` counters may be present or absent on either side (torchvision's
    FrozenBatchNorm2d drops them), and torchvision's old key names are renamed as torchvision does
    (:func:`upgrade_legacy_keys`).

    ``skip_classes=True`` loads a file trained on another class set: the class-dependent layers
    (:data:`CLASS_DEPENDENT`) whose shapes differ are left as they are and named in one warning;
    any other difference is still an error.

    Returns:
        The keys that were skipped (empty unless ``skip_classes``).
    """
    target = model.get_submodule(prefix) if prefix else model
    sd = read_state_dict(path)
    upgrade_legacy_keys(target, sd)
    own = target.state_dict()
    counter = ".num_batches_tracked"
    missing = [k for k in own if k not in sd and not k.endswith(counter)]
    unexpected = [k for k in sd if k not in own and not k.endswith(counter)]
    shaped = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    skipped = [k for k in shaped if skip_classes and is_class_dependent(k)]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shaped if k not in skipped]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_fmt(shapes, 3)}")
    if problems:
        where = f" into {prefix}" if prefix else ""
        hint = ""
        if shaped and not missing and not (unexpected and strict) and all(is_class_dependent(k) for k in shaped):
            n_file = _file_classes(sd, target)
            tell = f"the file has {n_file - 1} classes + background: set num_classes: {n_file - 1}, or " if n_file else ""
            hint = f" ({tell}weights_skip_classes: true to load all but the class-dependent layers)"
        raise CheckpointError(f"{path}: does not fit {type(target).__name__}{where}; " + "; ".join(problems) + hint)
    load = {k: v for k, v in sd.items() if k in own and k not in skipped}
    target.load_state_dict(load, strict=False)
    if skipped:
        n_file, n_own = _file_classes(sd, target), _file_classes(own, target)
        counts = f" ({n_file} outputs in the file, {n_own} here)" if n_file and n_own else ""
        logger.warning(
            "%s: another class set%s: loaded all but %d class-dependent tensors, which start fresh: %s",
            path, counts, len(skipped), ", ".join(skipped),
        )
    return skipped


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
