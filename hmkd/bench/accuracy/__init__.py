"""Accuracy benchmark: every distillation method side by side (the paper's Table 1) and the HMKD
ablations (Tables 5-7), on the same budget and the same seeds, resumable run by run.

What :func:`run_accuracy_bench` does::

    teacher    --teacher CKPT, else cfg.teacher.weights (must exist), else trained once:
               out_dir/runs/teacher  (the teacher config: ``teacher_cfg``, else cfg with
               model := cfg.teacher and train.iters := teacher_iters [3 x cfg.train.iters])
    students   for every method (none fitnet fgd icd hmkd) or ablation variant, for every seed s
               in [cfg.seed, cfg.seed + seeds): cfg with seed := s, distill.method := method,
               trained by hmkd.training.train into out_dir/runs/<key>_s<seed>
               (none: the plain student, no teacher; none_init, when asked for or when the config
               sets distill.init_student: the no-KD student initialised from the teacher's FPN and
               heads, the fair baseline of rows that start so)
    outputs    out_dir/results.json, results.md, results.png
               (an ablation writes results_<ablation>.json/.md/.png, so it can share out_dir
               and reuse the teacher and the no-KD runs of the main benchmark)

Resumable: a run whose ``metrics.json`` says ``finished`` is reused, not retrained; a run that was
killed continues from its ``last_checkpoint.pth``. Each run directory records the config it was
started with (``bench_run.json``); a finished or partial run whose config differs from what the
benchmark would run now is an error (naming the keys), never silently reused or overwritten.

Options per method: ``cfg.distill.options`` apply to ``cfg.distill.method`` only (so
``configs/synth/bench.yaml`` with ``method: hmkd`` sets HMKD's options); every other method runs
with its own defaults, unless ``method_options={"icd": {...}}`` says otherwise. Ablation variants
change one HMKD option on top of those.

Isolation: on one process (no torchrun) each training run is a child process
(``python -c ...``), so that ``peak_mem_mb`` (the peak RSS on CPU, which never decreases within a
process) is each run's own and no run inherits another's memory (the child reads ``VmHWM``, the
peak of its own address space: its ``ru_maxrss`` would start at the benchmark's RSS). Ctrl-C or SIGTERM is passed on as
one SIGTERM: the child finishes its iteration, saves a checkpoint and stops; rerunning the same
command continues. Under torchrun every rank runs the whole plan in-process (training is
collective) and rank 0 writes the files.

Statistics: mean and sample standard deviation (n - 1) over seeds; gain = method mean - no-KD
mean; share of the teacher-student gap closed = (method - student) / (teacher - student) per
metric (None where the teacher does not lead by more than 1e-6). The teacher is one run; on the
synthetic preset it wins by compute (3x the iterations), as in the paper's 3x-vs-1x setting.

Modules, one job each:

    plan      the rows (methods or ablation variants) and the seeds
    spec      each run's config, and the comparison that decides whether a run folder holds it
    store     what a run folder holds, read back (recorded config, finished metrics, costs)
    isolate   training one run in a child process
    runs      train a run or reuse it
    teacher   the teacher: a checkpoint evaluated once, or trained here
    summary   mean/std over seeds, gains, gap closed, costs
    table     the Markdown table
    plot      the figure
    bench     run_accuracy_bench: all of the above in order, and the result files
"""

from hmkd.bench.accuracy.bench import run_accuracy_bench
from hmkd.bench.accuracy.plan import (
    ABLATIONS,
    LABELS,
    METHOD_ORDER,
    METRICS,
    NONE_INIT,
    Variant,
    ablation_variants,
    plan_runs,
)
from hmkd.bench.accuracy.plot import plot_results
from hmkd.bench.accuracy.spec import run_config, run_spec, spec_diff, with_defaults
from hmkd.bench.accuracy.summary import summarise
from hmkd.bench.accuracy.table import format_table

__all__ = [
    "ABLATIONS",
    "LABELS",
    "METHOD_ORDER",
    "METRICS",
    "NONE_INIT",
    "Variant",
    "ablation_variants",
    "format_table",
    "plan_runs",
    "plot_results",
    "run_accuracy_bench",
    "run_config",
    "run_spec",
    "spec_diff",
    "summarise",
    "with_defaults",
]
