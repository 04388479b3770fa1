"""Operator profile of training steps of two methods on the same batch (torch.profiler).

    python benchmarks/results/cost/profile_step.py CONFIG OUT_TXT [DEVICE] [THREADS] [METHOD ...]

Prints, per method, the operators sorted by self time (CPU, or CUDA on a GPU) over 3 profiled
steps after 2 warm-up steps, so that the extra cost of a method over ``none`` can be pinned on
operators (forward and backward alike).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import prototype_hmkd_fast  # noqa: E402,F401
from hmkd.bench.cost import _build, _load_batches, _step  # noqa: E402
from hmkd.config import load_config  # noqa: E402
from hmkd.engine.optim import build_optimizer  # noqa: E402

if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    out = sys.argv[2]
    dev = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
    if len(sys.argv) > 4:
        torch.set_num_threads(int(sys.argv[4]))
    methods = sys.argv[5:] or ["none", "hmkd"]
    batches, n_cls, _ = _load_batches(cfg, 1, dev)
    images, targets = batches[0]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    with open(out, "w") as f:
        for m in methods:
            d = _build(cfg, m, n_cls, dev, False, {})
            params = d.student_parameters() + d.distiller_parameters()
            opt = build_optimizer(cfg.train, params)
            for i in range(2):
                _step(d, opt, params, cfg.train.clip_grad, images, targets, 10**6 + i, dev)
            with profile(activities=acts) as prof:
                times = [_step(d, opt, params, cfg.train.clip_grad, images, targets, 10**6 + 2 + i, dev) for i in range(3)]
            f.write(f"==== {m}: steps {[round(t['step'], 3) for t in times]}\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60))
            f.write("\n")
            del d, opt, params
    print(open(out).read())
