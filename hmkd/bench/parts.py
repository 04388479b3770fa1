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

**FLOPs** (:func:`count_step_flops`): one whole training step (forward, backward, optimiser step)
under ``torch.utils.flop_counter.FlopCounterMode``, which counts the shape-based FLOPs of the
matrix products and convolutions (an op without a formula counts 0: element-wise ops, norms,
softmax, the losses' reductions; the optimiser's ``_foreach`` updates and the clipping norm count 0
too, so the optimiser phase reads 0 FLOPs), and attributes each op to the modules active when it
ran. In the forward that attribution is exact (module hooks). **Its backward attribution is not**:
``FlopCounterMode``'s module tracker enters a module's backward when the gradient of its output
arrives and leaves it only once the gradient of its input is complete, so the backward of every
other consumer of that input in between is counted to it too, and a module none of whose inputs
needs a gradient (a projection of the detached teacher maps, an embedding of labels) is never left
until the backward ends (measured on the tiny test config: HMKD's decoder ``value_proj``, a 64->16
``Linear``, was given 1.26 GFLOP, the rest of the step's backward). So :func:`count_step_flops`
also records, for every autograd node the step's forward creates, the modules active when it was
created, and while the backward runs that node it sets the tracker's active modules to those: a
module's backward FLOPs (its input and weight gradients) are attributed to the module itself, as
its forward ones are.
"""

from __future__ import annotations

import importlib
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FLOP_PARTS", "PROFILED_MODULES", "STEP_RANGE", "count_step_flops", "part_ranges", "profile_parts",
           "timed_range"]

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


# ------------------------------------------------------------------------------------ FLOPs
#: The FLOP parts of a method's step: ``(part, module patterns)`` relative to the distiller
#: (``*`` is one path segment). An op belongs to the first part one of whose patterns matches one
#: of the modules active when it ran (in the backward: when its autograd node was created).
FLOP_PARTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "hmkd": (
        # the decoder's own forward is only called for HMKD's no-grad distillation attention pass
        ("decoder_attention", ("decoders.*",)),
        ("decoder_kv", ("decoders.*.key_proj", "decoders.*.value_proj", "decoders.*.pos_proj")),
        # the rest of the decoder: the aux task's inquiry encoder, attention layer and predictor
        ("decoder_aux", ("decoders.*.*",)),
        ("inquiry_head", ("inquiry_heads.*",)),
        ("value_proj", ("value_proj.*",)),
        ("adapters", ("adapters.*",)),
        ("gcblock_bg", ("gc.*", "gc_t.*")),
    ),
    "icd": (
        ("decoder_kv", ("decoder.key_proj", "decoder.value_proj", "decoder.pos_proj")),
        # the rest of the decoder: the aux task and the distillation attention's query projection
        ("decoder_aux", ("decoder.*",)),
        ("value_proj", ("value_proj",)),
    ),
}
_PHASE_AFTER = {"forward": "backward", "backward": "optimizer"}


class _StepFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also keeps each op's FLOPs by (step phase, active modules)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.phase = "forward"
        self.by_owner: dict[tuple[str, frozenset[str]], int] = defaultdict(int)

    def mark(self, phase: str) -> None:
        """``train_step``'s clock: the phase that just ended."""
        self.phase = _PHASE_AFTER.get(phase, self.phase)

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            self.by_owner[(self.phase, frozenset(self.mod_tracker.parents))] += int(formula(*args, **kwargs,
                                                                                            out_val=out))
        return super()._count_flops(func_packet, out, args, kwargs)


class _BackwardOwners(TorchFunctionMode):
    """Records the active modules of every autograd node the forward creates; when the backward
    runs the node, the counter's tracker is set to them (module doc)."""

    def __init__(self, counter: _StepFlopCounter) -> None:
        super().__init__()
        self.counter = counter
        self.owners: dict[Any, frozenset[str]] = {}
        self.handles: list[Any] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled() and not self.counter.mod_tracker.is_bw:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            nodes = [t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            if nodes:
                self._own(nodes, frozenset(self.counter.mod_tracker.parents))
        return out

    def _own(self, nodes: list[Any], owner: frozenset[str]) -> None:
        # the new nodes: from the outputs' back to the nodes already owned (a composite op makes several)
        while nodes:
            node = nodes.pop()
            if node is None or node in self.owners or node.name() == "torch::autograd::AccumulateGrad":
                continue
            self.owners[node] = owner
            self.handles.append(node.register_prehook(self._enter(owner)))
            nodes.extend(n for n, _ in node.next_functions)

    def _enter(self, owner: frozenset[str]) -> Callable:
        def hook(grad_outputs: Any) -> None:
            self.counter.mod_tracker.parents = set(owner)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.owners.clear()


def _matches(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return len(path) == len(pattern) and all(q in ("*", p) for p, q in zip(path, pattern))


def count_step_flops(run_step: Callable[[Callable[[str], None]], Any], distiller: nn.Module,
                     parts: Iterable[tuple[str, tuple[str, ...]]] | None = None) -> dict[str, Any]:
    """Count the FLOPs of one training step, ``run_step(clock)`` (``clock`` is ``train_step``'s, to
    tell forward, backward and optimiser apart), of ``distiller`` (module doc).

    Returns GFLOPs (1e9 FLOPs; a multiply-add counts 2): ``{"gflop_per_step", "gflop_phases":
    {"forward", "backward", "optimizer"}, "gflop_split": {"student": the student detector's forward
    and backward, "teacher_forward": the teacher trunk's (modules outside the distiller: it is not
    a sub-module), "method": the distiller's other FLOPs, "outside": ops outside the distiller, e.g.
    the optimiser's}}``, plus with ``parts`` (:data:`FLOP_PARTS`) ``"gflop_parts"``: each part's
    forward + backward FLOPs and ``other``, the method's FLOPs in no part (the distillation losses,
    the products computed outside any module).
    """
    root = type(distiller).__name__  # the tracker names the first module called (the distiller) by its class
    counter = _StepFlopCounter()
    owners = _BackwardOwners(counter)
    try:
        with counter, owners:
            run_step(counter.mark)
    finally:
        owners.close()
    rules = [(name, [tuple(p.split(".")) for p in pats]) for name, pats in (parts or ())]
    phases = {"forward": 0, "backward": 0, "optimizer": 0}
    split = {"student": 0, "teacher_forward": 0, "method": 0, "outside": 0}
    part_flops = {name: 0 for name, _ in rules}
    part_flops["other"] = 0
    prefix = root + "."
    for (phase, active), n in counter.by_owner.items():
        phases[phase] += n
        inside = [tuple(a[len(prefix):].split(".")) for a in active if a.startswith(prefix)]
        if any(a != "Global" and a != root and not a.startswith(prefix) for a in active):
            split["teacher_forward"] += n
        elif any(path[0] == "student" for path in inside):
            split["student"] += n
        elif root in active:
            split["method"] += n
            part = next((name for name, pats in rules if any(_matches(path, q) for path in inside for q in pats)),
                        "other")
            part_flops[part] += n
        else:
            split["outside"] += n
    total = counter.get_total_flops()
    g = 1e-9
    out: dict[str, Any] = {
        "gflop_per_step": total * g,
        "gflop_phases": {k: v * g for k, v in phases.items()},
        "gflop_split": {k: v * g for k, v in split.items()},
    }
    if rules:
        out["gflop_parts"] = {k: v * g for k, v in part_flops.items()}
    return out
