"""Cross-rank gathering for the losses: what makes N ranks compute the loss of one process.

Contrastive losses need every rank's features as negatives. ``gather_rows`` all-gathers with
gradient (``torch.distributed.nn.functional.all_gather``): the backward pass sums, over ranks, the
gradients that reach each rank's features, and DDP then averages parameter gradients, so the
objective optimised is the mean over ranks of the per-rank losses. Each rank computes the loss of
its own rows against all columns (the "local loss" scheme), scaled so that this mean equals the
single-process loss over the global batch. On one process every function is the identity.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

_local_only = False


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside the block every rank computes its losses alone, as if it were the only process (the
    parity mode ``trainer.sync_grads=false``)."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


def is_distributed() -> bool:
    return not _local_only and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def global_count(n: int, device: torch.device) -> torch.Tensor:
    """Σ over ranks of n, as a float tensor (a fill kernel: no host-to-device copy)."""
    count = torch.full((), float(n), device=device)
    if is_distributed():
        dist.all_reduce(count)
    return count


@torch.no_grad()
def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all ranks (``x`` itself on one process); no gradient."""
    if not is_distributed():
        return x
    total = x.clone()
    dist.all_reduce(total)
    return total / world_size()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, with gradient (all ranks: same shape)."""
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks, its backward the sum of the ranks' gradients (``x`` itself on one process)."""
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(x)


def gather_ragged_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gather a per-rank list of rows whose length differs between ranks.

    Each rank pads to the longest count, gathers with gradient, and gets back
    (rows (W·max, D), valid (W·max,) bool, offset of this rank's first row). Padding rows are
    marked invalid so that no softmax ever sees them.
    """
    if not is_distributed():
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    counts = torch.tensor([x.shape[0]], device=x.device)
    all_counts = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(all_counts, counts)
    all_counts = torch.cat(all_counts).tolist()
    longest = max(all_counts)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    rows = gather_rows(padded)
    valid = torch.zeros(len(all_counts) * longest, dtype=torch.bool, device=x.device)
    for r, n in enumerate(all_counts):
        valid[r * longest : r * longest + n] = True
    return rows, valid, dist.get_rank() * longest
