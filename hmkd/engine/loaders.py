"""DataLoader helpers shared by training and inference: the seeded training loader, one-line errors
from workers, stopping workers on time, moving a batch to the device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from hmkd.engine.sampler import InfiniteBatchSampler, SeededDataset
from hmkd.engine.signals import worker_init
from hmkd.errors import HMKDError

__all__ = ["close_loader_iter", "next_batch", "seeded_loader", "to_device"]


def seeded_loader(
    dataset: Any,
    batch_size: int,
    *,
    seed: int,
    generator_seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    start_position: int | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of ``dataset`` whose batches are a function of ``seed`` and the position
    only (:class:`~hmkd.engine.sampler.InfiniteBatchSampler`: the order; :class:`~hmkd.engine.sampler.SeededDataset`:
    each sample's augmentation), whatever ``workers`` is; ``start_iter`` / ``start_position`` resume the
    stream. The loader draws from its own generator (``generator_seed``), so making it leaves the global
    random stream alone. The training run and the matching decoder's fit both read their data so."""
    from hmkd.data.transforms import collate_fn

    sampler = InfiniteBatchSampler(len(dataset), batch_size, seed=seed, shuffle=True, rank=rank,
                                   world_size=world_size, start_iter=start_iter, start_position=start_position)
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(generator_seed),
    )


def next_batch(it: Iterator) -> Any:
    """``next(it)`` of a DataLoader iterator, keeping the project's one-line error messages.

    An :class:`~hmkd.errors.HMKDError` raised in a DataLoader worker comes back from torch as the
    same type with the message ``Caught DataError in DataLoader worker process N.`` followed by
    the worker's traceback; it is re-raised with the original one-line message (its last line).
    """
    try:
        return next(it)
    except HMKDError as e:
        msg = str(e)
        if "\n" not in msg:
            raise
        last = msg.rstrip().splitlines()[-1].strip()
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        raise type(e)(last[len(prefix):] if last.startswith(prefix) else last) from None


def close_loader_iter(it: Any) -> None:
    """Stop a DataLoader iterator's worker processes now.

    Left to garbage collection, a multi-process iterator that an exception keeps alive is only
    cleaned up at interpreter exit, where torch does nothing and ``multiprocessing`` stops the
    workers with SIGTERM, which our workers ignore (see :func:`hmkd.engine.signals.worker_init`):
    the process would hang on exit instead of reporting the error.
    """
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A batch's images and the tensors of its targets on ``device`` (non-blocking on CUDA)."""
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets
