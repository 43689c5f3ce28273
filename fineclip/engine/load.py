"""The model to evaluate or draw: a fineclip training checkpoint (its architecture from the config saved
with it), or the configured model with its own ``model.checkpoint`` weights."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fineclip.engine.checkpoint import load_checkpoint
from fineclip.errors import ConfigError
from fineclip.models import FineCLIPModel
from fineclip.models.factory import load_model_weights

log = logging.getLogger(__name__)

# model settings that do not change what the weights compute
MODEL_KEYS_FREE_TO_CHANGE = ("checkpoint", "crop_chunk", "text_cache_dtype", "freeze_patch_embed")
# what a model config written before a key existed meant by leaving it out
MODEL_KEY_DEFAULTS = {"dense_mode": {"_target_": "fineclip.models.dense_modes.ValuePath"}}


def architecture(model_cfg: dict | DictConfig) -> dict:
    """The settings of a model config that decide what its weights compute (older configs completed)."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    return {**MODEL_KEY_DEFAULTS, **{k: v for k, v in model_cfg.items() if k not in MODEL_KEYS_FREE_TO_CHANGE}}


def load_model(cfg: DictConfig, chosen_model: str | None = None) -> tuple[FineCLIPModel, DictConfig]:
    """(model, the model config it was built from) of ``cfg.checkpoint``, else of ``cfg.model``.

    A training checkpoint brings its own model config, which is used. ``chosen_model`` is the model
    the command line chose (``model=NAME``), if any: when it names another architecture than the
    checkpoint's, the contradiction is refused rather than silently resolved.
    """
    if not cfg.checkpoint:
        return instantiate(cfg.model), cfg.model
    state = load_checkpoint(cfg.checkpoint)
    if "config" not in state or "model" not in state:
        raise ConfigError(f"checkpoint={cfg.checkpoint} is not a fineclip training checkpoint (no saved model config):"
                          " for open_clip weights use model=<config> model.checkpoint=<file> instead")
    model_cfg = OmegaConf.create({**MODEL_KEY_DEFAULTS, **state["config"]["model"]})
    model_cfg.checkpoint = None
    if chosen_model is not None and cfg.get("model") is not None:
        check_same_architecture(cfg.model, model_cfg, chosen_model, str(cfg.checkpoint))
    model = instantiate(model_cfg)
    load_model_weights(model, state["model"], str(cfg.checkpoint))
    log.info("loaded %s (epoch %s, step %s; its saved model config: %s)", cfg.checkpoint, state.get("epoch"),
             state.get("global_step"), model_cfg.name)
    return model, model_cfg


def check_same_architecture(chosen: DictConfig, saved: DictConfig, choice: str, checkpoint: str) -> None:
    """Refuse ``model=<choice>`` next to a checkpoint whose saved model differs in architecture."""
    mine, theirs = architecture(chosen), architecture(saved)
    differ = [f"{k}: {theirs.get(k)!r} in the checkpoint, {mine.get(k)!r} in model={choice}"
              for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        raise ConfigError(f"model={choice} contradicts checkpoint={checkpoint}, which holds another model ("
                          + "; ".join(differ) + "). The checkpoint's own model config is what its weights fit: "
                          "leave out model=, or give a checkpoint of that model")


def at_image_size(model: FineCLIPModel, model_cfg: DictConfig, image_size: int) -> FineCLIPModel:
    """The same weights in a model built for ``image_size`` (position embeddings interpolated bicubically)."""
    resized = instantiate(model_cfg, image_size=image_size, checkpoint=None)
    load_model_weights(resized, model.state_dict(), f"{model_cfg.name} at {image_size} px")
    return resized


def chosen_model() -> str | None:
    """The ``model=NAME`` of the command line, if one was given (Hydra's overrides of this run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    for override in HydraConfig.get().overrides.task:
        if override.startswith("model="):
            return override.split("=", 1)[1]
    return None
