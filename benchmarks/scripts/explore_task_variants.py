"""Which decoder task makes HMKD's matching decoder attend to the object? (the exploration behind
docs/MATCHING.md; not a test, not a product command).

For each variant of ``distill.options`` (JSON), fit the decoder for ITERS steps on the frozen
teacher's maps of the first N_TRAIN training images (computed once, no flip), with the fit's own
settings (AdamW at ``fit_lr``, clip ``decoder_clip``), then measure it with
``hmkd.distill.matching.quality.measure_decoder`` on the first 64 validation images.

    python benchmarks/scripts/explore_task_variants.py CONFIG TEACHER DATA_ROOT VARIANTS_JSON \\
        [--iters 400] [--n-train 200] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hmkd.config import load_config
from hmkd.data import build_data
from hmkd.data.transforms import collate_fn
from hmkd.distill.base import small_flags
from hmkd.distill.matching.fit import transformed_batch
from hmkd.distill.matching.quality import measure_decoder, quality_markdown
from hmkd.distill.matching.report import build_decoder_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("teacher")
    ap.add_argument("data_root")
    ap.add_argument("variants", help='JSON: {"name": {option: value, ...}, ...}')
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="task_variants.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = [f"teacher.weights={args.teacher}", f"data.root={args.data_root}", "data.hflip=false"]
    cfg = load_config(args.config, base)
    dev = torch.device("cpu")
    train, val = build_data(cfg, train=True), build_data(cfg, train=False)
    first = build_decoder_method(cfg, train, dev)
    cache = []
    subset = torch.utils.data.Subset(train, list(range(args.n_train)))
    for images, targets in torch.utils.data.DataLoader(subset, batch_size=cfg.data.batch_size, collate_fn=collate_fn):
        feats, resized, sizes, padded = transformed_batch(first, images, targets)
        cache.append((feats, [t["boxes"] for t in resized], [t["labels"] for t in resized],
                      small_flags(targets, first.small_area), sizes, padded))
    results = {}
    for name, opts in json.loads(args.variants).items():
        over = base + [f"distill.options.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in opts.items()]
        cfg = load_config(args.config, over)
        torch.manual_seed(0)
        d = build_decoder_method(cfg, train, dev)
        mods = d.decoder_modules()
        params = list(mods.parameters())
        opt = torch.optim.AdamW(params, lr=d.fit_lr, weight_decay=d.options.decoder_weight_decay)
        gen = torch.Generator().manual_seed(0)
        t0 = time.time()
        for it in range(args.iters):
            out = d.decoder_task(*cache[it % len(cache)], generator=gen)
            losses = {k: v for aux in out.values() for k, v in aux.losses.items()}
            opt.zero_grad()
            sum(losses.values()).backward()
            if d.options.decoder_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, d.options.decoder_clip)
            opt.step()
            if (it + 1) % 100 == 0:
                print(name, it + 1, {k: round(float(v.detach()), 4) for k, v in losses.items()},
                      f"{time.time() - t0:.0f}s", flush=True)
        results[name] = measure_decoder(d, val, device=dev, batch_size=8, max_images=64)
        print(quality_markdown({name: results[name]}), flush=True)
    with open(args.out, "w") as f:
        json.dump({"iters": args.iters, "n_train": args.n_train, "variants": json.loads(args.variants),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
