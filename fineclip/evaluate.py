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

from fineclip.config_checks import ConfigError
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
    from fineclip.eval import format_metrics
    from fineclip.eval.runner import build_eval_set, describe_eval_set, evaluate_from_config

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = load_model(cfg).to(device)
    dataset = build_eval_set(cfg, model.image_size[0])
    if dataset is None:
        raise ConfigError(f"data={cfg.data.get('name', '?')} has no val split to evaluate")
    metrics = evaluate_from_config(model, dataset, cfg, device)
    print(f"evaluation ({len(dataset)} images of {describe_eval_set(cfg)}):\n{format_metrics(metrics)}")
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
