"""What every config key means: the one place it is written, for ``hmkd config show`` and ``docs/CONFIG.md``.

:data:`KEY_DOCS` maps each dotted key of :class:`hmkd.config.Config` to ``(allowed values, meaning)``;
:func:`render_markdown` writes ``docs/CONFIG.md`` from it and from the dataclasses' defaults (a test
checks the file is up to date and that no key is undocumented); :func:`show` prints a resolved
config with every key, its value, its default and its allowed values. A key whose field declares
what it accepts (:func:`hmkd.allowed.allowed`) has its allowed values written from that declaration,
the one the config's checks use, so the docs cannot drift from the checks (its ``KEY_DOCS`` entry
leaves them empty). The options of each ``distill.method`` (``distill.options.*``) are listed from
the method's own options dataclass with their defaults and declared ranges; their meaning is in the
README's method tables.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from hmkd.allowed import Allowed, declared
from hmkd.config import Config, ModelConfig, parse_method_options, to_dict

__all__ = ["KEY_DOCS", "config_keys", "declaration", "method_option_fields", "render_markdown", "show"]

# allowed values: "" = what the field's declaration (hmkd.allowed) says, else what its type allows
KEY_DOCS: dict[str, tuple[str, str]] = {
    "name": ("", "run name; the default output folder is `runs/<name>`"),
    "seed": ("", "seed of every random stream: initialisation, data order, each sample's augmentation"),
    "device": ("", "where to run; `auto`: CUDA when available, else CPU"),
    "output_dir": ("", "where the run writes (`--output-dir` wins); null: `runs/<name>`"),
    # -- model ------------------------------------------------------------------------------------
    "model": ("", "the detector being trained (the student when distilling)"),
    "model.detector": ("", "torchvision detector on hmkd's P-named FPN backbones, or `torchvision:<builder>`: torchvision's own model (docs/TORCHVISION.md)"),
    "model.backbone": ("", "backbone body under the FPN"),
    "model.num_classes": ("", "object classes without background; null: taken from the data set"),
    "model.fpn_channels": ("", "channels of every FPN level"),
    "model.levels": ("", "FPN levels (stride 2^l); null: Faster/Mask R-CNN P2-P6, RetinaNet/FCOS P3-P7"),
    "model.norm": ("", "norm layers: `gn` trains from scratch at small batch, `frozen_bn` is torchvision's pretrained setting"),
    "model.min_size": ("", "the detector's resize of the shorter side; a list is multi-scale training (one drawn per image), evaluation uses the last"),
    "model.max_size": ("", "cap on the longer side after the resize"),
    "model.anchor_scale": ("", "anchor size / stride; null: the detector's default (8 R-CNN, 4 RetinaNet, 1 FCOS)"),
    "model.head_convs": ("", "conv layers of the FCOS head (RetinaNet's is fixed at 4)"),
    "model.rpn_pre_nms_top_n_train": ("", "Faster/Mask R-CNN: proposals per level before NMS, training"),
    "model.rpn_pre_nms_top_n_test": ("", "Faster/Mask R-CNN: proposals per level before NMS, evaluation"),
    "model.rpn_post_nms_top_n_train": ("", "Faster/Mask R-CNN: proposals kept after NMS, training"),
    "model.rpn_post_nms_top_n_test": ("", "Faster/Mask R-CNN: proposals kept after NMS, evaluation"),
    "model.box_batch_size_per_image": ("", "Faster/Mask R-CNN: RoIs sampled per image for the box head"),
    "model.score_thresh": ("", "detections below this score are dropped at inference"),
    "model.nms_thresh": ("", "NMS IoU at inference; null: the detector's default (0.5; FCOS 0.6)"),
    "model.detections_per_img": ("", "detections kept per image (COCO scores at most 100)"),
    "model.topk_candidates": ("", "RetinaNet/FCOS: candidates per level before NMS"),
    "model.weights": ("", "a checkpoint of the whole detector to start from (a file path; nothing is downloaded)"),
    "model.backbone_weights": ("file | pretrain", "weights for the backbone body only (e.g. ImageNet-trained), loaded before `weights`; `pretrain`: the stand-in pretrained on another synthetic task by the `pretrain` section, made once and cached"),
    "model.norm_eps": ("", "eps of the backbone body's batch norms (`bn` / `frozen_bn`); null: the layer's own (torchvision's v1 ResNet-50 COCO checkpoints need 0.0)"),
    "model.trainable_backbone_layers": ("", "null: every layer trains; k: all but the body's last k stages frozen (torchvision's rule)"),
    "model.weights_skip_classes": ("", "`weights` may come from another class set: every tensor but the class-dependent layers is loaded, those are named in one warning"),
    "teacher": (
        "null or a model section",
        "the frozen teacher (distillation, `distill.init_student`): the same keys as `model`, each one it "
        "does not set inherited from `model` (never `weights`/`backbone_weights`); `teacher.weights` is required",
    ),
    # -- data -------------------------------------------------------------------------------------
    "data": ("", "where the data is and how it is batched"),
    "data.kind": ("", "data set format (`hmkd list datasets`)"),
    "data.root": ("", "coco: the folder the paths below are relative to; visdrone: the folder with images/ and annotations/; synthetic: where the set is generated"),
    "data.train_images": ("", "coco: training image folder (null: `root`)"),
    "data.train_ann": ("", "coco: training COCO JSON (required for coco)"),
    "data.val_images": ("", "coco: validation image folder (null: `root`)"),
    "data.val_ann": ("", "coco: validation COCO JSON (required for coco)"),
    "data.batch_size": ("", "training images per iteration and process"),
    "data.eval_batch_size": ("", "evaluation images per batch"),
    "data.workers": ("", "DataLoader worker processes (0: load in the main process); does not change the data"),
    "data.hflip": ("", "random horizontal flip in training (boxes and masks follow)"),
    "data.with_masks": ("", "instance masks in the training targets (always on for Mask R-CNN)"),
    "data.label_map": ("", "labels the detector sees: 1..K in sorted category-id order, or the data set's category ids (torchvision's COCO checkpoints: 91 outputs)"),
    "data.check_images": ("", "before iteration 1, read every image's header (size, format; in parallel, nothing decoded): a missing, unreadable or mis-sized image stops the run naming it; false: the annotations only (the data summary and the no-box check stay)"),
    "data.synth": ("", "the synthetic generator's parameters (`data.kind: synthetic`)"),
    "data.synth.n_train": ("", "training images"),
    "data.synth.n_val": ("", "validation images"),
    "data.synth.size": ("", "image size in pixels: an int (a square's side) or [height, width]"),
    "data.synth.seed": ("", "generator seed (the same seed gives the same files)"),
    "data.synth.preset": ("", "`default`: ~19 objects of 6 classes, ~81% small; `aitod`: 10-40 objects whose sizes span AI-TOD's buckets (the paper-regime benchmark); `pretrain`: six other classes (the pretrained stand-in); `hard`: ~44 objects, 8 classes, ~97% small; `paper_size`: 45 objects (~36 small of 6-31 px, ~9 of 32-160 px) for 800 x 1333 cost runs"),
    # -- train ------------------------------------------------------------------------------------
    "train": ("", "schedule, optimiser and bookkeeping"),
    "train.iters": ("", "iterations of the run"),
    "train.optimizer": ("", "the main optimiser (the student and the method's own modules)"),
    "train.lr": ("", "base learning rate (reached after the warm-up)"),
    "train.momentum": ("", "SGD momentum"),
    "train.weight_decay": ("", "weight decay"),
    "train.warmup_iters": ("", "linear warm-up iterations"),
    "train.warmup_factor": ("", "learning-rate factor at iteration 0 of the warm-up"),
    "train.schedule": ("", "learning rate after the warm-up"),
    "train.steps": ("", "step schedule: iterations where the learning rate is multiplied by `gamma`"),
    "train.gamma": ("", "step schedule's factor"),
    "train.clip_grad": ("", "clip the main parameters' global L2 gradient norm; null: no clip (a method may replace it: FGD 35)"),
    "train.amp": ("", "mixed precision on CUDA (ignored, with a warning, on CPU)"),
    "train.eval_period": ("", "evaluate every k iterations and keep the best as `model_best.pth`; 0: only at the end (no `model_best.pth`)"),
    "train.ckpt_period": ("", "write `last_checkpoint.pth` every k iterations; 0: only on SIGINT/SIGTERM and at the end"),
    "train.log_period": ("", "a console line and a `log.jsonl` record every k iterations (0: the last only)"),
    "train.tensorboard": ("", "also write TensorBoard scalars (needs the `tensorboard` package)"),
    "train.keep_last_checkpoint": ("", "keep `last_checkpoint.pth` (optimiser, schedules, random streams: ~3x the model) after a finished run, to extend it with `--resume`; false: removed once `model_final.pth` is written"),
    # -- distill ----------------------------------------------------------------------------------
    "distill": ("", "how the student is trained"),
    "distill.method": ("", "`none`: plain training (teachers, baselines); the others distil from `teacher` (`hmkd list methods`)"),
    "distill.options": ("the method's options", "the method's own options, checked when the config is read (listed below; meaning: README method tables)"),
    "distill.teacher_dtype": ("", "precision of the frozen teacher's forward (float32 exact; bf16 ~1.8x cheaper on CPUs with AVX512-BF16)"),
    "distill.init_student": ("", "copy the teacher's FPN (`neck`) and head (`neck_head`) into the student before the first step; null: the method's authors' default"),
    # -- eval -------------------------------------------------------------------------------------
    "eval": ("", "evaluation on the val split: COCO's metrics (maxDets 100) always"),
    "eval.aitod": ("", "also report AI-TOD's size buckets: AP of very tiny (< 8² px²), tiny (8²-16²), small (16²-32²) and medium (>= 32²) objects, under `aitod` in metrics.json"),
    "eval.max_dets": ("", "detections per image AI-TOD's numbers score (AI-TOD's toolkit: 1500, VisDrone's: 500); a detector emits at most `model.detections_per_img`"),
    # -- pretrain ---------------------------------------------------------------------------------
    "pretrain": ("", "the stand-in for ImageNet pretraining (`backbone_weights: pretrain`): the backbone trained once, in a detector of the run's shape, on a synthetic set of other classes; cached in `$HMKD_CACHE/backbones` by these settings"),
    "pretrain.synth": ("", "the pretraining set (the `pretrain` preset: six classes the evaluation presets do not have; its own seed)"),
    "pretrain.synth.n_train": ("", "pretraining images"),
    "pretrain.synth.n_val": ("", "images its detector is evaluated on (reported in pretrain.json)"),
    "pretrain.synth.size": ("", "image size in pixels: an int (a square's side) or [height, width]"),
    "pretrain.synth.seed": ("", "the pretraining set's generator seed"),
    "pretrain.synth.preset": ("", "the pretraining set's preset"),
    "pretrain.iters": ("", "pretraining iterations (AdamW, warm-up + cosine, flips)"),
    "pretrain.batch_size": ("", "pretraining images per iteration"),
    "pretrain.lr": ("", "pretraining learning rate"),
    "pretrain.seed": ("", "the pretraining run's seed (initialisation, data order)"),
}


def _allowed_names(builtin_only: bool = False) -> dict[str, str]:
    """The names of the registries a declaration refers to (``Allowed(registry="methods")``);
    ``builtin_only``: methods of hmkd itself (not those a plug-in or a test registered), for the docs."""
    from hmkd.distill import METHODS

    return {
        "methods": " | ".join(m for m, cls in METHODS.items() if not builtin_only or cls.__module__.startswith("hmkd.")),
    }


def _type_text(tp: Any) -> str:
    """``int | None`` -> ``integer or null``: what the annotation accepts, in words."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_text(item)}" if item is not Any else "list"
    if origin is dict:
        return "mapping"
    return {bool: "true | false", int: "integer", float: "number", str: "string", type(None): "null"}.get(
        tp, "section" if dataclasses.is_dataclass(tp) else "any"
    )


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        return to_dict(v) if dataclasses.is_dataclass(v) else v
    return None


def config_keys(cls: type = Config, prefix: str = "", defaults: dict[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """``(dotted key, annotation, default)`` of every key of ``cls``, sections before their keys
    (``teacher`` is one entry: it has the keys of ``model``). A section's keys have the defaults of
    the section's own default (``pretrain.synth`` is not ``data.synth``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        default = defaults[f.name] if defaults is not None and f.name in defaults else _default(f)
        out.append((key, tp, default))
        if dataclasses.is_dataclass(tp):
            out.extend(config_keys(tp, f"{key}.", default if isinstance(default, dict) else None))
    return out


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section annotation (``ModelConfig | None`` -> ``ModelConfig``), else None."""
    for a in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(a):
            return a
    return None


def declaration(key: str, cls: type = Config) -> Allowed | None:
    """What the field of dotted ``key`` (``model.fpn_channels``, ``teacher.norm``) declares it
    accepts (:func:`hmkd.allowed.declared`); None for a key without a declaration."""
    *sections, name = key.split(".")
    for part in sections:
        cls = _section_class(typing.get_type_hints(cls).get(part))
        if cls is None:
            return None
    return declared(cls, name)


def method_option_fields(method: str) -> list[tuple[str, Any, Any]]:
    """``(name, annotation, default)`` of every option of ``method`` (``distill.options.*``)."""
    from hmkd.distill import method_class

    opts = method_class(method).Options
    hints = typing.get_type_hints(opts)
    return [(f.name, hints[f.name], _default(f)) for f in dataclasses.fields(opts)]


def method_option_allowed(method: str) -> dict[str, str]:
    """``{option: allowed values}`` of every option of ``method``: its declaration's words
    (:meth:`hmkd.allowed.Allowed.doc_text`, the ranges its ``check()`` enforces), else its type's."""
    from hmkd.distill import method_class

    opts = method_class(method).Options
    hints = typing.get_type_hints(opts)
    out = {}
    for f in dataclasses.fields(opts):
        spec = declared(opts, f.name)
        out[f.name] = spec.doc_text(hints[f.name]) if spec is not None else _type_text(hints[f.name])
    return out


def _allowed(key: str, tp: Any, names: dict[str, str]) -> str:
    """The allowed values of ``key``: its declaration's (a registry's names where it names one),
    else KEY_DOCS's words, else its type's."""
    spec = declaration(key)
    if spec is not None:
        return names[spec.registry] if spec.registry is not None else spec.doc_text(tp)
    allowed = KEY_DOCS.get(key, ("", ""))[0]
    return allowed.format(**names) if allowed else _type_text(tp)


def _fmt(value: Any) -> str:
    """A value as YAML writes it on one line (``[P3, P4]``, ``null``, ``0.001``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# -- docs/CONFIG.md -------------------------------------------------------------------------------
def render_markdown() -> str:
    """The text of ``docs/CONFIG.md``: every key with its default, allowed values and meaning."""
    from hmkd.distill import METHODS

    names = _allowed_names(builtin_only=True)
    lines = [
        "# Config keys",
        "",
        "<!-- generated by hmkd.config_docs.render_markdown(); tests/cli/test_config_docs.py checks it is current -->",
        "",
        "One YAML file describes a run (`configs/`): `_base_: other.yaml` inherits (relative to the file),",
        "`key=value` on the command line overrides (values are read as YAML: `model.levels=[P3,P4]`), and the",
        "resolved config is saved as `config.yaml` beside the outputs and inside every checkpoint.",
        "`hmkd config show CONFIG [key=value ...]` prints a resolved config with every key, its default and",
        "its allowed values. An unknown key is an error naming where it came from and the nearest valid key",
        "(`command line: unknown key 'train.lrr' (did you mean 'train.lr'?)`). Every number and name is checked",
        "against the allowed values below when the config is read, before anything is built; a value outside",
        "them is one line naming its source, the key and the range",
        "(`command line: model.fpn_channels must be >= 1, got 0`). A `teacher` key has the range of the",
        "`model` key of the same name.",
        "",
    ]
    section = None
    for key, tp, default in config_keys():
        top = key.split(".")[0]
        if "." not in key and dataclasses.is_dataclass(tp) or key == "teacher":
            section = top
            lines += ["", f"## `{key}`", "", KEY_DOCS[key][1][0].upper() + KEY_DOCS[key][1][1:] + ".", "",
                      "| key | default | allowed | meaning |", "|---|---|---|---|"]
            if key == "teacher":
                lines.append(f"| `teacher` | `null` | {_cell(_allowed(key, tp, names))} | see above |")
            continue
        if dataclasses.is_dataclass(tp):  # a sub-section (data.synth): one row, its keys follow
            lines.append(f"| `{key}` | | section | {_cell(KEY_DOCS[key][1])} |")
            continue
        if section is None:
            section = ""
            lines += ["## Top level", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        default_text = "{}" if key == "distill.options" else _fmt(default)
        lines.append(f"| `{key}` | `{default_text}` | {_cell(_allowed(key, tp, names))} | {_cell(KEY_DOCS[key][1])} |")
    lines += [
        "",
        "## `distill.options` of each method",
        "",
        "Checked against `distill.method` when the config is read (unknown names with the nearest valid one,",
        "types, the allowed values below, and relations such as `hidden` divisible by `heads`). What each",
        "option does: the README's tables (\"HMKD: the reading we implement\", \"Baselines\", \"ICD: what its",
        "defaults come from\"). `null` defaults are resolved by the method from the detector (e.g. FGD's",
        "weights per detector family).",
    ]
    for method, cls in METHODS.items():
        if not cls.__module__.startswith("hmkd."):
            continue  # registered by someone else's code (a plug-in, a test): not ours to document
        fields = method_option_fields(method)
        lines += ["", f"### `{method}`", ""]
        if not fields:
            lines.append("No options.")
            continue
        allowed = method_option_allowed(method)
        lines += ["| option | default | allowed |", "|---|---|---|"]
        lines += [f"| `{n}` | `{_fmt(d)}` | {_cell(allowed[n])} |" for n, tp, d in fields]
    return "\n".join(lines) + "\n"


# -- hmkd config show ---------------------------------------------------------------------------
def show(cfg: Config, source: str | None = None) -> str:
    """``cfg`` as YAML, every key followed by a comment with its default (or ``default`` when it
    has the default value) and its allowed values; ``distill.options`` in full (the method's
    defaults filled in). The text loads back as the same config."""
    from hmkd.distill import METHODS

    names = _allowed_names()
    values = to_dict(cfg)
    rows: list[tuple[str, str]] = []  # (yaml text, comment)

    def emit(cls: type, data: dict[str, Any], prefix: str, indent: str, defaults: dict[str, Any] | None = None,
             doc_prefix: str | None = None) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp, value = f"{prefix}{f.name}", hints[f.name], data.get(f.name)
            doc_key = f"{doc_prefix}{f.name}" if doc_prefix is not None else key
            default = defaults.get(f.name, _default(f)) if defaults is not None else _default(f)
            if key == "teacher" and value is not None:
                rows.append((f"{indent}teacher:", "inherits every model key it does not set (never the weights)"))
                model_defaults = {k: v for k, v in values["model"].items() if k not in ("weights", "backbone_weights")}
                emit(ModelConfig, value, "teacher.", indent + "  ", model_defaults, doc_prefix="model.")
                continue
            if dataclasses.is_dataclass(tp):
                rows.append((f"{indent}{f.name}:", ""))
                emit(tp, value or {}, f"{key}.", indent + "  ", default if isinstance(default, dict) else None)
                continue
            if key == "distill.options":
                emit_options(value or {}, indent)
                continue
            allowed = _allowed(doc_key, tp, names)
            state = "default" if value == default else f"default {_fmt(default)}"
            rows.append((f"{indent}{f.name}: {_fmt(value)}", f"{state}; {allowed}"))

    def emit_options(options: dict[str, Any], indent: str) -> None:
        method = values["distill"]["method"]
        if method not in METHODS:
            rows.append((f"{indent}options: {_fmt(options)}", f"method {method!r} is not registered"))
            return
        fields = method_option_fields(method)
        if not fields:
            rows.append((f"{indent}options: {{}}", f"method {method!r} has no options"))
            return
        rows.append((f"{indent}options:", f"the options of {method!r}"))
        options = dataclasses.asdict(parse_method_options(method, options, check=False))
        allowed = method_option_allowed(method)
        for n, tp, d in fields:
            v = options.get(n, d)
            state = "default" if v == d else f"default {_fmt(d)}"
            rows.append((f"{indent}  {n}: {_fmt(v)}", f"{state}; {allowed[n]}"))

    emit(Config, values, "", "")
    width = min(max(len(t) for t, _ in rows), 48)
    head = f"# {source}: " if source else "# "
    out = [head + "the resolved config; after each key its default and allowed values (docs/CONFIG.md)"]
    out += [f"{t:<{width}}  # {c}" if c else t for t, c in rows]
    return "\n".join(out) + "\n"
