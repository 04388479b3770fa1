"""Deterministic, resumable, shardable training data order.

One global stream of sample positions ``p = 0, 1, 2, ...`` is laid over epochs: position ``p``
is image ``perm_e[p % n]`` of epoch ``e = p // n``, with ``perm_e`` a permutation drawn from a
generator seeded by ``(seed, e)`` (no shuffling: the identity). Iteration ``i`` of a run on
``world_size`` ranks consumes positions ``[i*B*W, (i+1)*B*W)``; rank ``r`` takes the ``B``
positions ``i*B*W + r*B ...`` of them. So

- the order is a function of ``(seed, iteration)`` only: resuming at iteration ``k`` starts at
  position ``k*B*W`` without loading (or even indexing) the samples already consumed;
- the ranks' shards are disjoint and together equal the single-process stream with a ``W``-times
  larger batch (as ``DistributedSampler`` does per epoch, without padding or dropping);
- each sample also carries its own augmentation seed (a hash of ``seed`` and the position), and
  :class:`SeededDataset` draws that sample's random augmentation from it. Augmentation is thus the
  same whatever ``data.workers`` is, whichever process loads the sample, and after a resume.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finaliser chained over ``values``)."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> 31)
    return z & ((1 << 63) - 1)


class InfiniteBatchSampler(Sampler):
    """Yields, forever, this rank's batches of ``(index, augmentation_seed)`` pairs.

    Args:
        size: number of samples in the data set.
        batch_size: per-rank batch size ``B``.
        seed: base seed of the order (and of the per-sample augmentation seeds).
        shuffle: permute each epoch (True) or go in index order.
        rank, world_size: this rank's shard of the global stream.
        start_iter: first iteration to yield (resume): earlier positions are skipped arithmetically.
        start_position: global stream position of ``start_iter`` (default ``start_iter * B * W``);
            a resume passes the number of samples already consumed, so that the stream goes on
            where it stopped even if the number of processes or the batch size changed.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        start_position: int | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError("InfiniteBatchSampler: the data set is empty")
        if batch_size <= 0:
            raise ValueError(f"InfiniteBatchSampler: batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"InfiniteBatchSampler: rank {rank} not in [0, {world_size})")
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iter = int(start_iter)
        self.start_position = (
            int(start_position) if start_position is not None else self.start_iter * self.batch_size * self.world_size
        )
        self._perm_epoch = -1
        self._perm: list[int] = []

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``."""
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(mix_seed(self.seed, epoch, 0x5A3))
                self._perm = torch.randperm(self.size, generator=g).tolist()
            else:
                self._perm = list(range(self.size))
            self._perm_epoch = epoch
        return self._perm

    def positions(self, iteration: int) -> range:
        """Global stream positions this rank reads at ``iteration``."""
        step = (iteration - self.start_iter) * self.world_size + self.rank
        start = self.start_position + step * self.batch_size
        return range(start, start + self.batch_size)

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's ``(index, augmentation_seed)`` pairs of ``iteration``."""
        out = []
        for p in self.positions(iteration):
            epoch, offset = divmod(p, self.size)
            out.append((self.permutation(epoch)[offset], mix_seed(self.seed, p)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start_iter
        while True:
            yield self.batch(it)
            it += 1

    def __len__(self) -> int:  # an infinite stream; DataLoader only needs it for its own __len__
        return 2**62


class SeededDataset(Dataset):
    """Wraps a data set indexed by ``(index, seed)``: the item's transforms draw from ``seed``.

    Python's, NumPy's and torch's CPU generators are seeded for the item and restored after it,
    so loading leaves the caller's random streams untouched, also with ``data.workers = 0``.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    random.seed(seed)
                    np.random.seed(seed % 2**32)
                    return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:  # num_classes, label_to_cat, ... of the inner set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
