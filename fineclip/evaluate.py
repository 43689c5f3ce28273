"""Evaluation entry point: box classification and retrieval of a checkpoint on a data set.

    python -m fineclip.evaluate checkpoint=runs/<run>/checkpoints/last.pt
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fineclip.data.synthetic import prepare_synthetic
from fineclip.engine.checkpoint import load_checkpoint
from fineclip.train import CONFIG_DIR, USER_ERRORS

log = logging.getLogger("fineclip.evaluate")


def load_model(cfg: DictConfig):
    """The model of a fineclip checkpoint (architecture from its saved config), or ``cfg.model``."""
    if not cfg.checkpoint:
        return instantiate(cfg.model)
    state = load_checkpoint(cfg.checkpoint)
    model_cfg = OmegaConf.create(state["config"]["model"])
    model_cfg.checkpoint = None
    model = instantiate(model_cfg)
    model.load_state_dict(state["model"])
    log.info("loaded %s (epoch %s, step %s)", cfg.checkpoint, state.get("epoch"), state.get("step"))
    return model


def run(cfg: DictConfig) -> dict[str, float]:
    from fineclip.engine.trainer import resolve_device, seed_everything
    from fineclip.eval import evaluate, format_metrics

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    prepare_synthetic(cfg.data)
    model = load_model(cfg).to(device)
    dataset = instantiate(cfg.data.val, image_size=model.image_size[0])
    metrics = evaluate(
        model, dataset, templates=list(cfg.eval.templates), batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers, device=device,
    )
    source = cfg.data.val.get("ann_file") or cfg.data.val.get("panoptic_json")
    print(f"evaluation ({len(dataset)} images of {source}):\n{format_metrics(metrics)}")
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
