"""Process-group set-up and the feature gathering that makes N ranks equal one process.

Contrastive losses need every rank's features as negatives. ``gather_rows`` all-gathers with
gradient (``torch.distributed.nn.functional.all_gather``): the backward pass sums, over ranks, the
gradients that reach each rank's features, and DDP then averages parameter gradients, so the
objective optimised is the mean over ranks of the per-rank losses. Each rank computes the loss of
its own rows against all columns (the "local loss" scheme), scaled so that this mean equals the
single-process loss over the global batch.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_to_torch_env() -> None:
    """Under SLURM with one task per GPU (srun, or Hydra's submitit launcher) and no torchrun, set
    the variables torch.distributed reads from SLURM's: rank, world size, local rank, and the
    first node of the job as the rendezvous host (port derived from the job id)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True,
            check=True,
        ).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun or SLURM describes in the environment; a plain
    ``python -m`` run is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    slurm_to_torch_env()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def global_count(n: int, device: torch.device) -> torch.Tensor:
    """Σ over ranks of n (a float tensor)."""
    return all_reduce_sum(torch.full((), float(n), device=device))  # a fill kernel, no host-to-device copy


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, with gradient (all ranks: same shape)."""
    if not is_distributed():
        return x
    import warnings

    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


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


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
