"""Fingerprint of what hmkd computes, to prove that a restructuring changed no behaviour.

Run it before and after a change that should change nothing, on the same machine, and compare the
two JSON files (they must be equal)::

    python benchmarks/scripts/fingerprint.py --out before.json
    ... restructure ...
    python benchmarks/scripts/fingerprint.py --out after.json
    python benchmarks/scripts/fingerprint.py --compare before.json after.json

It uses only the public surface (the ``hmkd`` package's API and the ``hmkd`` command line), so it
runs unchanged on both sides of a move. It records:

- ``runs``: for each method (none, fitnet, fgd, icd, hmkd), a tiny training run through ``hmkd
  train`` / ``hmkd distill`` (FCOS R18 student, random-weight R18 teacher, 4 iterations on a tiny
  synthetic set, the decoder fitted for icd/hmkd from an empty cache): a SHA-256 of every tensor of
  ``model_final.pth`` and of the resume state ``last_checkpoint.pth`` (weights, optimiser and
  schedule states, random streams), the losses of every logged step and the final metrics;
- ``steps``: for each method and for a Faster R-CNN and an FCOS pair, the loss dict of one distiller
  step through ``hmkd.distiller`` and a SHA-256 of every parameter's gradient.

Float values are written with ``repr`` (exact), tensors as hashes of their bytes: equality means
bit-identical on this machine (floating-point results may differ on another CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile

import torch

METHODS = ("none", "fitnet", "fgd", "icd", "hmkd")
TINY = ["model.detector=fcos", "model.backbone=resnet18", "model.fpn_channels=32", "model.head_convs=1",
        "model.levels=[P2,P3,P4,P5,P6]", "model.min_size=128", "model.max_size=128",
        "model.detections_per_img=20", "model.topk_candidates=100"]
SMALL_OPTIONS = {"icd": {"hidden": 32, "heads": 4}, "hmkd": {"hidden": 32, "heads": 4}}


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu().reshape(-1)
    return f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:24]


def _is_timing(key: str) -> bool:
    """Keys that hold wall times or memory peaks (they differ from run to run)."""
    return re.search(r"(^|_)(sec|seconds|time|mem|eta)(_|$)", key) is not None


def _flatten(obj, prefix: str = "") -> dict[str, str]:
    """Every tensor and number of a nested checkpoint, keyed by its path."""
    out: dict[str, str] = {}
    if torch.is_tensor(obj):
        out[prefix] = _digest(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k in ("config", "output_dir") or _is_timing(str(k)):
                continue  # the stored config names the run's folder; timings differ run to run
            out.update(_flatten(obj[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float, bool, str)) or obj is None:
        out[prefix] = repr(obj)
    else:
        out[prefix] = type(obj).__name__
    return out


def _cli(argv: list[str]) -> None:
    from hmkd.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    if rc not in (0, None):
        raise SystemExit(f"hmkd {' '.join(argv)} exited {rc}")


def _runs(work: str) -> dict[str, dict]:
    import hmkd

    synth = ["data.kind=synthetic", f"data.root={work}/synth", "data.synth.n_train=4", "data.synth.n_val=3",
             "data.synth.size=128", "data.batch_size=2", "data.eval_batch_size=2", "data.workers=0"]
    train = ["train.iters=4", "train.warmup_iters=2", "train.log_period=1", "train.ckpt_period=0",
             "train.eval_period=0", "train.keep_last_checkpoint=true"]
    cfg = hmkd.load_config(None, TINY + ["model.num_classes=6"])
    torch.manual_seed(123)
    teacher = os.path.join(work, "teacher.pth")
    torch.save(hmkd.build_model(cfg.model).state_dict(), teacher)
    base = os.path.join(work, "base.yaml")
    with open(base, "w") as f:
        f.write("name: fp\n")
    out: dict[str, dict] = {}
    for method in METHODS:
        run = os.path.join(work, method)
        items = ["name=fp", "device=cpu", "seed=7", *synth, *TINY, *train, f"distill.method={method}"]
        if method != "none":
            items += [f"teacher.{o.split('=', 1)[0].split('.', 1)[1]}={o.split('=', 1)[1]}" for o in TINY]
            items += [f"teacher.weights={teacher}"]
        for k, v in SMALL_OPTIONS.get(method, {}).items():
            items.append(f"distill.options.{k}={v}")
        if method in ("icd", "hmkd"):
            items.append("distill.options.fit_iters=3" if method == "hmkd" else "distill.options.decoder_fit=none")
        _cli(["distill" if method != "none" else "train", base, *items, "--output-dir", run])
        log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
        steps = [{k: repr(v) for k, v in sorted(r.items()) if not _is_timing(k)}
                 for r in log if "total" in r]
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        metrics.pop("timing", None)
        for key in ("output_dir", "outputs"):  # the run's folder
            metrics.pop(key, None)
        out[method] = {
            "model_final": _flatten(torch.load(os.path.join(run, "model_final.pth"), map_location="cpu", weights_only=False)),
            "last_checkpoint": _flatten(torch.load(os.path.join(run, "last_checkpoint.pth"), map_location="cpu", weights_only=False)),
            "log": steps,
            "metrics": json.loads(json.dumps(metrics, default=repr)),
        }
    return out


def _steps() -> dict[str, dict]:
    import hmkd

    tiny = dict(min_size=160, max_size=160, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=32)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 120, 150, generator=g), torch.rand(3, 140, 110, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 40.0], [60.0, 50.0, 70.0, 58.0], [80.0, 20.0, 140.0, 110.0]]),
         "labels": torch.tensor([1, 2, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 20.0, 15.0]]), "labels": torch.tensor([2])},
    ]
    out: dict[str, dict] = {}
    for detector in ("faster_rcnn", "fcos"):
        kw = tiny if detector == "faster_rcnn" else dict(min_size=160, max_size=160)
        levels = None if detector == "faster_rcnn" else ["P2", "P3", "P4", "P5", "P6"]
        for method in METHODS:
            torch.manual_seed(0)
            student = hmkd.build_detector(detector, "resnet18", num_classes=3, fpn_channels=32, levels=levels, **kw)
            teacher = hmkd.build_detector(detector, "resnet34", num_classes=3, fpn_channels=64, levels=levels, **kw)
            kd = hmkd.distiller(method, teacher=teacher if method != "none" else None, student=student,
                                **SMALL_OPTIONS.get(method, {}))
            kd.train()
            torch.manual_seed(5)
            losses = kd(images, targets, iteration=0)
            hmkd.total_loss(losses).backward()
            grads = {n: _digest(p.grad) if p.grad is not None else "none" for n, p in kd.named_parameters()}
            out[f"{detector}/{method}"] = {"losses": {k: repr(float(v)) for k, v in sorted(losses.items())}, "grads": grads}
    return out


def _compare(a_path: str, b_path: str) -> int:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    diffs = []

    def walk(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    diffs.append(f"{where}.{k}: only in {'after' if k not in x else 'before'}")
                else:
                    walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            diffs.append(f"{where}: {x!r} != {y!r}")

    walk(a, b, "")
    n = sum(1 for _ in _leaves(a))
    print(f"{n} values compared, {len(diffs)} differ")
    for d in diffs[:40]:
        print("  " + d)
    return 1 if diffs else 0


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the fingerprint here (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprints")
    args = ap.parse_args()
    if args.compare:
        return _compare(*args.compare)
    if not args.out:
        ap.error("--out or --compare")
    torch.set_num_threads(1)  # the same kernels' summation order on both sides
    with tempfile.TemporaryDirectory() as work:
        os.environ["HMKD_CACHE"] = os.path.join(work, "cache")
        result = {"torch": torch.__version__, "steps": _steps(), "runs": _runs(work)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
