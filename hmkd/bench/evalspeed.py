"""How fast hmkd's COCO evaluation is against plain pycocotools, on identical numbers (issue 8).

:func:`run_evalspeed` builds a synthetic COCO ground truth (``n_images`` images of 640x480, 1-8
boxes each, small/medium/large mixed, a few crowd boxes, 3 categories) and a results list of
``dets_per_image`` detections per image (jittered copies of the ground truth, some with the wrong
category, plus random boxes; random scores), then times, in one process on the same data:

* ``pycocotools``: plain ``COCO`` + ``loadRes`` + ``COCOeval(evaluate, accumulate, summarize)``,
  the reference;
* ``hmkd``: :func:`hmkd.engine.evaluator.coco_metrics` as the code calls it (its default engine);
* ``hmkd_faster``: the same with ``engine="faster"`` (faster-coco-eval's C++ matching and
  accumulation), when the default is not already that;
* ``faster_coco_eval``: plain faster-coco-eval (``COCO`` + ``loadRes`` + ``COCOeval_faster``);
  (its precision differs from pycocotools' in the last bit on some curves, which ``coco_metrics``
  repairs, see :func:`hmkd.engine.evaluator.match_pycocotools_precision`);
* ``pycocotools_gc_paused``: the reference with Python's cyclic garbage collector paused, as
  ``coco_metrics`` runs (:func:`hmkd.engine.evaluator.gc_paused`), to show how much of the
  speed-up is the pause and how much is the C++ engine.

Every variant starts from the same in-memory ground-truth dict and results list (each gets its own
copy outside the timed region, as the APIs mutate them) and is timed end to end (index building,
results loading, evaluate, accumulate, summarize). It then checks that each variant's 12 summary
numbers are identical (``==``) to pycocotools' and reports the largest difference and, where it can
read it, whether the ``precision`` / ``recall`` arrays are identical. ``evalspeed.json`` and
``evalspeed.md`` go to ``out_dir``. The target is hmkd >= 3x faster than pycocotools with identical
numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hmkd.utils import machine_info, write_json, write_text

logger = logging.getLogger(__name__)

__all__ = ["make_synthetic_coco", "pycocotools_eval", "run_evalspeed", "TARGET_SPEEDUP"]

TARGET_SPEEDUP = 3.0
_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def make_synthetic_coco(
    n_images: int = 5000, dets_per_image: int = 100, seed: int = 0, n_categories: int = 3
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground-truth dict and a results list (``dets_per_image`` per image), deterministic.

    Ground truth per image (640x480): 1-8 boxes whose side is drawn from three bands — small
    (4-31 px, 50%), medium (32-95 px, 30%) and large (96-300 px, 20%) — 2% of them ``iscrowd``.
    Detections per image: about a third are jittered ground-truth boxes (10% with the wrong
    category), the rest random boxes of the same size bands; scores uniform in (0, 1), boxes
    rounded to 2 decimals as detectors' JSON usually is.
    """
    rng = np.random.default_rng(seed)
    W, H = 640, 480
    cats = [{"id": i + 1, "name": f"class_{i + 1}", "supercategory": "shape"} for i in range(n_categories)]
    images, anns, dets = [], [], []
    ann_id = 1

    def sides(n: int) -> np.ndarray:
        band = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
        lo = np.array([4, 32, 96])[band]
        hi = np.array([32, 96, 301])[band]
        return rng.uniform(lo, hi, size=n) * rng.uniform(0.7, 1.3, size=n), rng.uniform(lo, hi, size=n)

    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": W, "height": H, "file_name": f"{img_id:06d}.png"})
        n = int(rng.integers(1, 9))
        w, h = sides(n)
        w, h = np.minimum(w, W - 1), np.minimum(h, H - 1)
        x = rng.uniform(0, W - w)
        y = rng.uniform(0, H - h)
        c = rng.integers(1, n_categories + 1, size=n)
        crowd = rng.random(n) < 0.02
        gt_boxes = []
        for k in range(n):
            box = [round(float(x[k]), 2), round(float(y[k]), 2), round(float(w[k]), 2), round(float(h[k]), 2)]
            anns.append({"id": ann_id, "image_id": img_id, "category_id": int(c[k]), "bbox": box,
                         "area": box[2] * box[3], "iscrowd": int(crowd[k])})
            gt_boxes.append((box, int(c[k])))
            ann_id += 1
        n_tp = min(dets_per_image, max(1, dets_per_image // 3))
        src = rng.integers(0, n, size=n_tp)
        jit = rng.normal(0, 0.08, size=(n_tp, 4))
        wrong = rng.random(n_tp) < 0.1
        for k in range(n_tp):
            (bx, by, bw, bh), cat = gt_boxes[int(src[k])]
            nb = [bx + jit[k, 0] * bw, by + jit[k, 1] * bh, bw * float(np.exp(jit[k, 2])), bh * float(np.exp(jit[k, 3]))]
            if wrong[k]:
                cat = int(rng.integers(1, n_categories + 1))
            dets.append({"image_id": img_id, "category_id": cat, "bbox": [round(v, 2) for v in nb],
                         "score": float(rng.random())})
        n_fp = dets_per_image - n_tp
        w, h = sides(n_fp)
        w, h = np.minimum(w, W - 1), np.minimum(h, H - 1)
        x = rng.uniform(0, W - w)
        y = rng.uniform(0, H - h)
        c = rng.integers(1, n_categories + 1, size=n_fp)
        s = rng.random(n_fp)
        for k in range(n_fp):
            dets.append({"image_id": img_id, "category_id": int(c[k]),
                         "bbox": [round(float(x[k]), 2), round(float(y[k]), 2), round(float(w[k]), 2), round(float(h[k]), 2)],
                         "score": float(s[k])})
    gt = {"info": {"description": "hmkd evalspeed synthetic"}, "images": images, "annotations": anns, "categories": cats}
    return gt, dets


# ------------------------------------------------------------------------------------ variants
def pycocotools_eval(gt: dict, dets: list) -> dict[str, Any]:
    """The reference: plain pycocotools ``COCO`` + ``loadRes`` + ``COCOeval`` (bbox) on a ground-truth
    dict and a results list (both are mutated); ``{"stats": 12 floats, "precision", "recall"}``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        d = g.loadRes(dets)
        ev = COCOeval(g, d, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"stats": [float(v) for v in ev.stats[:12]], "precision": ev.eval["precision"], "recall": ev.eval["recall"]}


def _faster_plain(gt: dict, dets: list) -> dict[str, Any]:
    from faster_coco_eval import COCO as FCOCO
    from faster_coco_eval import COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    g = FCOCO(gt, print_function=quiet)
    d = g.loadRes(dets)
    ev = COCOeval_faster(g, d, "bbox", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"stats": [float(v) for v in ev.stats[:12]], "precision": np.asarray(ev.eval["precision"]),
            "recall": np.asarray(ev.eval["recall"])}


def _pycocotools_gc_paused(gt: dict, dets: list) -> dict[str, Any]:
    """The reference with Python's cyclic GC paused, as ``coco_metrics`` runs: how much of hmkd's
    speed-up is the pause alone, and how much is faster-coco-eval's C++."""
    from hmkd.engine.evaluator import gc_paused

    with gc_paused():
        return pycocotools_eval(gt, dets)


def _hmkd(engine: str | None) -> Any:
    def run(gt: dict, dets: list) -> dict[str, Any]:
        from hmkd.engine.evaluator import coco_metrics

        kw = {} if engine is None else {"engine": engine}
        m = coco_metrics(gt, dets, ("bbox",), **kw)["bbox"]
        # coco_metrics reports percent with nan for -1; back to COCOeval's scale for the comparison
        return {"stats": [(-1.0 if m[k] != m[k] else m[k] / 100.0) for k in _KEYS], "percent": {k: m[k] for k in _KEYS}}

    return run


def _default_engine() -> str:
    import inspect

    from hmkd.engine.evaluator import coco_metrics

    p = inspect.signature(coco_metrics).parameters.get("engine")
    return str(p.default) if p is not None and p.default is not inspect.Parameter.empty else "pycocotools"


def _compare(ref: dict[str, Any], other: dict[str, Any], scale_pct: bool) -> dict[str, Any]:
    a = np.asarray(ref["stats"], dtype=np.float64)
    b = np.asarray(other["stats"], dtype=np.float64)
    if scale_pct:  # hmkd's numbers went through *100 and /100: compare in percent, as it reports them
        a_cmp = np.where(a >= 0, a * 100.0, -1.0)
        b_cmp = np.asarray([other["percent"][k] if other["percent"][k] == other["percent"][k] else -1.0 for k in _KEYS])
    else:
        a_cmp, b_cmp = a, b
    out: dict[str, Any] = {
        "identical": bool(np.array_equal(a_cmp, b_cmp)),
        "max_abs_diff": float(np.max(np.abs(a_cmp - b_cmp))) if a_cmp.size else 0.0,
        "unit": "percent" if scale_pct else "fraction",
    }
    if "precision" in other:
        out["precision_identical"] = bool(np.array_equal(ref["precision"], other["precision"]))
        out["recall_identical"] = bool(np.array_equal(ref["recall"], other["recall"]))
        out["precision_max_abs_diff"] = float(np.max(np.abs(ref["precision"] - other["precision"])))
    return out


def run_evalspeed(
    out_dir: str | os.PathLike = "runs/evalspeed",
    n_images: int = 5000,
    dets_per_image: int = 100,
    seed: int = 0,
    *,
    repeats: int = 1,
    variants: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Time hmkd's ``coco_metrics`` against pycocotools on a synthetic set; check identical numbers.

    Args:
        out_dir: where ``evalspeed.json`` and ``evalspeed.md`` go.
        n_images, dets_per_image, seed: the synthetic set (:func:`make_synthetic_coco`).
        repeats: rounds over all variants (one run of each per round, so load changes on a
            shared machine hit every variant alike); the minimum time is reported (all are kept).
        variants: subset of ``pycocotools``, ``hmkd``, ``hmkd_faster``, ``faster_coco_eval``,
            ``pycocotools_gc_paused`` (default: all; ``pycocotools`` is always run, as the reference).

    Returns:
        ``{"table": Markdown, "variants": {name: {"seconds", "speedup", "stats", "vs_pycocotools"}},
        "target": {...}, ...}`` (also written to ``evalspeed.json``).
    """
    t0 = time.perf_counter()
    gt, dets = make_synthetic_coco(n_images, dets_per_image, seed)
    gen_s = time.perf_counter() - t0
    engine = _default_engine()
    runners = {
        "pycocotools": pycocotools_eval,
        "hmkd": _hmkd(None),
        "hmkd_faster": _hmkd("faster"),
        "faster_coco_eval": _faster_plain,
        "pycocotools_gc_paused": _pycocotools_gc_paused,
    }
    names = list(variants) if variants else list(runners)
    if engine == "faster" and "hmkd_faster" in names and not variants:
        names.remove("hmkd_faster")  # the default already is faster-coco-eval
    names = ["pycocotools"] + [n for n in names if n != "pycocotools"]
    load_start = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(max(1, repeats)):  # rounds over the variants: load changes hit all of them
        for name in names:
            g, d = copy.deepcopy(gt), copy.deepcopy(dets)
            t = time.perf_counter()
            raw[name] = runners[name](g, d)
            times[name].append(time.perf_counter() - t)
            del g, d
    for name in names:
        r = raw[name]
        results[name] = {"seconds": min(times[name]), "seconds_all": times[name], "stats": r["stats"]}
        if "percent" in r:  # what hmkd reports (percent, None where COCOeval gives -1)
            results[name]["stats_percent"] = [None if r["percent"][k] != r["percent"][k] else r["percent"][k] for k in _KEYS]
        logger.info("evalspeed: %s %.2f s", name, min(times[name]))
    ref = raw["pycocotools"]
    for name in names:
        res = results[name]
        res["speedup"] = results["pycocotools"]["seconds"] / res["seconds"]
        if name != "pycocotools":
            res["vs_pycocotools"] = _compare(ref, raw[name], scale_pct="percent" in raw[name])
    hm = results.get("hmkd")
    target = None
    if hm is not None:
        target = {
            "speedup": hm["speedup"], "target": TARGET_SPEEDUP,
            "identical": hm["vs_pycocotools"]["identical"],
            "met": bool(hm["speedup"] >= TARGET_SPEEDUP and hm["vs_pycocotools"]["identical"]),
        }
    out = {
        "n_images": n_images,
        "dets_per_image": dets_per_image,
        "n_annotations": len(gt["annotations"]),
        "n_detections": len(dets),
        "seed": seed,
        "repeats": repeats,
        "hmkd_default_engine": engine,
        "generate_seconds": gen_s,
        "variants": results,
        "target": target,
        "machine": {**machine_info(), "versions": _versions()},
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    table = _markdown(out)
    p = Path(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    write_json(p / "evalspeed.json", out)
    write_text(p / "evalspeed.md", table)
    out["paths"] = {"json": str(p / "evalspeed.json"), "md": str(p / "evalspeed.md")}
    out["table"] = table
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pycocotools", "faster-coco-eval", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


_LABELS = {
    "pycocotools": "pycocotools COCOeval (reference)",
    "hmkd": "hmkd coco_metrics (default engine)",
    "hmkd_faster": "hmkd coco_metrics(engine='faster')",
    "faster_coco_eval": "faster-coco-eval COCOeval_faster (plain)",
    "pycocotools_gc_paused": "pycocotools COCOeval, Python's cyclic GC paused (as hmkd runs)",
}


def _markdown(res: dict[str, Any]) -> str:
    v = res["variants"]
    lines = [
        f"COCO bbox evaluation of {res['n_detections']} detections on {res['n_images']} images "
        f"({res['n_annotations']} GT boxes), end to end (index, loadRes, evaluate, accumulate, summarize); "
        f"hmkd's default engine: `{res['hmkd_default_engine']}`; best of {res['repeats']} run(s).",
        "",
        "| variant | seconds | speed-up vs pycocotools | 12 stats identical | max abs diff |",
        "|---|---:|---:|---|---:|",
    ]
    for name, r in v.items():
        cmp = r.get("vs_pycocotools")
        ident = "reference" if cmp is None else ("yes" if cmp["identical"] else "NO")
        diff = "" if cmp is None else f"{cmp['max_abs_diff']:.3g} ({cmp['unit']})"
        lines.append(f"| {_LABELS.get(name, name)} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {ident} | {diff} |")
    f = v.get("faster_coco_eval", {}).get("vs_pycocotools")
    if f and "precision_identical" in f:
        lines += ["", f"faster-coco-eval precision array identical to pycocotools': {f['precision_identical']}, "
                      f"recall: {f['recall_identical']} (max |diff| of precision {f['precision_max_abs_diff']:.3g})."]
    t = res.get("target")
    if t:
        lines += ["", f"Target (hmkd >= {t['target']:.0f}x pycocotools with identical numbers): "
                      f"{t['speedup']:.2f}x, identical {t['identical']}: {'met' if t['met'] else 'NOT met'}."]
    lines += ["", f"Load average at start/end: {res['loadavg_start']} / {res['loadavg_end']}."]
    return "\n".join(lines) + "\n"
