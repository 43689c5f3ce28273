"""Open-vocabulary detection (F-ViT) on a frozen fineclip backbone.

    python -m fineclip.detect                                                    # the synthetic split, CPU
    python -m fineclip.detect +detect=ov_coco_b16 backbone.checkpoint=RUN/checkpoints/last.pt data.root=/data/coco
    python -m fineclip.detect ... evaluate_only=true detector=runs/detect/.../checkpoints/last.pt
    torchrun --nproc_per_node 8 -m fineclip.detect +detect=ov_coco_b16 ...
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fineclip.cli import CONFIG_DIR, check_config, exit_on_user_error
from fineclip.data.synthetic import prepare_synthetic
from fineclip.engine import distributed
from fineclip.errors import ConfigError

log = logging.getLogger("fineclip.detect")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    from fineclip.detect.run import evaluate, load_detector, train
    from fineclip.engine.rng import seed_everything

    check_config(cfg)
    dist_info, device = distributed.init_distributed(cfg.device)
    try:
        if dist_info.is_main:
            prepare_synthetic(cfg.data)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # for fineclip.results
        distributed.barrier()
        seed_everything(cfg.seed)
        if cfg.evaluate_only:
            if not cfg.detector_checkpoint:
                raise ConfigError("evaluate_only=true needs detector_checkpoint=<a fineclip.detect checkpoint>")
            detector, split = load_detector(cfg, cfg.detector_checkpoint, device)
            metrics = evaluate(cfg, detector, split, device) if dist_info.is_main else {}
        else:
            metrics = train(cfg, run_dir, dist_info, device)
        if dist_info.is_main:
            (run_dir / "detect.json").write_text(json.dumps(metrics, indent=2))
            print(summary(metrics))
        return metrics
    finally:
        distributed.cleanup()


def summary(metrics: dict) -> str:
    if "detect/mask_apr" in metrics:
        return "detection [{}]: mask AP {:.1f}   APr {:.1f}   APc {:.1f}   APf {:.1f}   (box APr {:.1f})".format(
            *(metrics[k] for k in ("detect/protocol", "detect/mask_ap", "detect/mask_apr", "detect/mask_apc",
                                   "detect/mask_apf", "detect/box_apr")))
    return "detection [{}]: AP50 novel {:.1f}   base {:.1f}   all {:.1f}".format(
        *(metrics[k] for k in ("detect/protocol", "detect/novel_ap50", "detect/base_ap50", "detect/all_ap50")))


@hydra.main(config_path=str(CONFIG_DIR), config_name="detect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg, Path(HydraConfig.get().runtime.output_dir)), log)


if __name__ == "__main__":
    main()
