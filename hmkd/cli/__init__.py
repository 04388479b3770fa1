"""The ``hmkd`` command line. Every sub-command is a thin layer over a library function.

Errors of the project's own type (:class:`hmkd.errors.HMKDError`) print as one line
``hmkd: error: <message>`` and exit with status 2; nothing partial is left behind as if complete.
Log lines carry their level (``WARNING`` ones in colour on a terminal); Python warnings go
through the same log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from hmkd.config import SynthConfig
from hmkd.errors import ConfigError, HMKDError

logger = logging.getLogger("hmkd")


def _load_cfg(args: argparse.Namespace, *, need_classes: bool = False):
    """The config of a command; with ``need_classes``, ``model.num_classes`` (and the teacher's)
    filled from the data set when the config leaves it unset."""
    from hmkd.config import load_config

    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    if need_classes and cfg.model.num_classes is None:
        try:
            from hmkd.data import build_data

            n = build_data(cfg, train=False).num_classes
        except HMKDError:
            n = None  # no data set at hand: the weights files may still tell
        cfg.model.num_classes = n
        if cfg.teacher is not None and cfg.teacher.num_classes is None:
            cfg.teacher.num_classes = n
    return cfg


# -- list ---------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "detectors":
        from hmkd.models import DETECTORS, TORCHVISION_DESCRIPTIONS

        table = {**DETECTORS, **TORCHVISION_DESCRIPTIONS}
    elif args.what == "backbones":
        from hmkd.models import BACKBONES as table
    elif args.what == "methods":
        from hmkd.distill import DESCRIPTIONS as table
    else:
        from hmkd.data import DATASETS as table
    width = max(len(k) for k in table)
    for k, v in table.items():
        print(f"{k:<{width}}  {v}")
    return 0


# -- data ---------------------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    from hmkd.data.synthetic import generate_synthetic

    info = generate_synthetic(
        args.out, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed, preset=args.preset
    )
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_data_visdrone(args: argparse.Namespace) -> int:
    from hmkd.data.visdrone import convert_visdrone

    stats = convert_visdrone(args.src, args.out)
    print(json.dumps(stats, indent=2, default=str))
    return 0


# -- train / distill / eval ---------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from hmkd.engine.logging_utils import format_summary
    from hmkd.training import train

    cfg = _load_cfg(args)
    if args.cmd == "distill" and cfg.distill.method == "none":
        raise ConfigError(f"{args.config}: distill.method is 'none'; use 'hmkd train' or set distill.method")
    if args.cmd == "train" and cfg.distill.method != "none":
        logger.warning(
            "%s sets distill.method %r: this run distils from teacher.weights (%s), as 'hmkd distill' would; "
            "add distill.method=none to train the detector alone", args.config, cfg.distill.method,
            getattr(cfg.teacher, "weights", None),
        )
    metrics = train(cfg, output_dir=args.output_dir, resume=args.resume, progress=not args.no_progress)
    print(format_summary(metrics))
    return 0


# -- config -------------------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    from hmkd.config_docs import show

    print(show(_load_cfg(args), args.config), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hmkd.engine.evaluation import evaluate
    from hmkd.models.checkpoint_info import config_from_checkpoint

    _config_or_override(args)
    cfg = _load_cfg(args) if args.config else config_from_checkpoint(args.weights, args.overrides)
    metrics = evaluate(cfg, weights=args.weights, out_dir=args.out, progress=not args.no_progress)
    print(json.dumps({k: {m: v for m, v in d.items() if m != "per_class"} for k, d in metrics.items()}, indent=2))
    return 0


def cmd_fit_decoder(args: argparse.Namespace) -> int:
    from hmkd.distill.matching.report import fit_decoder_report

    cfg = _load_cfg(args)
    report = fit_decoder_report(cfg, out=args.out, quality_images=args.quality_images, progress=not args.no_progress)
    print(report["markdown"])
    print(f"fitted decoder: {report['decoder']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from hmkd.config import PRETRAIN_BACKBONE
    from hmkd.training import ensure_pretrained

    cfg = _load_cfg(args)
    sections = [("model", cfg.model), ("teacher", cfg.teacher)]
    wanted = [(name, m) for name, m in sections if m is not None and (args.all or m.backbone_weights == PRETRAIN_BACKBONE)]
    if not wanted:
        raise ConfigError(f"{args.config}: no model or teacher section sets backbone_weights: {PRETRAIN_BACKBONE} "
                          "(--all pretrains every section's backbone)")
    for name, m in wanted:
        print(f"{name} ({m.backbone}): {ensure_pretrained(cfg, m, progress=not args.no_progress)}")
    return 0


# -- demo ---------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from hmkd.demo import machine_line, run_demo

    results = run_demo(out_dir=args.out, quick=args.quick, progress=not args.no_progress)
    print(results["table"])
    print(results["verdict"])
    print(machine_line(results["machine"]))
    print("what each student finds (ground truth; no-KD; HMKD: green found, red missed, yellow found by HMKD only):",
          *results["pictures"], sep="\n  ")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items() if k != "total")
    print(f"wall time {results['seconds']['total'] / 60:.1f} min ({stages}); everything in {args.out}")
    return 0


# -- bench / viz / export -----------------------------------------------------------------------
OVERRIDE_PLACE = ("the words after --weights or --images up to the next option are its values: "
                  "give key=value overrides before --weights, or after a one-value option such as --out DIR")


def _named_weights(items: Sequence[str] | None) -> list[tuple[str, str]]:
    """``--weights`` values as ``[(name, checkpoint file)]``, in the order given.

    ``NAME=CKPT`` keeps its name; a bare ``CKPT`` (also one whose path holds a ``=``) is named
    after its file (``t.pth`` -> ``t``), or after its folder where two files share a name
    (``runs/student/model_final.pth`` -> ``student``), then numbered. Every checkpoint must be an
    existing file: a missing one is a one-line :class:`ConfigError` naming it, which says where
    ``key=value`` overrides go when the word has a ``=`` (one typed among the checkpoints).
    """
    pairs: list[tuple[str | None, str, str]] = []  # (given name or None, path, word)
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or os.path.isfile(item):
            name, path = "", item
        if not path:
            raise ConfigError(f"--weights {item}: no checkpoint file after the '='")
        if not os.path.isfile(path):
            hint = f" ({OVERRIDE_PLACE})" if sep and not os.path.isfile(item) else ""
            raise ConfigError(f"--weights {item}: checkpoint file not found: {path}{hint}")
        pairs.append((name or None, path, item))
    given = [n for n, _, _ in pairs if n is not None]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ConfigError(f"--weights: the name {twice[0]!r} is given to two checkpoints; name each one differently")
    stems = [os.path.splitext(os.path.basename(p))[0] for n, p, _ in pairs if n is None]
    taken = set(given)
    out = []
    for name, path, _ in pairs:
        if name is None:
            stem = os.path.splitext(os.path.basename(path))[0] or "model"
            folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
            name = stem if stems.count(stem) == 1 and stem not in taken else folder or stem
            base, k = name, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out.append((name, path))
    return out


def _check_image_words(values: Sequence[str]) -> None:
    """``--images`` takes the words up to the next option: a ``key=value`` word among them that is
    no file is an override typed in the wrong place (one line saying where overrides go)."""
    for v in values:
        if "=" in v and not os.path.isfile(v):
            raise ConfigError(f"--images {v}: image file not found ({OVERRIDE_PLACE})")


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from hmkd.bench.speed import models_from_config, speed_report

    cfg = _load_cfg(args, need_classes=True)
    res = speed_report(
        models_from_config(cfg, _named_weights(args.weights)),
        out_dir=args.out,
        input_size=(args.size, args.size),
        device=args.device,
        warmup=args.warmup,
        iters=args.iters,
        onnx=args.onnx,
        num_classes=cfg.model.num_classes,
    )
    print(open(os.path.join(args.out, "speed.md")).read() if os.path.isfile(os.path.join(args.out, "speed.md")) else res)
    return 0


def cmd_bench_evalspeed(args: argparse.Namespace) -> int:
    from hmkd.bench.evalspeed import run_evalspeed

    if args.images < 1 or args.dets < 1 or args.repeats < 1:
        raise ConfigError(f"--images, --dets and --repeats must be >= 1, got {args.images}, {args.dets}, {args.repeats}")
    res = run_evalspeed(args.out, n_images=args.images, dets_per_image=args.dets, seed=args.seed, repeats=args.repeats)
    print(res["table"])
    return 0


def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from hmkd.bench.accuracy import run_accuracy_bench

    cfg = _load_cfg(args)
    res = run_accuracy_bench(
        cfg,
        methods=args.methods,
        seeds=args.seeds,
        out_dir=args.out,
        teacher=args.teacher,
        ablation=args.ablation,
        progress=not args.no_progress,
    )
    print(res["table"])
    return 0


def cmd_bench_cost(args: argparse.Namespace) -> int:
    from hmkd.bench.cost import run_cost_bench

    cfg = _load_cfg(args)
    res = run_cost_bench(cfg, methods=args.methods, out_dir=args.out, iters=args.iters, warmup=args.warmup,
                         profile_steps=args.profile_steps)
    print(res["table"])
    return 0


def _config_or_override(args: argparse.Namespace) -> None:
    """eval / viz / export take the config file optionally: with none given, argparse hands the
    first ``key=value`` override to ``config``; move it back."""
    c = args.config
    if c is not None and "=" in c and not os.path.isfile(c):
        args.overrides = [c, *(args.overrides or [])]
        args.config = None


def cmd_viz_detections(args: argparse.Namespace) -> int:
    from hmkd.engine.inputs import model_inputs, resolve_image_args
    from hmkd.viz.detections import draw_detections, ground_truth_of

    _config_or_override(args)
    _check_image_words(args.images)
    if args.show == "found" and args.no_gt:
        raise ConfigError("--show found marks the ground-truth objects as found or missed: leave out --no-gt")
    weights = _named_weights(args.weights)
    inp = model_inputs(args.config, args.overrides, weights)
    if args.show == "found" and inp.dataset is None:
        raise ConfigError("--show found: no data set at hand to take the images' ground truth from "
                          "(give a config, or checkpoints whose data set is on disk)")
    images = resolve_image_args(args.images, inp.dataset)
    truth = ground_truth_of(inp.dataset, images) if inp.dataset is not None and not args.no_gt else None
    paths = draw_detections(
        inp.specs, images, args.out, score_thresh=args.score_thresh, device=args.device, num_classes=inp.num_classes,
        class_names=inp.label_map.names if inp.label_map else None, ground_truth=truth, upscale=args.upscale,
        show=args.show, text_px=args.font_size,
    )
    print("\n".join(paths))
    return 0


def cmd_viz_heatmap(args: argparse.Namespace) -> int:
    from hmkd.engine.inputs import model_inputs, resolve_image_args
    from hmkd.viz.heatmap import gradcam_heatmaps

    _config_or_override(args)
    _check_image_words(args.images)
    need_data = not all(os.path.isfile(v) for v in args.images)  # indices or names of validation images
    inp = model_inputs(args.config, args.overrides, _named_weights(args.weights), need_data=need_data)
    paths = gradcam_heatmaps(
        inp.specs, resolve_image_args(args.images, inp.dataset), args.level, args.out,
        target=args.target, topk=args.topk, device=args.device, num_classes=inp.num_classes, normalize=args.scale,
        method=args.method,
    )
    print("\n".join(paths))
    return 0


def cmd_viz_attention(args: argparse.Namespace) -> int:
    from hmkd.viz.attention import viz_attention

    cfg = _load_cfg(args)
    res = viz_attention(
        cfg, decoder=args.decoder, weights=args.weights, images=args.images, out_dir=args.out,
        objects=args.objects, levels=args.levels, device=args.device, dpi=args.dpi,
    )
    print("\n".join(res["paths"]))
    return 0


def _export_size(text: str | None, model_cfg) -> tuple[int, int]:
    """``--size S`` or ``HxW``; default the square the detector evaluates at (``model.min_size``,
    its last entry when a list, capped by ``model.max_size``)."""
    if text is None:
        ms = model_cfg.min_size[-1] if isinstance(model_cfg.min_size, list) else model_cfg.min_size
        s = int(min(ms, model_cfg.max_size))
        return s, s
    parts = text.lower().split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) not in (1, 2):
        raise ConfigError(f"--size {text!r}: give S or HxW in pixels, e.g. 640 or 480x640")
    return (hw[0], hw[0]) if len(hw) == 1 else (hw[0], hw[1])


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from hmkd.engine.inputs import model_inputs
    from hmkd.export.onnx import check_onnx, export_onnx, resized_size
    from hmkd.engine.inputs import as_model, load_image

    _config_or_override(args)
    inp = model_inputs(args.config, args.overrides, [("model", args.weights)])
    mcfg = inp.specs[0][1][0]
    model = as_model(inp.specs[0][1], num_classes=inp.num_classes)
    size = _export_size(args.size, mcfg)
    path = export_onnx(model, args.out, input_size=size, opset=args.opset, label_map=inp.label_map,
                       metadata={"architecture": f"{mcfg.detector}/{mcfg.backbone}", "weights": os.path.basename(args.weights)})
    if args.check_images:
        images = [load_image(p, size) for p in args.check_images]
    else:
        g = torch.Generator().manual_seed(0)
        images = [torch.rand(3, *size, generator=g) for _ in range(2)]
    report = check_onnx(model, path, images, score_thresh=mcfg.score_thresh)
    summary = {
        "onnx": path,
        "ok": report["ok"],
        "input": f"image float32 [3, {size[0]}, {size[1]}], RGB in [0, 1], batch 1",
        "resized_inside_to": "{}x{}".format(*resized_size(model, size)),
        "max_abs_diff_boxes": report["max_abs_diff_boxes"],
        "max_abs_diff_scores": report["max_abs_diff_scores"],
        "label_map": {k: f"{v['name']} (category {v['category_id']})" for k, v in inp.label_map.by_label().items()}
        if inp.label_map else None,
        "label_map_from": inp.label_map_source,
    }
    print(json.dumps(summary, indent=2, default=str))
    if inp.label_map is None:
        print("hmkd: note: no label map (the checkpoint stores none and no data set is at hand): "
              "the outputs are labels 1..K without category ids or names", file=sys.stderr)
    if not report["ok"]:
        print("hmkd: error: onnxruntime outputs differ from PyTorch beyond tolerance", file=sys.stderr)
        return 1
    return 0


# -- parser -------------------------------------------------------------------------------------
def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/; every key: docs/CONFIG.md)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="optional overrides of config keys, values read as YAML, e.g. train.iters=100 model.levels=[P3,P4]")


# Help of the options that do not set their own (every option has one: tests/cli/test_cli_help.py).
_HELP: dict[str, str] = {
    "--out": "output folder (file for data visdrone / export onnx)",
    "--output-dir": "where the run writes (default: the config's output_dir, else runs/<name>)",
    "--no-progress": "no progress output (no tqdm bar and no per-step log lines)",
    "--seed": "random seed",
    "--weights": "a checkpoint (model_final.pth or any detector weights file)",
    "--device": "cpu | cuda | cuda:N",
    "--size": "square input side in pixels",
    "--warmup": "untimed warm-up runs",
    "--iters": "timed runs",
    "--score-thresh": "detections below this score are not drawn",
    "--level": "FPN level (P2..P7)",
    "--topk": "how many top detections the Grad-CAM target sums",
    "--opset": "ONNX opset",
    "--dpi": "figure resolution",
    "what": "what to list",
    "bench accuracy --seeds": "seeds per method (0, 1, ...); the table reports mean +- std",
    "bench evalspeed --images": "synthetic ground-truth images",
    "viz detections --images": "image files to draw on",
    "viz heatmap --images": "image files to draw on",
}


def _fill_help(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every option without a help text the one of :data:`_HELP` ("sub command --option",
    else "--option"), recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _fill_help(sub, f"{path} {name}".strip())
        elif action.help is None:
            key = action.option_strings[0] if action.option_strings else action.dest
            action.help = _HELP.get(f"{path} {key}") or _HELP.get(key)


def _version() -> str:
    import torch
    import torchvision

    from hmkd import __version__

    return f"hmkd {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__}, python {sys.version.split()[0]})"


def _add_optional_config(p: argparse.ArgumentParser, without: str) -> None:
    p.add_argument("config", nargs="?", default=None, help=f"YAML config (optional: without one, {without})")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.score_thresh=0.1")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hmkd", description="Hierarchical Matching Knowledge Distillation toolkit")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("list", help="list registered detectors, backbones, methods or datasets")
    p.add_argument("what", choices=["detectors", "backbones", "methods", "datasets"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("config", help="inspect configs")
    conf = p.add_subparsers(dest="config_cmd", required=True)
    p = conf.add_parser("show", help="the resolved config: every key with its value, default and allowed values")
    _add_config(p)
    p.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("synth", help="generate the synthetic small-object data set (COCO format)")
    p.add_argument("--out", required=True)
    synth = SynthConfig()
    p.add_argument("--train", type=int, default=synth.n_train, help="training images")
    p.add_argument("--val", type=int, default=synth.n_val, help="validation images")
    p.add_argument("--size", type=int, default=synth.size, help="square image side in pixels")
    p.add_argument("--seed", type=int, default=synth.seed)
    p.add_argument("--preset", default=synth.preset, help="default | hard")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("visdrone", help="convert VisDrone-DET txt annotations to COCO JSON")
    p.add_argument("--src", required=True, help="folder with images/ and annotations/")
    p.add_argument("--out", required=True, help="output JSON file")
    p.set_defaults(func=cmd_data_visdrone)

    for name, helptext in (("train", "train one detector (teacher or plain student)"), ("distill", "train a student with a frozen teacher")):
        p = sub.add_parser(name, help=helptext)
        _add_config(p)
        p.add_argument("--output-dir", default=None)
        p.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT_DIR/last_checkpoint.pth (an error if there is none)")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=cmd_train)
    sub.choices["train"].description = (
        "Train one detector (a teacher, or a student without distillation). A config with distill.method "
        "other than none distils (with a warning): use hmkd distill for that.")

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint on the config's val split")
    _add_optional_config(p, "the architecture and the data set come from the config the checkpoint stores")
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fit-decoder", help="fit ICD's / HMKD's matching decoder on the frozen teacher; report its matching")
    _add_config(p)
    p.add_argument("--out", default=None, help="write the fitted decoder here (default: the cache, reused by later runs)")
    p.add_argument("--quality-images", type=int, default=64, help="validation images the quality report uses")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_fit_decoder)

    p = sub.add_parser("pretrain", help="make the pretrained backbone stand-in (backbone_weights: pretrain) ahead of time")
    _add_config(p)
    p.add_argument("--all", action="store_true", help="every section's backbone, whatever its backbone_weights say")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the paper-regime story at demo size on the synthetic data set, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny settings (< 3 minutes)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    p = bench.add_parser("speed", help="params, GFLOPs and latency of each model")
    _add_config(p)
    p.add_argument("--weights", nargs="+", action="extend", metavar="NAME=CKPT",
                   help="more models to time: NAME=CKPT ... after one --weights, or several --weights; a NAME "
                        "starting with 'teacher' takes the config's teacher architecture, any other its model's. "
                        "The words up to the next option are checkpoints: give key=value overrides before --weights")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--onnx", action="store_true", help="also time the ONNX export with onnxruntime")
    p.set_defaults(func=cmd_bench_speed)
    p = bench.add_parser("accuracy", help="every method side by side (paper Table 1)")
    _add_config(p)
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (default: all); none_init adds no-KD from the teacher's FPN and head")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--teacher", default=None, help="reuse a trained teacher checkpoint")
    p.add_argument("--ablation", default=None, help="supplement | heads | start_level | inquiry_head | others_bg | levels | weight | aux_every")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_accuracy)
    p = bench.add_parser("evalspeed", help="hmkd's COCO evaluation against plain pycocotools (time, identical numbers)")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="rounds over all variants; the fastest is reported")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bench_evalspeed)
    p = bench.add_parser("cost", help="seconds per step and memory of each method against no-KD")
    _add_config(p)
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to time (default: all); NAME:option=value[:...] times a variant, e.g. hmkd:aux_every=4")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=3,
                   help="extra steps of HMKD and ICD under torch.profiler for their per-part split (0: none)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bench_cost)

    viz = sub.add_parser("viz", help="pictures").add_subparsers(dest="viz_cmd", required=True)
    weights_help = (
        "one or more [NAME=]CKPT after one --weights (--weights a.pth b=b.pth), or several --weights, "
        "one panel each in this order. The words after --weights up to the next option are "
        "checkpoints: give key=value overrides before --weights, or after a one-value option such as --out. "
        "A bare CKPT is named after its file (after its folder where two files share a name). "
        "With a config, a NAME starting with "
        "'teacher' (teacher=CKPT, teacher_r50=CKPT) builds the config's teacher section, any other NAME "
        "(student, hmkd, plain ...) its model section; a checkpoint that stores another architecture is "
        "an error naming both. Without a config, each checkpoint's stored architecture is used"
    )
    p = viz.add_parser("detections", help="detections of several models side by side (paper Fig. 4)")
    _add_optional_config(p, "each checkpoint's stored architecture is used, and the data set it was trained on when on disk")
    p.add_argument("--weights", nargs="+", action="extend", required=True, metavar="[NAME=]CKPT", help=weights_help)
    p.add_argument("--images", nargs="+", action="extend", required=True, metavar="FILE|IDX",
                   help="image files, or validation-set indices / file names (needs the data set): the words "
                        "after --images up to the next option, or several --images, one picture each")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--no-gt", action="store_true", help="no ground-truth panel (drawn first for images of the data set)")
    p.add_argument("--show", default="all", choices=["all", "found"],
                   help="all: every detection >= --score-thresh with its class and score; found: each ground-truth "
                        "object green where the panel's model finds it (a detection of its class, IoU >= 0.5, score "
                        ">= --score-thresh), red where it misses it, yellow where it finds one the first model misses; "
                        "other detections only counted in the title (needs the data set's images)")
    p.add_argument("--font-size", type=int, default=None, metavar="PX",
                   help="title and legend font size in pixels (default: 1/45 of a panel's width); larger for a "
                        "picture shown smaller than its pixels, e.g. in a README")
    p.add_argument("--upscale", type=int, default=1,
                   help="draw at this many times the image's resolution (nearest neighbour), for small images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_viz_detections)
    p = viz.add_parser("heatmap", help="Grad-CAM on an FPN level (paper Fig. 1)")
    _add_optional_config(p, "each checkpoint's stored architecture is used")
    p.add_argument("--weights", nargs="+", action="extend", required=True, metavar="[NAME=]CKPT", help=weights_help)
    p.add_argument("--images", nargs="+", action="extend", required=True, metavar="FILE|IDX",
                   help="image files, or validation-set indices / file names (needs the data set): the words "
                        "after --images up to the next option, or several --images, one picture each")
    p.add_argument("--level", default="P3")
    p.add_argument("--target", default="topk", choices=["topk", "small"], help="Grad-CAM target: top-k scores, or top-k small detections")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--method", default="gradcam", choices=["gradcam", "hirescam"],
                   help="gradcam: channel weights = mean gradient (Grad-CAM); hirescam: gradient x activation "
                        "per position (HiResCAM), which stays on the detected objects where Grad-CAM can be <= 0 everywhere")
    p.add_argument("--scale", default="panel", choices=["panel", "shared"],
                   help="colour scale: each panel from 0 to its own max, or one scale shared by the panels of an image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_viz_heatmap)
    p = viz.add_parser("attention", help="matching-decoder attention of small objects, fitted vs untrained (paper Fig. 3)")
    _add_config(p)
    p.add_argument("--weights", required=True, help="the teacher checkpoint (sets teacher.weights)")
    p.add_argument("--decoder", required=True, help="the fitted decoder file (hmkd fit-decoder)")
    p.add_argument("--images", nargs="+", required=True, help="validation-set indices or image file names")
    p.add_argument("--objects", type=int, default=4, help="the smallest inquiring objects drawn per image")
    p.add_argument("--level", "--level-name", dest="levels", nargs="+", default=None,
                   help="draw only the decoder(s) over these key levels, e.g. P3 (default: every decoder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_viz_attention)

    exp = sub.add_parser("export", help="export for deployment").add_subparsers(dest="export_cmd", required=True)
    p = exp.add_parser("onnx", help="ONNX export checked with onnxruntime")
    _add_optional_config(p, "the architecture comes from the config the checkpoint stores")
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", default=None,
                   help="input S or HxW pixels (default: the square the model evaluates at, model.min_size capped by max_size)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check-images", nargs="*", default=None, help="images to compare onnxruntime with PyTorch on")
    p.set_defaults(func=cmd_export_onnx)
    _fill_help(ap)
    return ap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed after options too
    (``hmkd train CONFIG --out DIR lr=0.01``): argparse stops filling the overrides at the first
    option, so the ``key=value`` words it leaves are appended to them in the order given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.error("unrecognized arguments: " + " ".join(stray or extra))
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmkd`` command."""
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LevelFormatter(colour=_isatty(sys.stderr)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # warnings.warn(...) becomes a WARNING log line like the others
    try:
        return int(args.func(args) or 0)
    except HMKDError as e:
        print(f"hmkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # TrainingInterrupted (a checkpoint was saved) or a plain Ctrl-C
        print(f"hmkd: {e}" if str(e) else "hmkd: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))  # 130 for SIGINT, 143 for SIGTERM (shell convention)
    finally:
        logging.captureWarnings(False)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LevelFormatter(logging.Formatter):
    """``2026-01-02 10:00:00 INFO    hmkd.training.trainer: ...``; on a terminal, WARNING in yellow and
    ERROR in red (the whole line), so that they stand out of the step lines."""

    COLOURS = {logging.WARNING: "\033[33m", logging.ERROR: "\033[31;1m", logging.CRITICAL: "\033[31;1m"}

    def __init__(self, colour: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == "py.warnings":  # "file:line: UserWarning: message\n  source line": keep one line
            text = text.splitlines()[0] if text else text
        code = self.COLOURS.get(record.levelno) if self.colour else None
        return f"{code}{text}\033[0m" if code else text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
