"""Training entry point: ``python -m fineclip.train [+experiment=NAME] [overrides]``."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fineclip.config_checks import ConfigError, check_required_paths, require_data_root
from fineclip.data import AnnotationError, ImageLoadError
from fineclip.data.synthetic import prepare_synthetic
from fineclip.models import CheckpointError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USER_ERRORS = (ConfigError, AnnotationError, ImageLoadError, CheckpointError, FileNotFoundError)
log = logging.getLogger("fineclip.train")


def shared_run_dir(own_dir: str, dist_info) -> Path:
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


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from fineclip.engine import distributed
    from fineclip.engine.trainer import NonFiniteLossError, train

    on_gpu = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    dist_info = distributed.init_distributed("cuda" if on_gpu else "cpu")
    try:
        check_required_paths(cfg)
        require_data_root(cfg.data)
        if dist_info.is_main:
            prepare_synthetic(cfg.data)
        distributed.barrier()
        run_dir = shared_run_dir(HydraConfig.get().runtime.output_dir, dist_info)
        metrics = train(cfg, run_dir, dist_info)
    except (*USER_ERRORS, NonFiniteLossError) as err:
        log.error("%s", err)
        sys.exit(1)
    finally:
        distributed.cleanup()
    return metrics.get("box/top1")


if __name__ == "__main__":
    main()
