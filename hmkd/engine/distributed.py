"""Multi-process training helpers (torchrun / DDP).

``torchrun --nproc_per_node=N -m hmkd train CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_distributed`
reads them and joins the process group (NCCL when training on CUDA, gloo on CPU). Without those
variables everything here degrades to single-process no-ops, so the same trainer code runs both.

What is synchronised and how:

- the student is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (gradients
  averaged during backward); the teacher never is (it is frozen and each rank holds a copy);
- the distiller's own trainable modules (adapters, GcBlocks, the matching decoder ...) are not in
  DDP: their initial values are broadcast from rank 0 (:func:`broadcast_module`) and their gradients
  averaged after backward by :func:`allreduce_gradients`, which treats a missing gradient as zeros
  and leaves it ``None`` only when no rank has one (so an optimiser skips it exactly as it would in
  a single process);
- the training sampler shards one global index stream (see :class:`InfiniteBatchSampler`);
- evaluation runs each rank on its shard and gathers the detections with ``all_gather_object``
  (:func:`gather_unique_detections`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from hmkd.errors import ConfigError

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device, and whether it is rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # this call created the process group (and should destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available (use device=cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes (env vars), or return a single-process context.

    On CUDA each rank uses ``cuda:LOCAL_RANK`` and NCCL; on CPU gloo. An already initialised group
    (e.g. a caller that set one up) is reused and left for the caller to destroy.
    """
    dev = resolve_device(device)
    world = env_world_size()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=dev)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                "use --nproc_per_node <= the GPU count"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        created = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        initialized_here=created,
    )


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_gather_object(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(ctx: DistContext, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the other ranks (e.g. building a data set that is
    generated on first use: rank 0 writes it, the others read it)."""
    if ctx.is_main:
        out = fn()
    barrier(ctx)
    if not ctx.is_main:
        out = fn()
    return out


def broadcast_module(ctx: DistContext, module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (in place)."""
    if not ctx.distributed:
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers())]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def allreduce_gradients(ctx: DistContext, params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks (those outside DDP: distiller modules).

    A rank without a gradient for a parameter contributes zeros; when no rank has one the
    gradient stays ``None``. One flattened all-reduce carries the values and the has-grad flags.
    """
    if not ctx.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in by_dtype.items():
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in group], dtype=dtype, device=device)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group] + [flags]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flags = flat[-len(group):]
        offset = 0
        for p, flag in zip(group, flags.tolist()):
            n = p.numel()
            if flag > 0:
                g = flat[offset : offset + n].view_as(p).div_(ctx.world_size)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n


def all_reduce_flags(ctx: DistContext, *flags: bool) -> list[bool]:
    """Logical OR of each flag over ranks (one small all-reduce)."""
    if not ctx.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def gather_unique_detections(image_ids: list[int], results: list[dict]) -> tuple[list[int], list[dict]]:
    """All-gather ``(image ids, COCO results)`` over the default process group and keep each image's
    results from the first rank that had it (a padded sampler repeats images). Rank order; a
    no-op in a single process."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return image_ids, results
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (image_ids, results))
    seen: set[int] = set()
    all_ids: list[int] = []
    all_results: list[dict] = []
    for ids, res in parts:
        new = [i for i in dict.fromkeys(ids) if i not in seen]
        new_set = set(new)
        all_ids.extend(new)
        all_results.extend(r for r in res if r["image_id"] in new_set)
        seen.update(new)
    return all_ids, all_results
