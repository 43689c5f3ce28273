"""Evaluation entry point: every enabled evaluator (box classification and retrieval, segmentation,
zero-shot classification) on a checkpoint and a data set.

    python -m fineclip.evaluate checkpoint=runs/<run>/checkpoints/last.pt [data=...] [eval.protocol=...]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from fineclip.cli import CONFIG_DIR, check_config, exit_on_user_error
from fineclip.errors import ConfigError

log = logging.getLogger("fineclip.evaluate")


def run(cfg: DictConfig) -> dict:
    from fineclip.engine.distributed import resolve_device
    from fineclip.engine.load import at_image_size, chosen_model, load_model
    from fineclip.engine.rng import seed_everything
    from fineclip.eval.eval_set import build_eval_set, describe_eval_set
    from fineclip.eval.evaluators import build_evaluators, format_metrics, run_evaluators
    from fineclip.eval.protocols import box_protocol, dense_image_size

    check_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, model_cfg = load_model(cfg, chosen_model())
    model = model.to(device)
    patch = model.tower.patch_size[0]
    size = dense_image_size(box_protocol(cfg), patch)
    dense_model, crop_model = model, None
    if size and size != model.image_size[0]:  # e.g. box_cs: the dense pass at 1024 px, crops at the model's size
        dense_model, crop_model = at_image_size(model, model_cfg, size).to(device), model
    dataset = build_eval_set(cfg, dense_model.image_size[0], patch, crop_size=model.image_size[0])
    if dataset is None:
        if not cfg.data.get("segmentation"):
            raise ConfigError(f"data={cfg.data.get('name', '?')} has no val split to evaluate")
        with open_dict(cfg):  # a segmentation-only data set (ADE20K): its segmentation is the evaluation
            cfg.eval.segmentation = True
    evaluators = build_evaluators(cfg)
    metrics = run_evaluators(evaluators, dense_model, cfg, device, dataset=dataset, crop_model=crop_model)
    what = f"{len(dataset)} images of {describe_eval_set(cfg)}" if dataset is not None else cfg.data.name
    print(f"evaluation ({what}):\n{format_metrics(metrics, evaluators)}")
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg), log)


if __name__ == "__main__":
    main()
