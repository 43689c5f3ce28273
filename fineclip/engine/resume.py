"""Checkpoints of a run and continuing from them: the position (epoch, step), the weights, the
optimizer, the scaler, the teacher and every rank's RNG state, checked against the current config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fineclip.engine.build import Run
from fineclip.engine.checkpoint import load_checkpoint, load_latest_checkpoint, save_step_checkpoint
from fineclip.engine.distributed import barrier
from fineclip.engine.load import architecture
from fineclip.engine.rng import rng_states, set_rng_states
from fineclip.errors import ResumeError

log = logging.getLogger(__name__)


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps done


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def check_resumable(state: dict, run: Run) -> list[str]:
    """Raise ``ResumeError`` where the current config cannot continue the checkpoint (another
    model, another global batch); return the other settings that changed, as 'key: old -> new'."""
    saved = state.get("config") or {}
    current = OmegaConf.to_container(run.cfg, resolve=True)
    old_model, new_model = architecture(saved.get("model", {})), architecture(current["model"])
    if old_model != new_model:
        diff = [f"model.{k}: {old_model.get(k)!r} -> {new_model.get(k)!r}"
                for k in sorted(set(old_model) | set(new_model)) if old_model.get(k) != new_model.get(k)]
        raise ResumeError("the checkpoint was trained with another model, which this run cannot continue ("
                          + "; ".join(diff) + "); start a new run directory or set trainer.resume=null")
    old_global = state.get("global_batch")
    if old_global is None:  # checkpoints written before global_batch was stored
        old_global = saved["data"]["batch_size"] * len(state["rng"]) * saved["trainer"].get("accumulate_steps", 1)
    if old_global != run.global_batch:
        raise ResumeError(
            f"the checkpoint was trained with a global batch of {old_global} images per optimizer step, this run has "
            f"{run.global_batch} (data.batch_size={run.cfg.data.batch_size} x {run.dist.world_size} ranks x "
            f"{run.accumulate} accumulation steps): the data order and the position inside the epoch would not "
            "carry over. Keep the global batch, or start a new run directory"
        )
    old, new = _flatten(saved), _flatten(current)
    ignored = ("trainer.resume",)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(ignored)]


def find_resume_state(run_dir: Path, resume: str | None) -> tuple[Path, dict] | None:
    """``resume``: null (start fresh), "auto" (newest good checkpoint of the run, if any), or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = load_latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
        return found
    return Path(resume), load_checkpoint(resume)


def resume(run: Run) -> Progress:
    """Load the checkpoint that ``trainer.resume`` names into the built run. What depends on the
    config (the lr schedule, the optimizer's hyperparameters, the number of epochs) comes from the
    *current* config; the weights, optimizer moments, scaler, RNG states and position come from
    the checkpoint."""
    found = find_resume_state(run.run_dir, run.cfg.trainer.resume)
    if found is None:
        return Progress()
    path, state = found
    changes = check_resumable(state, run)
    run.model.load_state_dict(state["model"])
    current_hyper = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise ResumeError(f"the optimizer state of {path} does not fit this run ({err}): the trainable parameters "
                          "differ (another loss configuration or model.freeze_text?)") from err
    for group, hyper in zip(run.optimizer.param_groups, current_hyper, strict=True):
        group.update(hyper)
    run.scaler.load_state_dict(state["scaler"])
    if state.get("teacher"):
        run.teacher.load_state_dict(state["teacher"])
    set_rng_states(state["rng"][min(run.dist.rank, len(state["rng"]) - 1)])
    progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"])
    if progress.step_in_epoch >= run.batches.steps_per_epoch:
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    if run.dist.is_main:
        log.info("resuming from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
        if changes:
            log.warning("resuming with a changed config (the schedule follows the new one, %d steps in all): %s",
                        run.total_steps, "; ".join(changes))
    return progress


def save(run: Run, progress: Progress, reason: str) -> None:
    """Every rank's RNG state to rank 0, which writes the checkpoint atomically; all ranks wait."""
    rngs = [None] * run.dist.world_size
    if run.dist.enabled:
        torch.distributed.all_gather_object(rngs, rng_states())
    else:
        rngs = [rng_states()]
    if run.dist.is_main:
        state = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "teacher": run.teacher.state_dict(),
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "global_step": progress.step,
            "global_batch": run.global_batch,
            "rng": rngs,
            "config": OmegaConf.to_container(run.cfg, resolve=True),
        }
        folder = run.run_dir / "checkpoints"
        path = save_step_checkpoint(state, folder, progress.step, keep=run.cfg.trainer.keep_checkpoints)
        log.info("saved %s (%s)", path, reason)
    barrier()
