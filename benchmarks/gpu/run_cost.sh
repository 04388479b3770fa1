#!/usr/bin/env bash
# The cost bench at the paper's setting on one CUDA GPU (issue 29): Faster R-CNN R101 -> R50 on
# synthetic 800 x 1333 images, batch 2, mixed precision (train.amp=true), no-KD (always timed, the
# baseline) + FitNet, ICD, HMKD and HMKD with a frozen decoder. Writes cost.json / cost.md (CUDA step
# times, peak allocated memory, FLOPs, the biggest tensors of each step) under benchmarks/results/gpu/.
# Sized to finish in well under 8 minutes on one H100 (benchmarks/gpu/README.md: the estimate) and
# stopped at LIMIT_S (default 480 s) whatever happens. Never called from the tests.
#
#   benchmarks/gpu/run_cost.sh             # run it (from anywhere; it runs in the repository root)
#   benchmarks/gpu/run_cost.sh --dry-run   # print the command and check the config loads; runs no step
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT (default benchmarks/results/gpu),
# ITERS (20), WARMUP (3), PROFILE_STEPS (3), BIGGEST (8), LIMIT_S (480).
set -euo pipefail
SCRIPT=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$SCRIPT")/../.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CONFIG=configs/coco/cost_800x1333.yaml
OUT=${OUT:-benchmarks/results/gpu}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-3}
PROFILE_STEPS=${PROFILE_STEPS:-3}
BIGGEST=${BIGGEST:-8}
LIMIT_S=${LIMIT_S:-480}
METHODS=(fitnet icd hmkd hmkd:decoder_training=frozen)
# train.lr: random weights (no checkpoints are needed for cost) give distillation losses far larger than
# trained ones, and the preset's lr made the student NaN within three steps, which stops the bench; a
# step's cost does not depend on the learning rate (the same optimiser ops run)
CMD=("$PY" -m hmkd bench cost "$CONFIG" device=cuda train.amp=true train.lr=1e-9 --methods "${METHODS[@]}"
     --iters "$ITERS" --warmup "$WARMUP" --profile-steps "$PROFILE_STEPS" --biggest-tensors "$BIGGEST" --out "$OUT")

case "${1:-}" in
  "" | --dry-run) ;;
  -h | --help) sed -n '2,13p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "run_cost.sh: unknown argument '$1' (run it bare, or with --dry-run or --help)" >&2; exit 2 ;;
esac
[ -f "$CONFIG" ] || { echo "run_cost.sh: $CONFIG is not in this checkout" >&2; exit 2; }

if [ "${1:-}" = --dry-run ]; then
  "$PY" -c 'import sys
from hmkd.config import load_config
c = load_config(sys.argv[1], ["device=cuda", "train.amp=true", "train.lr=1e-9"])
print(f"config {sys.argv[1]}: {c.model.detector} {c.teacher.backbone} -> {c.model.backbone}, batch {c.data.batch_size}, "
      f"{c.model.min_size}x{c.model.max_size}, device {c.device}, amp {c.train.amp}, lr {c.train.lr}")' "$CONFIG"
  echo "would run (stopped after ${LIMIT_S} s): $(printf '%q ' "${CMD[@]}")"
  exit 0
fi

# fail fast, in one line, where there is no CUDA GPU
"$PY" -c 'import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"run_cost.sh: torch cannot be imported ({e})")
if not torch.cuda.is_available():
    sys.exit(f"run_cost.sh: no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); this check needs one")'

mkdir -p "$OUT"
start=$(date +%s)
echo "run_cost.sh: $(printf '%q ' "${CMD[@]}")"
set +e
timeout --signal=INT --kill-after=30 "$LIMIT_S" "${CMD[@]}" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
set -e
wall=$(( $(date +%s) - start ))
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "run_cost.sh: stopped after ${LIMIT_S} s (wall ${wall} s); lower ITERS or PROFILE_STEPS (log: $OUT/log.txt)" >&2
  exit "$rc"
elif [ "$rc" != 0 ]; then
  echo "run_cost.sh: the cost bench failed (exit $rc, wall ${wall} s; log: $OUT/log.txt)" >&2
  exit "$rc"
fi
echo "run_cost.sh: done in ${wall} s; results: $OUT/cost.json, $OUT/cost.md (log: $OUT/log.txt)"
