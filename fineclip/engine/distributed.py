"""Process-group life cycle: ranks from torchrun or SLURM, the device of each rank, barriers.

The gathers the losses need live in ``fineclip.losses.gather``.
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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" is this rank's GPU when there is one, else the CPU. A CUDA device is made the
    current device of the process (``torch.cuda.set_device``) before anything else touches CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Bind this rank's device, then join the process group that torchrun or SLURM describes in
    the environment. A plain ``python -m`` run is rank 0 of 1.

    The order matters with NCCL: the local GPU is selected first and handed to
    ``init_process_group`` (``device_id``), so that every later barrier and broadcast of rank r
    runs on GPU r, never all on GPU 0.
    """
    slurm_to_torch_env()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device
    if world_size <= 1:
        return DistInfo(), device
    if device.type == "cuda":
        dist.init_process_group(backend="nccl", timeout=datetime.timedelta(minutes=30), device_id=device)
    else:
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device


def in_process_group() -> bool:
    """True when ranks run together (also in parity mode, whose losses are local but whose step
    flags, logs and checkpoints still go through the group)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if in_process_group():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if in_process_group():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
