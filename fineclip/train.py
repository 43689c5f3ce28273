"""Training entry point: ``python -m fineclip.train [+experiment=NAME] [overrides]``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fineclip.cli import CONFIG_DIR, check_config, exit_on_user_error
from fineclip.data.synthetic import prepare_synthetic
from fineclip.engine import distributed

log = logging.getLogger("fineclip.train")


def shared_run_dir(own_dir: str, dist_info: distributed.DistInfo) -> Path:
    """Rank 0's Hydra output folder, for every rank. Under torchrun each rank composes the config
    itself and a timestamped folder may differ by a second: the others' copy is removed."""
    if not dist_info.enabled:
        return Path(own_dir)
    import torch.distributed as dist

    holder = [own_dir]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] != own_dir and not dist_info.is_main:
        shutil.rmtree(own_dir, ignore_errors=True)
    return Path(holder[0])


def run(cfg: DictConfig) -> dict:
    from fineclip.engine.trainer import train

    check_config(cfg)
    # this rank's GPU is bound before the process group exists (NCCL: one GPU per rank)
    dist_info, _ = distributed.init_distributed(cfg.trainer.device)
    try:
        if dist_info.is_main:
            prepare_synthetic(cfg.data)
        distributed.barrier()
        run_dir = shared_run_dir(HydraConfig.get().runtime.output_dir, dist_info)
        return train(cfg, run_dir, dist_info)
    finally:
        distributed.cleanup()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = exit_on_user_error(lambda: run(cfg), log)
    value = metrics.get("box/top1")
    return value if isinstance(value, float) else None


if __name__ == "__main__":
    main()
