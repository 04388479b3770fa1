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
its forward ones are. It records the ``record_function`` ranges open then too (it follows the
ranges' enter/exit ops through the dispatch mode), so a part of :data:`FLOP_PARTS` can also be
named by the method's range (HMKD's decoder attention pass runs the decoder's ``attention``
method, not its ``forward``: only the range tells its products from the aux task's).

**Biggest tensors** (``count_step_flops(..., biggest=n)``): the same counted step also keeps the
``n`` biggest tensors it creates (forward, backward and optimiser step), read from the counter's
own ``TorchDispatchMode``: every aten op's outputs pass through it with the module tracker (and,
in the backward, the autograd-node owners above) already telling whose they are, so recording them
costs one size comparison per op and no step of its own; the step is untimed, so the timed numbers
cannot change. A tensor's size is its storage's bytes; an op's output that shares storage with one
of its inputs (a view, an in-place op) is not a new tensor and is skipped. Each is reported with its
shape, dtype, MB (2**20 bytes), the aten op that made it, the deepest module active then (relative
to the distiller; the teacher trunk, not a sub-module of it, by the tracker's class-based name),
the innermost ``record_function`` range open then (``hmkd.<part>`` above, or the bench's own
``hmkd_bench.<phase>``; in the backward: the range its autograd node was created in), whose it is
(``student``, ``teacher``, ``method``: the distiller's own modules and loss code, ``outside``: e.g.
the optimiser), the phase, and for a forward tensor whether autograd saved it for the backward
(read once at the end of the forward from the saved tensors the graph's nodes expose, ``_saved_*``
or a Python Function's ``saved_tensors``, compared by storage; the recorded forward tensors are
held until then, so a storage address cannot be reused in between: at most ``2 n`` extra tensors,
in the untimed step only). Two lists: the whole step's ``n`` biggest, and the ``n`` biggest of the
method's own (what the distillation adds beside the student's and teacher's maps).
"""

from __future__ import annotations

import heapq
import importlib
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
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
#: The FLOP parts of a method's step: ``(part, patterns)``: module paths relative to the distiller
#: (``*`` is one path segment) or, written ``@name``, a ``record_function`` range of the method's
#: (for code outside any module of the part's, e.g. the attention products of a decoder method
#: called as a method, not through ``forward``). An op belongs to the first part one of whose
#: patterns matches one of the modules active, or one of the ranges open, when it ran (in the
#: backward: when its autograd node was created).
FLOP_PARTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "hmkd": (
        # the key/value pass over the teacher map (or the windows' cells), wherever it runs
        ("decoder_kv", ("decoders.*.key_proj", "decoders.*.value_proj", "decoders.*.pos_proj")),
        # HMKD's no-grad distillation attention pass (the decoder's attention method, its inquiries)
        ("decoder_attention", ("@hmkd.decoder_attention", "decoders.*")),
        # the rest of the decoder: the aux task's inquiry encoder, attention layer and predictor
        ("decoder_aux", ("@hmkd.decoder_aux", "decoders.*.*")),
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
_RANGE_ENTER = torch.ops.profiler._record_function_enter_new
_RANGE_EXIT = torch.ops.profiler._record_function_exit


def _whose(active: Iterable[str], root: str) -> tuple[str, list[tuple[str, ...]]]:
    """Whose an op is, from the modules active when it ran (the tracker names the distiller by its
    class, ``root``): ``teacher_forward`` (a module outside the distiller: the teacher trunk is not
    a sub-module), ``student``, ``method`` (the distiller's own) or ``outside``; and the active
    paths inside the distiller, relative to it."""
    prefix = root + "."
    inside = [tuple(a[len(prefix):].split(".")) for a in active if a.startswith(prefix)]
    if any(a != "Global" and a != root and not a.startswith(prefix) for a in active):
        return "teacher_forward", inside
    if any(path[0] == "student" for path in inside):
        return "student", inside
    if root in active:
        return "method", inside
    return "outside", inside


_OWNER_NAMES = {"teacher_forward": "teacher", "student": "student", "method": "method", "outside": "outside"}


class _Made:
    """One tensor a step created (see the module doc)."""

    __slots__ = ("nbytes", "seq", "ptr", "tensor", "row")

    def __init__(self, nbytes: int, seq: int, ptr: int, tensor: torch.Tensor | None, row: dict[str, Any]) -> None:
        self.nbytes, self.seq, self.ptr, self.tensor, self.row = nbytes, seq, ptr, tensor, row

    def key(self) -> tuple[int, int]:  # bigger first; of equal ones the earlier
        return self.nbytes, -self.seq


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of ``t``'s storage; None for a tensor without one (sparse, subclass)."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class _BiggestTensors:
    """The ``n`` biggest tensors a step creates, and the ``n`` biggest of the method's own (module doc)."""

    def __init__(self, n: int, root: str) -> None:
        self.n = n
        self.root = root
        self.step: list[tuple[tuple[int, int], _Made]] = []  # min-heaps on _Made.key
        self.method: list[tuple[tuple[int, int], _Made]] = []
        self.seq = 0
        self._saved_names: dict[type, list[str]] = {}

    def _floor(self, heap: list) -> int:
        return heap[0][0][0] if len(heap) >= self.n else 0

    @staticmethod
    def _push(heap: list, n: int, made: _Made) -> None:
        item = (made.key(), made)  # keys differ (seq): _Made is never compared
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)

    def record(self, func_packet: Any, out: Any, args: Any, kwargs: Any, phase: str, active: set[str],
               where: str | None) -> None:
        if out is None:
            return
        step_floor, method_floor = self._floor(self.step), self._floor(self.method)
        inputs: set[int] | None = None
        whose: tuple[str, list[tuple[str, ...]]] | None = None
        for t in _tensors(out):
            self.seq += 1
            st = _storage(t)
            if st is None or st[1] <= min(step_floor, method_floor):
                continue
            if whose is None:
                whose = _whose(active, self.root)
            owner, inside = whose
            if st[1] <= step_floor and owner != "method":
                continue
            if inputs is None:  # an output sharing an input's storage is a view or in-place: not new
                inputs = {s[0] for x in (*_tensors(args), *_tensors(list((kwargs or {}).values())))
                          if (s := _storage(x)) is not None}
            if st[0] in inputs:
                continue
            if inside:
                module = ".".join(max(inside, key=len))
            else:
                outer = [a for a in active if a != "Global"]
                module = max(outer, key=lambda a: a.count(".")) if outer else "-"
            row = {"mb": st[1] / 2**20, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                   "op": str(func_packet), "module": module, "range": where, "owner": _OWNER_NAMES[owner],
                   "phase": phase, "saved_for_backward": None}
            made = _Made(st[1], self.seq, st[0], t if phase == "forward" else None, row)
            self._push(self.step, self.n, made)
            if owner == "method":
                self._push(self.method, self.n, made)

    def mark_saved(self, nodes: Iterable[Any]) -> None:
        """At the end of the forward: which recorded forward tensors the graph ``nodes`` saved."""
        saved: set[int] = set()
        for node in nodes:
            names = self._saved_names.get(type(node))
            if names is None:
                # built-in nodes expose each saved tensor as _saved_<name>; a Python Function's, saved_tensors
                names = self._saved_names[type(node)] = [a for a in dir(node)
                                                         if a.startswith("_saved_") or a == "saved_tensors"]
            for a in names:
                try:
                    value = getattr(node, a)
                except RuntimeError:  # already freed
                    continue
                saved.update(s[0] for t in _tensors(value) if (s := _storage(t)) is not None)
        for heap in (self.step, self.method):
            for _, made in heap:
                if made.tensor is not None:
                    made.row["saved_for_backward"] = made.ptr in saved
                    made.tensor = None

    def rows(self, which: str) -> list[dict[str, Any]]:
        heap = self.step if which == "step" else self.method
        return [m.row for _, m in sorted(heap, key=lambda item: item[0], reverse=True)]

    def close(self) -> None:
        for heap in (self.step, self.method):
            for _, made in heap:
                made.tensor = None


class _StepFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also keeps each op's FLOPs by (step phase, active modules, open
    ``record_function`` ranges), and, given a ``biggest`` recorder, the biggest tensors the ops create."""

    def __init__(self, biggest: _BiggestTensors | None = None) -> None:
        super().__init__(display=False)
        self.phase = "forward"
        self.by_owner: dict[tuple[str, frozenset[str], tuple[str, ...]], int] = defaultdict(int)
        self.biggest = biggest
        self.ranges: list[str] = []  # the open record_function ranges (forward), outermost first
        self.backward_ranges: tuple[str, ...] = ()  # in the backward: those its node was created in

    def ranges_now(self) -> tuple[str, ...]:
        """The open ``record_function`` ranges, outermost first (in the backward: those of the node running)."""
        if self.mod_tracker.is_bw:
            return self.backward_ranges
        return tuple(self.ranges)

    def _follow_ranges(self, func_packet: Any, args: Any) -> None:
        # ranges are context managers: they close in the reverse order they opened (the handle the
        # exit op gets is not the same Python object as the one the enter op returned)
        if func_packet is _RANGE_ENTER:
            self.ranges.append(str(args[0]))
        elif func_packet is _RANGE_EXIT and self.ranges:
            self.ranges.pop()

    def mark(self, phase: str) -> None:
        """``train_step``'s clock: the phase that just ended."""
        self.phase = _PHASE_AFTER.get(phase, self.phase)

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        self._follow_ranges(func_packet, args)
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            key = (self.phase, frozenset(self.mod_tracker.parents), self.ranges_now())
            self.by_owner[key] += int(formula(*args, **kwargs, out_val=out))
        if self.biggest is not None:
            ranges = self.ranges_now()
            self.biggest.record(func_packet, out, args, kwargs, self.phase, self.mod_tracker.parents,
                                ranges[-1] if ranges else None)
        return super()._count_flops(func_packet, out, args, kwargs)


class _BackwardOwners(TorchFunctionMode):
    """Records the active modules (and ``record_function`` range) of every autograd node the
    forward creates; when the backward runs the node, the counter's tracker is set to them (module doc)."""

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
                self._own(nodes, frozenset(self.counter.mod_tracker.parents), self.counter.ranges_now())
        return out

    def _own(self, nodes: list[Any], owner: frozenset[str], where: tuple[str, ...]) -> None:
        # the new nodes: from the outputs' back to the nodes already owned (a composite op makes several)
        while nodes:
            node = nodes.pop()
            if node is None or node in self.owners or node.name() == "torch::autograd::AccumulateGrad":
                continue
            self.owners[node] = owner
            self.handles.append(node.register_prehook(self._enter(owner, where)))
            nodes.extend(n for n, _ in node.next_functions)

    def _enter(self, owner: frozenset[str], where: tuple[str, ...]) -> Callable:
        def hook(grad_outputs: Any) -> None:
            self.counter.mod_tracker.parents = set(owner)
            self.counter.backward_ranges = where

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.owners.clear()


def _matches(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return len(path) == len(pattern) and all(q in ("*", p) for p, q in zip(path, pattern))


def count_step_flops(run_step: Callable[[Callable[[str], None]], Any], distiller: nn.Module,
                     parts: Iterable[tuple[str, tuple[str, ...]]] | None = None, *,
                     biggest: int = 0) -> dict[str, Any]:
    """Count the FLOPs of one training step, ``run_step(clock)`` (``clock`` is ``train_step``'s, to
    tell forward, backward and optimiser apart), of ``distiller`` (module doc).

    Returns GFLOPs (1e9 FLOPs; a multiply-add counts 2): ``{"gflop_per_step", "gflop_phases":
    {"forward", "backward", "optimizer"}, "gflop_split": {"student": the student detector's forward
    and backward, "teacher_forward": the teacher trunk's (modules outside the distiller: it is not
    a sub-module), "method": the distiller's other FLOPs, "outside": ops outside the distiller, e.g.
    the optimiser's}}``, plus with ``parts`` (:data:`FLOP_PARTS`) ``"gflop_parts"``: each part's
    forward + backward FLOPs and ``other``, the method's FLOPs in no part (the distillation losses,
    the products computed outside any module). With ``biggest > 0`` also ``"biggest_tensors"`` and
    ``"biggest_method_tensors"``: the step's ``biggest`` biggest tensors and the method's own, biggest
    first, each ``{"mb", "shape", "dtype", "op", "module", "owner", "phase", "saved_for_backward"}``
    (module doc).
    """
    root = type(distiller).__name__  # the tracker names the first module called (the distiller) by its class
    recorder = _BiggestTensors(biggest, root) if biggest > 0 else None
    counter = _StepFlopCounter(recorder)
    owners = _BackwardOwners(counter)

    def clock(phase: str) -> None:
        if recorder is not None and phase == "forward":  # the graph is whole: what it saved for backward
            recorder.mark_saved(list(owners.owners))
        counter.mark(phase)

    try:
        with counter, owners:
            run_step(clock)
    finally:
        owners.close()
        if recorder is not None:
            recorder.close()
    rules = [(name, [tuple(p.split(".")) for p in pats if not p.startswith("@")],
              {p[1:] for p in pats if p.startswith("@")}) for name, pats in (parts or ())]
    phases = {"forward": 0, "backward": 0, "optimizer": 0}
    split = {"student": 0, "teacher_forward": 0, "method": 0, "outside": 0}
    part_flops = {name: 0 for name, _, _ in rules}
    part_flops["other"] = 0
    for (phase, active, ranges), n in counter.by_owner.items():
        phases[phase] += n
        whose, inside = _whose(active, root)
        split[whose] += n
        if whose == "method":
            part = next((name for name, pats, named in rules
                         if named.intersection(ranges) or any(_matches(path, q) for path in inside for q in pats)),
                        "other")
            part_flops[part] += n
    total = counter.get_total_flops()
    g = 1e-9
    out: dict[str, Any] = {
        "gflop_per_step": total * g,
        "gflop_phases": {k: v * g for k, v in phases.items()},
        "gflop_split": {k: v * g for k, v in split.items()},
    }
    if rules:
        out["gflop_parts"] = {k: v * g for k, v in part_flops.items()}
    if recorder is not None:
        out["biggest_tensors"] = recorder.rows("step")
        out["biggest_method_tensors"] = recorder.rows("method")
    return out
