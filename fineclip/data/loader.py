"""The training loader: the one place where the training batches are made.

The trainer sees only ``TrainBatches``: how many optimizer steps an epoch has, a position it can
be set to (epoch, step) for an exact resume, and, from that position, the micro-batches of each
remaining optimizer step of the epoch. ``MapStyleBatches`` implements it for a map-style data set
(``RegionCaptionDataset``) with ``GlobalBatchSampler``; a streamed source (shards) implements the
same three members.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from torch.utils.data import DataLoader, Dataset

from fineclip.data.dataset import collate_regions
from fineclip.data.sampler import GlobalBatchSampler
from fineclip.errors import ImageLoadError

log = logging.getLogger(__name__)

BatchTransform = Callable[[dict, int], dict]  # (micro-batch, epoch) -> micro-batch, e.g. a region source


class TrainBatches(Protocol):
    steps_per_epoch: int  # optimizer steps

    def set_position(self, epoch: int, step: int) -> None:
        """Continue at optimizer step ``step`` (0-based) of ``epoch``, as an uninterrupted run would."""

    def __iter__(self) -> Iterator[list[dict]]:
        """The micro-batches of each remaining optimizer step of the epoch."""


class MapStyleBatches:
    """Micro-batches of ``batch_size`` images per rank, ``accumulate`` of them per optimizer step, in
    an order that depends only on (seed, epoch): the same after a resume. ``transform`` is applied to
    each micro-batch (the method's region source).

    A data set that replaces unreadable samples (shards) names them in each batch's ``skipped``: each is logged and
    counted once, and more than ``max_bad_fraction`` of the data set's samples (on this rank, since the start of the
    process) stops the run with an ``ImageLoadError``."""

    def __init__(self, dataset: Dataset, batch_size: int, accumulate: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 transform: BatchTransform | None = None, max_bad_fraction: float = 0.001) -> None:
        self.max_bad_fraction, self.bad = max_bad_fraction, set()  # names of the unreadable samples met
        self.dataset, self.batch_size, self.accumulate = dataset, batch_size, max(1, int(accumulate))
        self.num_workers, self.pin_memory, self.transform = num_workers, pin_memory, transform
        self.sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch // self.accumulate
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} training images are fewer than one global batch of {batch_size} x "
                             f"{world_size} ranks x {self.accumulate} accumulation steps")
        self.epoch, self.step = 0, 0

    def set_position(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_step=step * self.accumulate)

    def __iter__(self) -> Iterator[list[dict]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.num_workers, collate_fn=collate_regions, pin_memory=self.pin_memory,
                            drop_last=True)
        batches = iter(loader)
        for _ in range(self.step, self.steps_per_epoch):
            group = [self.count_skipped(next(batches)) for _ in range(self.accumulate)]
            if self.transform is not None:
                group = [self.transform(batch, self.epoch) for batch in group]
            yield group

    @property
    def skipped(self) -> int:
        """Distinct unreadable samples met so far."""
        return len(self.bad)

    def count_skipped(self, batch: dict) -> dict:
        for name in batch.pop("skipped", []):
            if name not in self.bad:
                self.bad.add(name)
                log.warning("unreadable sample skipped (%d so far): %s", self.skipped, name)
        if self.skipped > self.max_bad_fraction * len(self.dataset):
            raise ImageLoadError(f"{self.skipped} unreadable samples, over data.max_bad_fraction="
                                 f"{self.max_bad_fraction} of {len(self.dataset)}: check the data (the log names each)")
        return batch
