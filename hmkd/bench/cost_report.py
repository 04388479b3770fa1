"""The cost bench's Markdown (``cost.md``) and its check of the issue-8 targets."""

from __future__ import annotations

from typing import Any

__all__ = ["PART_GROUPS", "TARGETS", "cost_markdown", "cost_targets"]

#: Issue 8's targets for HMKD against no-KD on the synthetic CPU preset, and issue 16's against the
#: floor (no-KD step + one teacher forward): a fitted, frozen decoder, and one trained jointly.
TARGETS = {"step_ratio": 1.2, "memory_ratio": 1.5, "mask_share": 0.02, "floor_ratio_frozen": 1.05,
           "floor_ratio_joint": 1.15}

#: How HMKD's parts group into the rows the issue asks for.
PART_GROUPS = {
    "masks (fg/bg + small-object)": ["masks"],
    "inquiry head (head, targets, focal loss, candidates)": ["inquiry_head"],
    "decoder + aux task": ["decoder_aux", "decoder_attention"],
    "small-distill (others + small_fg + attention term)": ["others", "small_fg", "attention_term"],
    "GcBlock / background": ["gcblock_bg"],
    "adapters": ["adapters"],
}


def _fmt_ms(s: float) -> str:
    return f"{s * 1000:.0f}" if s >= 0.1 else f"{s * 1000:.1f}"


def _fmt_gflop(g: float) -> str:
    return f"{g:.0f}" if g >= 100 else f"{g:.3g}"


def _flop_parts_table(r: dict[str, Any]) -> list[str]:
    parts = r["gflop_parts"]
    extra = r["gflop_per_step"] - r["gflop_floor"] if "gflop_floor" in r else None
    lines = [
        "",
        f"{r['method']} FLOPs per part (forward + backward of the part's modules, GFLOP per step"
        + (f"; share of the method's {_fmt_gflop(extra)} GFLOP over the floor" if extra is not None else "") + "):",
        "",
        "| part | GFLOP | % of extra over floor |",
        "|---|---:|---:|",
    ]
    for name, g in parts.items():
        share = f"{100 * g / extra:.1f}%" if extra else "-"
        lines.append(f"| {'outside any part (losses, products outside modules)' if name == 'other' else name} "
                     f"| {_fmt_gflop(g)} | {share} |")
    return lines


def _fmt_mb(mb: float) -> str:
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.3g}"


def _tensor_where(t: dict[str, Any]) -> str:
    return t["module"] + (f" (`{t['range']}`)" if t.get("range") else "")


def _tensors_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "| # | MB | shape | dtype | op | module (range) | whose | phase | saved for backward |",
             "|---:|---:|---|---|---|---|---|---|---|"]
    saved = {True: "yes", False: "no", None: "-"}
    for i, t in enumerate(rows, 1):
        lines.append(f"| {i} | {_fmt_mb(t['mb'])} | {'x'.join(map(str, t['shape'])) or 'scalar'} | {t['dtype']} | "
                     f"`{t['op']}` | {_tensor_where(t)} | {t['owner']} | {t['phase']} | "
                     f"{saved[t['saved_for_backward']]} |")
    return lines


def _biggest_tensors(rows: list[dict[str, Any]]) -> list[str]:
    """The biggest tensors of each method's FLOP-counted step: no-KD's whole step, each distilled
    method's own (the whole step's biggest in one line)."""
    base = rows[0]
    lines = ["", f"Biggest tensors of one step (the FLOP-counted one, untimed): each op output's newly allocated "
                 "storage (views and in-place results are not new), the module active when it was made (in the "
                 "backward: its autograd node's), whose it is, and for a forward tensor whether autograd saved it "
                 f"for the backward. {base['method']}, the whole step:"]
    lines += _tensors_table(base["biggest_tensors"])
    for r in rows[1:]:
        if "biggest_method_tensors" not in r:
            continue
        top = r["biggest_tensors"][0] if r["biggest_tensors"] else None
        whole = (f"; the whole step's biggest: {_fmt_mb(top['mb'])} MB, {'x'.join(map(str, top['shape']))} "
                 f"{top['dtype']} ({top['owner']}, `{top['op']}`, {_tensor_where(top)})") if top else ""
        lines += ["", f"{r['method']}, the method's own biggest tensors (outside the student and the teacher{whole}):"]
        lines += _tensors_table(r["biggest_method_tensors"]) if r["biggest_method_tensors"] else ["", "(none)"]
    return lines


def _parts_table(r: dict[str, Any], groups: dict[str, list[str]] | None) -> list[str]:
    parts, prof = r["parts"], r["profile"]
    step = prof["step_s"]
    lines = [
        "",
        f"{r['method']} parts: time inside each part's `torch.profiler` range during {prof['steps']} extra "
        "steps of the real code (forward only, ms, median; share of the profiled step, "
        f"{_fmt_ms(step)} ms):",
        "",
        "| part | forward | calls/step | % of step |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, names: list[str]) -> str:
        f = sum(parts[n]["forward_s"] for n in names)
        c = sum(parts[n]["calls"] for n in names)
        return f"| {label} | {_fmt_ms(f)} | {c} | {100 * f / step:.2f}% |"

    if groups is None:
        groups = {n: [n] for n in parts}
    listed = set()
    for label, names in groups.items():
        names = [n for n in names if n in parts]
        if not names:
            continue
        listed.update(names)
        lines.append(row(label, names))
        if len(names) > 1:
            lines += [row(f"&nbsp;&nbsp;{n}", [n]) for n in names]
    for n in parts:  # a part no group names
        if n not in listed:
            lines.append(row(n, [n]))
    lines.append(f"| distillation forward outside any part | {_fmt_ms(prof['unattributed_s'])} | | "
                 f"{100 * prof['unattributed_s'] / step:.2f}% |")
    lines.append(f"| backward of all parts (extra backward over no-KD, timed steps) | {_fmt_ms(r['extra_backward_s'])} "
                 f"| | {100 * r['extra_backward_s'] / r['step_s']:.2f}% |")
    return lines


def cost_markdown(res: dict[str, Any]) -> str:
    """``cost.md``: the per-method table, the split of the step, each profiled method's parts, the targets."""
    rows = res["methods"]
    base = rows[0]
    lines = [
        f"Training-step cost on `{res['config']}` ({res['machine']['device']}, torch {res['machine']['torch']}, "
        f"{res['machine']['torch_threads']} threads), batch {res['data']['batch_size']}, "
        f"median of {res['iters']} steps after {res['warmup']} warm-up; teacher: {res['teacher']}"
        + ("; mixed precision (train.amp)" if res.get("amp") else "") + ".",
        "",
        "| method | s/step | x no-KD | x floor | GFLOP/step | x no-KD (FLOPs) | x floor (FLOPs) | mean s/step "
        "| x no-KD (mean) | teacher fwd share | peak memory (MB) | x no-KD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-"
        flop_floor = f"{r['gflop_x_floor']:.3f}" if "gflop_x_floor" in r else "-"
        lines.append(
            f"| {r['method']} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | {floor} | "
            f"{_fmt_gflop(r['gflop_per_step'])} | {r['gflop_per_step'] / base['gflop_per_step']:.3f} | {flop_floor} | "
            f"{r['step_s_mean']:.3f} | {r['step_s_mean'] / base['step_s_mean']:.2f} | "
            f"{100 * r['teacher_forward_share']:.1f}% | {r['peak_memory_mb']:.0f} | "
            f"{r['peak_memory_mb'] / max(base['peak_memory_mb'], 1e-9):.2f} |"
        )
    floors = [r["floor_s"] for r in rows if "floor_s" in r]
    if floors:
        f = sorted(floors)[len(floors) // 2]
        lines += ["", f"Floor: the no-KD step plus one frozen teacher forward, the least a teacher-based method can "
                      f"cost: {f:.3f} s = {f / base['step_s']:.2f}x no-KD (median over the methods' own teacher "
                      "forwards); `x floor` is each method's step over its own floor."]
    flop_floors = [r["gflop_floor"] for r in rows if "gflop_floor" in r]
    if flop_floors:
        f = sorted(flop_floors)[len(flop_floors) // 2]
        lines += ["", "FLOPs (machine-independent): one more, untimed step of each method under "
                      "`torch.utils.flop_counter.FlopCounterMode` (forward + backward; matrix products and "
                      "convolutions, the optimiser step counts 0). Floor in FLOPs: no-KD's step plus the teacher forward counted in "
                      f"the method's own step, {_fmt_gflop(f)} GFLOP = {f / base['gflop_per_step']:.3f}x no-KD; "
                      "`x floor (FLOPs)` is each method's step FLOPs over it."]
    lines += [
        "",
        "Split of the step (median seconds): student forward | teacher forward | distillation forward | "
        "backward (extra over no-KD) | optimiser steps",
        "",
        "| method | student fwd | teacher fwd | distill fwd | backward | extra bwd | optimiser |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["phases_s"]
        lines.append(
            f"| {r['method']} | {p['student_forward']:.3f} | {p['teacher_forward']:.3f} | {p['distill_forward']:.3f} | "
            f"{p['backward']:.3f} | {p['backward'] - base['phases_s']['backward']:+.3f} | {p['optimizer']:.3f} |"
        )
    for r in rows:
        if "parts" in r:
            lines += _parts_table(r, PART_GROUPS if r["base_method"] == "hmkd" else None)
        if "gflop_parts" in r:
            lines += _flop_parts_table(r)
    if rows[0].get("biggest_tensors"):
        lines += _biggest_tensors(rows)
    if any("parts" in r for r in rows):
        lines += [
            "",
            "Parts are forward only: autograd runs their backward after the whole forward, outside their "
            "ranges, so the backward is one number per method (its backward minus no-KD's).",
        ]
    t = res.get("targets")
    if t:
        lines += ["", "Issue-8 targets (HMKD against no-KD):", ""]
        for key, label, fmt in (
            ("step_ratio", "HMKD step / no-KD step", "{:.2f}x"),
            ("memory_ratio", "HMKD peak memory / no-KD", "{:.2f}x"),
            ("mask_share", "mask building share of the HMKD step (profiled `hmkd.masks` range)", "{:.2%}"),
        ):
            if key in t:
                v = t[key]
                lines.append(f"- {label}: {fmt.format(v['value'])} (target {'<=' if key != 'mask_share' else '<'} "
                             f"{fmt.format(v['target'])}): {'met' if v['met'] else 'NOT met'}")
        for v in t.get("floor", []):
            lines.append(f"- {v['method']} step / its floor: {v['value']:.2f}x (target <= {v['target']:.2f}x, "
                         f"{v['decoder']} decoder): {'met' if v['met'] else 'NOT met'}")
    calibrated = {r["method"]: r["frozen_norms_calibrated"] for r in rows if r.get("frozen_norms_calibrated")}
    if calibrated:
        lines += ["", "Random weights with frozen batch norms: each untrained frozen norm was given its input's "
                      "statistics on the first batch before the warm-up (the values a step computes, not its cost; "
                      "without it a random deep ResNet's maps blow up): "
                      + ", ".join(f"{m} {n}" for m, n in calibrated.items()) + " norms."]
    scalers = [r for r in rows if "amp_scaler" in r]
    if scalers:
        lines += ["", "Mixed precision: GradScaler scale after the timed steps, extra warm-up steps run until it "
                      "stopped skipping, timed steps it skipped (their optimiser step did not run): "
                      + "; ".join(f"{r['method']} {a['scale']:g}, {a['extra_warmup_steps']}, {a['timed_skipped_steps']}"
                                  for r in scalers for a in [r["amp_scaler"]]) + "."]
    lines += [
        "",
        f"Peak memory: {rows[0]['memory_method']}; it counts the method's models (the teacher for KD methods), "
        "optimiser state and activations. Load average at start/end: "
        f"{res['loadavg_start']} / {res['loadavg_end']} (timings on a shared machine are noisy).",
    ]
    return "\n".join(lines) + "\n"


def cost_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue-8 targets for plain ``hmkd`` against no-KD (the first row); ``{}`` without an hmkd row."""
    base = rows[0]
    hm = next((r for r in rows if r["method"] == "hmkd"), None)
    if hm is None:
        return {}
    out: dict[str, Any] = {}
    v = hm["step_s"] / base["step_s"]
    out["step_ratio"] = {"value": v, "target": TARGETS["step_ratio"], "met": v <= TARGETS["step_ratio"]}
    v = hm["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9)
    out["memory_ratio"] = {"value": v, "target": TARGETS["memory_ratio"], "met": v <= TARGETS["memory_ratio"]}
    if "parts" in hm and "masks" in hm["parts"]:
        v = hm["parts"]["masks"]["share"]
        out["mask_share"] = {"value": v, "target": TARGETS["mask_share"], "met": v < TARGETS["mask_share"]}
    # issue 16: every HMKD row (plain or variant) against its floor; frozen decoders have the tighter target
    floor = []
    for r in rows:
        if r.get("base_method") != "hmkd" or "floor_ratio" not in r:
            continue
        frozen = (r.get("options") or {}).get("decoder_training") == "frozen"
        target = TARGETS["floor_ratio_frozen" if frozen else "floor_ratio_joint"]
        floor.append({"method": r["method"], "value": r["floor_ratio"], "target": target,
                      "decoder": "frozen" if frozen else "jointly trained", "met": r["floor_ratio"] <= target})
    if floor:
        out["floor"] = floor
    return out
