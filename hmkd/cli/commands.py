"""The handlers of the ``hmkd`` sub-commands (``cmd_<command>``, set by :func:`hmkd.cli.parser.build_parser`):
each is a thin layer over a library function, printing what it returns."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from hmkd.cli.inputs import check_image_words, config_or_override, load_cfg, named_weights
from hmkd.errors import ConfigError

logger = logging.getLogger("hmkd")


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

    cfg = load_cfg(args)
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

    print(show(load_cfg(args), args.config), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hmkd.engine.evaluation import evaluate
    from hmkd.models.checkpoint_info import config_from_checkpoint

    config_or_override(args)
    cfg = load_cfg(args) if args.config else config_from_checkpoint(args.weights, args.overrides)
    metrics = evaluate(cfg, weights=args.weights, out_dir=args.out, progress=not args.no_progress)
    print(json.dumps({k: {m: v for m, v in d.items() if m != "per_class"} for k, d in metrics.items()}, indent=2))
    return 0


def cmd_fit_decoder(args: argparse.Namespace) -> int:
    from hmkd.distill.matching.report import fit_decoder_report
    from hmkd.training import resolve_pretrained

    # the fit and its report read the teacher only: a student on a pretrained stand-in is built without it
    cfg = resolve_pretrained(load_cfg(args), student=False, progress=not args.no_progress)
    report = fit_decoder_report(cfg, out=args.out, quality_images=args.quality_images, progress=not args.no_progress)
    print(report["markdown"])
    print(f"fitted decoder: {report['decoder']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from hmkd.config import PRETRAIN_BACKBONE
    from hmkd.training import ensure_pretrained

    cfg = load_cfg(args)
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
def cmd_bench_speed(args: argparse.Namespace) -> int:
    from hmkd.bench.speed import models_from_config, speed_report

    cfg = load_cfg(args, need_classes=True)
    res = speed_report(
        models_from_config(cfg, named_weights(args.weights)),
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

    cfg = load_cfg(args)
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

    cfg = load_cfg(args)
    res = run_cost_bench(cfg, methods=args.methods, out_dir=args.out, iters=args.iters, warmup=args.warmup,
                         profile_steps=args.profile_steps, biggest_tensors=args.biggest_tensors)
    print(res["table"])
    return 0


def cmd_viz_detections(args: argparse.Namespace) -> int:
    from hmkd.cli.inputs import model_inputs, resolve_image_args
    from hmkd.viz.detections import draw_detections, ground_truth_of

    config_or_override(args)
    check_image_words(args.images)
    if args.show == "found" and args.no_gt:
        raise ConfigError("--show found marks the ground-truth objects as found or missed: leave out --no-gt")
    weights = named_weights(args.weights)
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
    from hmkd.cli.inputs import model_inputs, resolve_image_args
    from hmkd.viz.heatmap import gradcam_heatmaps

    config_or_override(args)
    check_image_words(args.images)
    need_data = not all(os.path.isfile(v) for v in args.images)  # indices or names of validation images
    inp = model_inputs(args.config, args.overrides, named_weights(args.weights), need_data=need_data)
    paths = gradcam_heatmaps(
        inp.specs, resolve_image_args(args.images, inp.dataset), args.level, args.out,
        target=args.target, topk=args.topk, device=args.device, num_classes=inp.num_classes, normalize=args.scale,
        method=args.method,
    )
    print("\n".join(paths))
    return 0


def cmd_viz_attention(args: argparse.Namespace) -> int:
    from hmkd.viz.attention import viz_attention

    cfg = load_cfg(args)
    res = viz_attention(
        cfg, decoder=args.decoder, weights=args.weights, images=args.images, out_dir=args.out,
        objects=args.objects, levels=args.levels, device=args.device, dpi=args.dpi,
    )
    print("\n".join(res["paths"]))
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from hmkd.cli.inputs import model_inputs
    from hmkd.export.onnx import export_and_check, export_size
    from hmkd.models.specs import as_model

    config_or_override(args)
    inp = model_inputs(args.config, args.overrides, [("model", args.weights)])
    mcfg = inp.specs[0][1][0]
    model = as_model(inp.specs[0][1], num_classes=inp.num_classes)
    summary = export_and_check(model, mcfg, args.out, size=export_size(args.size, mcfg), opset=args.opset,
                               weights=args.weights, label_map=inp.label_map, label_map_source=inp.label_map_source,
                               check_images=args.check_images)
    print(json.dumps(summary, indent=2, default=str))
    if inp.label_map is None:
        print("hmkd: note: no label map (the checkpoint stores none and no data set is at hand): "
              "the outputs are labels 1..K without category ids or names", file=sys.stderr)
    if not summary["ok"]:
        print("hmkd: error: onnxruntime outputs differ from PyTorch beyond tolerance", file=sys.stderr)
        return 1
    return 0
