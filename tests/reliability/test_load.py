"""Load: memory over a long data-loading run with worker processes, and evaluating 100k detections.

* The training data path (the trainer's ``SeededDataset`` + ``InfiniteBatchSampler`` + persistent
  workers, masks decoded from RLE) over the synthetic set for 400 batches: the resident memory of
  the main process plus its workers, sampled from ``/proc``, must not grow by more than 50 MB after
  warm-up (a leak, or copy-on-write growth of the workers' copy of the data set, would).
* ``coco_metrics`` on a 100 000-detection file (read from JSON) runs in a fresh subprocess whose
  peak RSS must stay under 2 GB. The peak is the child's ``VmHWM`` (``ru_maxrss`` is reported too,
  but on Linux it carries the forking parent's high-water mark over ``exec``, so it overstates a
  child started from a big test process). The numbers are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hmkd.data import build_dataset, collate_fn
from hmkd.engine.loaders import close_loader_iter
from hmkd.engine.sampler import InfiniteBatchSampler, SeededDataset
from hmkd.engine.signals import worker_init

from reliability_helpers import child_env

def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read RSS")
def test_dataloader_workers_do_not_leak_memory(tmp_path: Path) -> None:
    ds = build_dataset(
        "synthetic", train=True, root=str(tmp_path / "synth"), hflip=True, scales=[80, 96, 112], max_size=160,
        with_masks=True,
        synth={"n_train": 12, "n_val": 1, "size": 96, "seed": 0, "objects_per_image": [3, 10], "distractors": [2, 6]},
    )
    batches, warmup, every = 320, 60, 20
    sampler = InfiniteBatchSampler(len(ds), 4, seed=0, shuffle=True)
    loader = DataLoader(
        SeededDataset(ds), batch_sampler=sampler, num_workers=2, collate_fn=collate_fn, persistent_workers=True,
        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0),
    )
    me = os.getpid()
    before = set(_children(me))
    it = iter(loader)
    samples: list[tuple[int, float, float]] = []  # (batch, main MB, workers MB)
    n_boxes = 0
    try:
        for b in range(1, batches + 1):
            images, targets = next(it)
            n_boxes += sum(len(t["boxes"]) for t in targets)
            if b >= warmup and b % every == 0:
                workers = [p for p in _children(me) if p not in before]
                assert len(workers) == 2, workers
                samples.append((b, _rss_mb(me), sum(_rss_mb(p) for p in workers)))
    finally:
        close_loader_iter(it)
    assert n_boxes > batches  # the batches were real
    totals = [m + w for _, m, w in samples]
    growth = max(totals[len(totals) // 2:]) - totals[0]
    print(
        f"\nDataLoader RSS (main + 2 workers) after {warmup} batches: {totals[0]:.1f} MB; "
        f"max over batches {batches // 2}-{batches}: {max(totals[len(totals) // 2:]):.1f} MB; growth {growth:+.1f} MB "
        f"(main {samples[-1][1] - samples[0][1]:+.1f}, workers {samples[-1][2] - samples[0][2]:+.1f})"
    )
    assert growth < 50.0, f"RSS grew by {growth:.1f} MB over {batches - warmup} batches: {samples}"


_EVAL_CHILD = textwrap.dedent(
    r"""
    import json, resource, sys, time
    from hmkd.engine.evaluator import coco_metrics
    from hmkd.utils import proc_status_kb

    gt_path, dets_path = sys.argv[1:3]
    def hwm_kb():  # the child's own peak; ru_maxrss where there is no /proc
        return proc_status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    base = hwm_kb()
    t0 = time.perf_counter()
    with open(dets_path) as f:
        dets = json.load(f)
    metrics = coco_metrics(gt_path, dets)
    seconds = time.perf_counter() - t0
    peak, maxrss = hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": len(dets), "base_kb": base, "peak_kb": peak, "maxrss_kb": maxrss, "seconds": seconds,
                      "mAP": metrics["bbox"]["mAP"]}))
    """
)


def _write_eval_files(d: Path, n_images: int = 100, per_image: int = 1000, n_cats: int = 2) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images = [{"id": i + 1, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(n_cats)]
    n_gt = n_images * 10
    xy = rng.uniform(0, 440, (n_gt, 2))
    wh = rng.uniform(4, 64, (n_gt, 2))
    anns = [
        {"id": k + 1, "image_id": k // 10 + 1, "category_id": int(k % n_cats) + 1,
         "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
         "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0}
        for k in range(n_gt)
    ]
    n = n_images * per_image
    xy = rng.uniform(0, 440, (n, 2)).round(2)
    wh = rng.uniform(2, 64, (n, 2)).round(2)
    score = rng.random(n).round(4)
    cat = rng.integers(1, n_cats + 1, n)
    dets = [
        {"image_id": k // per_image + 1, "category_id": int(cat[k]),
         "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])], "score": float(score[k])}
        for k in range(n)
    ]
    gt_path, dets_path = d / "gt.json", d / "detections.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    dets_path.write_text(json.dumps(dets))
    return gt_path, dets_path


def test_evaluating_100k_detections_stays_within_memory(tmp_path: Path) -> None:
    gt_path, dets_path = _write_eval_files(tmp_path)
    script = tmp_path / "eval_child.py"
    script.write_text(_EVAL_CHILD)
    r = subprocess.run([sys.executable, str(script), str(gt_path), str(dets_path)], env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 100_000 and res["mAP"] == res["mAP"]  # scored (not nan)
    peak_mb, base_mb = res["peak_kb"] / 1024, res["base_kb"] / 1024
    print(
        f"\ncoco_metrics on {res['n']} detections ({dets_path.stat().st_size / 2**20:.1f} MB JSON): peak RSS "
        f"{peak_mb:.0f} MB ({peak_mb - base_mb:+.0f} MB over the {base_mb:.0f} MB after imports), {res['seconds']:.1f} s; "
        f"ru_maxrss {res['maxrss_kb'] / 1024:.0f} MB"
    )
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"
