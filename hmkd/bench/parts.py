"""Where a distiller's loss forward spends its time, read from ``torch.profiler`` on the real code.

HMKD's :meth:`~hmkd.distill.hmkd.HMKDDistiller.distill_losses` marks each of its parts with a
``torch.profiler.record_function`` range named ``hmkd.<part>`` (the parts are
``hmkd.distill.hmkd.PROFILE_PARTS``); ICD marks ``icd.<part>`` (``hmkd.distill.icd.PROFILE_PARTS``).
:func:`profile_parts` runs a few ordinary training steps of such a distiller under
``torch.profiler.profile`` (CPU activity; CUDA too on a GPU), each step inside a
``hmkd_bench.step`` range, and adds up, per step, the time spent inside every range of a part
(a part entered several times in a step, e.g. once per level, counts once with its calls summed).

What it measures is the **forward** time of each part: autograd runs the backward of a part
outside the forward's ranges (after the whole forward, in ``total.backward()``), so a part's
backward cannot be attributed this way. The cost bench reports the backward as one number per
method instead (its backward minus the no-KD backward).

Times per part (seconds, median over the profiled steps; ``*_mean`` the mean): ``cpu_s`` is the
host time inside the part's ranges; on CUDA ``device_s`` is the GPU kernel time launched from
inside them, and ``forward_s`` is the larger of the two (on CPU ``forward_s`` = ``cpu_s``).
``share`` is ``forward_s`` over the profiled step's own time (the ``hmkd_bench.step`` range, so
both carry the profiler's overhead alike). Parts a step does not run (an option turned off, the
decoder task on a step that skips it) count 0 with 0 calls.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["PROFILED_MODULES", "STEP_RANGE", "part_ranges", "profile_parts", "timed_range"]

#: methods whose loss code marks its parts, and the module holding their ``PROFILE_PARTS``
PROFILED_MODULES = {"hmkd": "hmkd.distill.hmkd", "icd": "hmkd.distill.icd"}
#: the range around one profiled training step
STEP_RANGE = "hmkd_bench.step"
_RANGE_PREFIX = "hmkd_bench."


def timed_range(phase: str) -> Any:
    """The profiler range the cost bench puts around one of its timed phases (e.g. ``distill_forward``)."""
    return record_function(_RANGE_PREFIX + phase)


def part_ranges(method: str) -> dict[str, str] | None:
    """``{part: range name}`` of ``method``'s marked parts (``{"masks": "hmkd.masks", ...}``), or
    None when the method marks none."""
    module = PROFILED_MODULES.get(method)
    if module is None:
        return None
    parts = getattr(importlib.import_module(module), "PROFILE_PARTS", None)
    if not parts:
        return None
    prefix = f"{method}."
    return {p[len(prefix):] if p.startswith(prefix) else p: p if p.startswith(prefix) else prefix + p for p in parts}


def _device_us(e: Any) -> float:
    v = getattr(e, "device_time_total", None)
    if v is None:
        v = getattr(e, "cuda_time_total", 0.0)
    return float(v or 0.0)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def _aggregate(events: Iterable[Any], ranges: dict[str, str], cuda: bool) -> dict[str, Any]:
    """Per-step sums of every part's range times (microseconds in, seconds out)."""
    part_of = {r: p for p, r in ranges.items()}
    distill_range = _RANGE_PREFIX + "distill_forward"
    events = list(events)
    steps = sorted((e for e in events if e.name == STEP_RANGE), key=lambda e: e.time_range.start)
    index = {id(e): i for i, e in enumerate(steps)}
    n = len(steps)
    zero = lambda: [0.0] * n  # noqa: E731
    cpu = {p: zero() for p in ranges}
    dev = {p: zero() for p in ranges}
    calls = {p: [0] * n for p in ranges}
    top = zero()  # parts not nested in another part: what the parts cover together
    distill = zero()
    for e in events:
        name = e.name
        if name not in part_of and name != distill_range:
            continue
        step, nested, node = None, False, e.cpu_parent
        while node is not None:
            if node.name in part_of:
                nested = True
            if node.name == STEP_RANGE:
                step = index.get(id(node))
            node = node.cpu_parent
        if step is None:
            continue
        if name == distill_range:
            distill[step] += e.cpu_time_total * 1e-6
            continue
        p = part_of[name]
        cpu[p][step] += e.cpu_time_total * 1e-6
        dev[p][step] += _device_us(e) * 1e-6
        calls[p][step] += 1
        if not nested:
            top[step] += (max(e.cpu_time_total, _device_us(e)) if cuda else e.cpu_time_total) * 1e-6
    step_s = [e.cpu_time_total * 1e-6 for e in steps]
    step_med = _median(step_s)
    parts: dict[str, dict[str, Any]] = {}
    for p in ranges:
        fwd = [max(c, d) for c, d in zip(cpu[p], dev[p])] if cuda else list(cpu[p])
        row: dict[str, Any] = {
            "forward_s": _median(fwd),
            "forward_s_mean": _mean(fwd),
            "cpu_s": _median(cpu[p]),
            "calls": int(statistics.median(calls[p])) if n else 0,
            "share": _median(fwd) / step_med if step_med > 0 else float("nan"),
        }
        if cuda:
            row["device_s"] = _median(dev[p])
        parts[p] = row
    summary = {
        "steps": n,
        "step_s": step_med,
        "distill_forward_s": _median(distill),
        "parts_s": _median(top),
        "unattributed_s": _median([d - t for d, t in zip(distill, top)]),
    }
    return {"parts": parts, "profile": summary}


def profile_parts(
    run_step: Callable[[], Any], ranges: dict[str, str], steps: int, device: torch.device
) -> dict[str, Any]:
    """Run ``run_step()`` ``steps`` times under ``torch.profiler`` and time ``ranges`` (module doc).

    ``run_step`` must finish its device work before it returns (the cost bench's clock
    synchronises CUDA after each phase). Returns ``{"parts": {part: {"forward_s", "forward_s_mean",
    "cpu_s", "calls", "share"[, "device_s"]}}, "profile": {"steps", "step_s", "distill_forward_s",
    "parts_s", "unattributed_s"}}``: ``step_s`` the profiled step (median), ``distill_forward_s``
    the ``distill_losses`` call, ``parts_s`` the time inside any part (nested parts counted once)
    and ``unattributed_s`` the rest of ``distill_losses``.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                run_step()
    return _aggregate(prof.events(), ranges, cuda)
