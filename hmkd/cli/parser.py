"""The ``hmkd`` argument parser: every sub-command, its options and their help texts
(:func:`build_parser`), and :func:`parse_args` (``key=value`` overrides also after options)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hmkd.cli.commands import (
    cmd_bench_accuracy,
    cmd_bench_cost,
    cmd_bench_evalspeed,
    cmd_bench_speed,
    cmd_config_show,
    cmd_data_synth,
    cmd_data_visdrone,
    cmd_demo,
    cmd_eval,
    cmd_export_onnx,
    cmd_fit_decoder,
    cmd_list,
    cmd_pretrain,
    cmd_train,
    cmd_viz_attention,
    cmd_viz_detections,
    cmd_viz_heatmap,
)
from hmkd.bench.accuracy.plan import ABLATIONS
from hmkd.config import SynthConfig

__all__ = ["build_parser", "parse_args"]


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
                   help="methods (default: all); none_init adds no-KD from the teacher's FPN and head; "
                        "a variant as method:option=value[:option=value], e.g. hmkd:decoder_training=frozen")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--teacher", default=None, help="reuse a trained teacher checkpoint")
    p.add_argument("--ablation", default=None, help=" | ".join(ABLATIONS))
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
    p.add_argument("--biggest-tensors", type=int, default=8, metavar="N",
                   help="report the N biggest tensors of each method's step and of the method's own (0: none)")
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
