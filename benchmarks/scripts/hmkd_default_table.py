"""The paper-regime table of issue 29 (HMKD at FitNet's cost): each HMKD reading's runs, 2 seeds, mean +- std,
next to the committed full-map, joint-decoder default and no-KD (benchmarks/results/synth_paper/results.json).

    python benchmarks/scripts/hmkd_default_table.py RUNS_DIR OUT_DIR

RUNS_DIR: the `--out` folder of the `hmkd bench accuracy` calls (its runs/<key>_s<seed>/metrics.json);
OUT_DIR gets accuracy.json and accuracy.md. Runs that are not there are left out of the table."""

from __future__ import annotations

import json
import os
import statistics
import sys

from hmkd.bench.accuracy.store import bbox_metrics

ROWS = [  # (key in RUNS_DIR or "committed:<key>", label)
    ("none", "no-KD (this run)"),
    ("committed:none", "no-KD (committed table)"),
    ("committed:hmkd", "HMKD, previous default: fitted decoder trained jointly, whole map, 2-block 256-ch Inquiry Head (committed)"),
    ("hmkd+decoder-training-frozen", "HMKD, fitted decoder frozen, whole map, 2-block Inquiry Head"),
    ("hmkd+decoder-training-frozen+attention-window-15+inquiry-convs-1+inquiry-channels-64",
     "HMKD, new default: frozen, 15 x 15 window, 1-block 64-ch Inquiry Head"),
]
METRICS = ("mAP", "AP50", "aitod_APvt", "aitod_APt", "aitod_APs", "aitod_APm")
NAMES = {"aitod_APvt": "APvt (<8²)", "aitod_APt": "APt (8²-16²)", "aitod_APs": "APs (16²-32²)", "aitod_APm": "APm (>=32²)"}


def _runs(runs_dir: str, committed: dict, key: str) -> list[dict]:
    out = []
    for seed in (0, 1):
        if key.startswith("committed:"):
            r = committed["runs"].get(f"{key.split(':', 1)[1]}_s{seed}")
            if r:
                out.append({"seed": seed, "bbox": r["bbox"], "sec_per_iter": r.get("sec_per_iter")})
            continue
        path = os.path.join(runs_dir, "runs", f"{key}_s{seed}", "metrics.json")
        if os.path.isfile(path):
            m = json.load(open(path))
            log = [json.loads(line) for line in open(os.path.join(os.path.dirname(path), "log.jsonl")) if line.strip()]
            spi = [r["sec_per_iter"] for r in log if "sec_per_iter" in r]
            out.append({"seed": seed, "bbox": bbox_metrics(m), "sec_per_iter": statistics.median(spi) if spi else None})
    return out


def main(runs_dir: str, out_dir: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    committed = json.load(open(os.path.join(root, "benchmarks", "results", "synth_paper", "results.json")))
    table, rows = [], []
    head = "| row | seeds | " + " | ".join(NAMES.get(m, m) for m in METRICS) + " |"
    table += [head, "|---|---:|" + "---:|" * len(METRICS)]
    for key, label in ROWS:
        runs = _runs(runs_dir, committed, key)
        if not runs:
            continue
        cells, stats = [], {}
        for m in METRICS:
            vals = [r["bbox"][m] for r in runs if r["bbox"].get(m) is not None]
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else None
            stats[m] = {"mean": mean, "std": std, "values": vals}
            cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else ""))
        rows.append({"key": key, "label": label, "seeds": [r["seed"] for r in runs], "metrics": stats, "runs": runs})
        table.append(f"| {label} | {','.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    os.makedirs(out_dir, exist_ok=True)
    json.dump({"rows": rows, "command": " ".join(sys.argv)}, open(os.path.join(out_dir, "accuracy.json"), "w"), indent=1)
    open(os.path.join(out_dir, "accuracy.md"), "w").write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
