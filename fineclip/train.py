"""Training entry point: ``python -m fineclip.train [+experiment=NAME] [overrides]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fineclip.config_checks import ConfigError, check_required_paths
from fineclip.data import AnnotationError, ImageLoadError
from fineclip.data.synthetic import prepare_synthetic
from fineclip.models import CheckpointError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USER_ERRORS = (ConfigError, AnnotationError, ImageLoadError, CheckpointError, FileNotFoundError)
log = logging.getLogger("fineclip.train")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from fineclip.engine.trainer import train

    try:
        check_required_paths(cfg)
        prepare_synthetic(cfg.data)
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(1)
    return metrics.get("box/top1")


if __name__ == "__main__":
    main()
