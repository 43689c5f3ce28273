"""A shuffling sampler that shards each global batch across ranks and can start mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[int]):
    """Indices for this rank, in the order its DataLoader (batch size ``batch_size``) consumes them.

    Each epoch is a permutation seeded by (seed, epoch), cut into global batches of
    ``batch_size × world_size`` images (the incomplete last one dropped); rank r takes the r-th
    slice of every global batch. So N ranks see exactly the samples of one process with an N-times
    larger batch, in the same order, and ``start_step`` skips the steps a resumed run has done.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            yield from order[start : start + self.batch_size].tolist()
