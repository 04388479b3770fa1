"""The benchmark's Markdown table, shaped like the paper's Table 1."""

from __future__ import annotations

from typing import Any

from hmkd.bench.accuracy.plan import AITOD_METRICS, METRICS

__all__ = ["format_table", "stage_lines"]


def _fmt(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def format_table(rows: dict[str, dict[str, Any]], teacher: dict[str, Any] | None, seeds: list[int]) -> str:
    """Markdown shaped like the paper's Table 1: mean ± std, the gain over the student in brackets, cost."""
    head = "| model | " + " | ".join(METRICS) + " | s/iter | x no-KD | peak MB | x no-KD |"
    lines = [head, "|---|" + "---:|" * (len(METRICS) + 4)]
    b_mem = (rows.get("none") or {}).get("peak_mem_mb")

    def mem_cells(mem: float | None) -> str:
        return f" {_fmt(mem, 0)} | {_fmt(mem / b_mem if mem and b_mem else None, 2)} |"

    if teacher is not None:
        tm = teacher.get("metrics") or {}
        backbone = ((teacher.get("config") or {}).get("model") or {}).get("backbone", "")
        if teacher.get("source") == "checkpoint":
            label = f"teacher ({backbone}, checkpoint)"
        else:
            label = f"teacher ({backbone}, {teacher.get('iterations')} it)"
        t_sec, b_sec = teacher.get("sec_per_iter"), (rows.get("none") or {}).get("sec_per_iter")
        ratio = t_sec / b_sec if t_sec and b_sec else None
        lines.append(f"| {label} | " + " | ".join(_fmt(tm.get(k)) for k in METRICS)
                     + f" | {_fmt(t_sec, 2)} | {_fmt(ratio, 2)} |" + mem_cells(teacher.get("peak_mem_mb")))
    def cells_of(key: str, r: dict[str, Any], metrics: tuple[str, ...]) -> list[str]:
        cells = []
        for k in metrics:
            m, s, g = r["mean"].get(k), r["std"].get(k), r["gain"].get(k)
            cell = _fmt(m)
            if s is not None:
                cell += f" ± {s:.1f}"
            if key != "none" and g is not None:
                cell += f" ({g:+.1f})"
            cells.append(cell)
        return cells

    for key, r in rows.items():
        cells = cells_of(key, r, METRICS)
        lines.append(f"| {r['label']} | " + " | ".join(cells)
                     + f" | {_fmt(r['sec_per_iter'], 2)} | {_fmt(r['cost_vs_none'], 2)} |" + mem_cells(r.get("peak_mem_mb")))
    lines.append("")
    lines.append(f"COCO box AP (%) on the val split; mean ± sample std over seeds {seeds} (teacher: one run); "
                 "(+x): gain over the student (no-KD); s/iter: the run's training seconds / iterations; peak MB: "
                 "its peak memory during training (CPU: peak RSS of its own process, VmHWM; CUDA: peak allocated); "
                 "each with its ratio to no-KD.")
    s_iters = next((r.get("iterations") for r in rows.values() if r.get("iterations")), None)
    if teacher is not None and teacher.get("source") == "trained" and s_iters and teacher.get("iterations"):
        lines.append(f"The teacher trained {teacher['iterations'] / s_iters:.3g}x the students' {s_iters} iterations: "
                     "its lead comes from compute (the paper's 3x-vs-1x setting), not only from depth.")
    if any(k in r["mean"] for r in rows.values() for k in AITOD_METRICS):
        lines.append("")
        lines.append("| AI-TOD size buckets | AP | APvt (< 8²) | APt (8²-16²) | APs (16²-32²) | APm (>= 32²) |")
        lines.append("|---|" + "---:|" * len(AITOD_METRICS))
        if teacher is not None:
            tm = teacher.get("metrics") or {}
            lines.append("| teacher | " + " | ".join(_fmt(tm.get(k)) for k in AITOD_METRICS) + " |")
        for key, r in rows.items():
            lines.append(f"| {r['label']} | " + " | ".join(cells_of(key, r, AITOD_METRICS)) + " |")
        lines.append("")
        lines.append("AI-TOD's protocol: box AP (%) by object area in px², at AI-TOD's maxDets (eval.max_dets; a "
                     "detector emits at most model.detections_per_img); mean ± std (gain over no-KD).")
    if rows and teacher is not None:
        lines.append("")
        lines.append("| share of the teacher-student gap closed | mAP | APs |")
        lines.append("|---|---:|---:|")
        for key, r in rows.items():
            if key == "none":
                continue
            cl = r["gap_closed"]
            pct = [("–" if cl.get(k) is None else f"{100 * cl[k]:.0f}%") for k in ("mAP", "APs")]
            lines.append(f"| {r['label']} | {pct[0]} | {pct[1]} |")
    return "\n".join(lines)


def stage_lines(result: dict[str, Any]) -> str:
    """Markdown lines with the wall time of every stage of a benchmark: the pretrained stand-ins, the
    teacher, the student runs (summed over every start of each run, as measured by the benchmark)."""
    def minutes(sec: float | None) -> str:
        return "–" if sec is None else f"{sec / 60:.1f} min"

    lines = ["| stage | wall time |", "|---|---:|"]
    for name, p in (result.get("pretrained") or {}).items():
        lines.append(f"| pretrained stand-in, {name} ({p.get('backbone')}, {p.get('iterations')} it) | "
                     f"{minutes(p.get('wall_seconds'))} |")
    t = result.get("teacher") or {}
    if t.get("source") == "trained":
        lines.append(f"| teacher ({t.get('iterations')} it) | {minutes(t.get('wall_seconds'))} |")
    runs = result.get("runs") or {}
    walls = [r.get("wall_seconds") for r in runs.values()]
    known = [w for w in walls if w is not None]
    lines.append(f"| {len(runs)} student runs (decoder fits included) | {minutes(sum(known) if known else None)}"
                 + (f" ({len(walls) - len(known)} without a record)" if len(known) < len(walls) else "") + " |")
    return "\n".join(lines)
