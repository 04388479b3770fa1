"""Cost bench of no-KD, every registered method and the ``hmkd_fast`` prototype in one process.

    python benchmarks/results/cost/run_with_prototype.py CONFIG OUT_DIR [DEVICE] [ITERS] [THREADS]

Same as ``hmkd bench cost CONFIG --out OUT_DIR`` plus the prototypes of
``prototype_hmkd_fast.py`` (imported here so that they register themselves; ``COST_METHODS=a,b``
picks methods), timed on the same batches
and interleaved with the others.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import prototype_hmkd_fast  # noqa: E402,F401  (registers "hmkd_fast")
from hmkd.bench.cost import run_cost_bench  # noqa: E402
from hmkd.config import load_config  # noqa: E402
from hmkd.distill import registry  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_path, out = sys.argv[1], sys.argv[2]
    device = sys.argv[3] if len(sys.argv) > 3 else None
    iters = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    if len(sys.argv) > 5:
        torch.set_num_threads(int(sys.argv[5]))
    registry._load_builtin()
    protos = ["hmkd_fast", "hmkd_fast_cl"]
    only = os.environ.get("COST_METHODS")
    methods = only.split(",") if only else [m for m in registry.METHODS if m not in protos] + protos
    res = run_cost_bench(load_config(cfg_path), methods=methods, out_dir=out, iters=iters, warmup=2, device=device)
    print(res["table"])
