"""Evaluation entry point: box classification and retrieval of a checkpoint on a data set.

    python -m fineclip.evaluate checkpoint=runs/<run>/checkpoints/last.pt [data=...] [eval.protocol=...]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fineclip.cli import CONFIG_DIR, ConfigError, check_config, exit_on_user_error
from fineclip.engine.checkpoint import load_checkpoint

log = logging.getLogger("fineclip.evaluate")


def load_model(cfg: DictConfig):
    """The model of a fineclip checkpoint (architecture from its saved config) or ``cfg.model``
    (with its own ``checkpoint``, if any), and the model config it was built from."""
    from fineclip.models.factory import load_model_weights

    if not cfg.checkpoint:
        return instantiate(cfg.model), cfg.model
    state = load_checkpoint(cfg.checkpoint)
    model_cfg = OmegaConf.create(state["config"]["model"])
    model_cfg.checkpoint = None
    model = instantiate(model_cfg)
    load_model_weights(model, state["model"], str(cfg.checkpoint))
    log.info("loaded %s (epoch %s, step %s)", cfg.checkpoint, state.get("epoch"), state.get("global_step"))
    return model, model_cfg


def at_image_size(model, model_cfg: DictConfig, image_size: int):
    """The same weights in a model built for ``image_size`` (position embeddings interpolated bicubically)."""
    from fineclip.models.factory import load_model_weights

    resized = instantiate(model_cfg, image_size=image_size, checkpoint=None)
    load_model_weights(resized, model.state_dict(), f"{model_cfg.name} at {image_size} px")
    return resized


def run(cfg: DictConfig) -> dict:
    from fineclip.engine.distributed import resolve_device
    from fineclip.engine.trainer import seed_everything
    from fineclip.eval import format_metrics
    from fineclip.eval.protocols import box_protocol, dense_image_size
    from fineclip.eval.runner import (
        build_eval_set,
        describe_eval_set,
        evaluate_from_config,
        segmentation_from_config,
    )

    check_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, model_cfg = load_model(cfg)
    model = model.to(device)
    patch = model.tower.patch_size[0]
    size = dense_image_size(box_protocol(cfg), patch)
    dense_model, crop_model = model, None
    if size and size != model.image_size[0]:  # e.g. box_cs: the dense pass at 1024 px, crops at the model's size
        dense_model, crop_model = at_image_size(model, model_cfg, size).to(device), model
    dataset = build_eval_set(cfg, dense_model.image_size[0], patch, crop_size=model.image_size[0])
    if dataset is not None:
        metrics = evaluate_from_config(dense_model, dataset, cfg, device, crop_model=crop_model)
        print(f"evaluation ({len(dataset)} images of {describe_eval_set(cfg)}):\n{format_metrics(metrics)}")
    elif cfg.data.get("segmentation"):  # a segmentation-only data set (ADE20K)
        metrics = segmentation_from_config(model, cfg, device)
        print(f"evaluation of {cfg.data.name}:\n{format_metrics(metrics)}")
    else:
        raise ConfigError(f"data={cfg.data.get('name', '?')} has no val split to evaluate")
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg), log)


if __name__ == "__main__":
    main()
