"""The training loop: one process or DDP, any device, exactly resumable. Built from a Hydra config.

    run = build(cfg)              fineclip.engine.build: method, data, optimizer, schedule
    progress = resume(run)        fineclip.engine.resume: the newest checkpoint, checked against the config
    for each epoch, each step:
        train_step(...)           fineclip.engine.step: forward, losses, backward, update
        log_step(...)             metrics.jsonl, TensorBoard, W&B, progress bar
        save(...)                 atomic checkpoint (every N steps, each epoch, on SIGTERM)
    evaluate                      every trainer.eval_every epochs and at the end (fineclip.eval evaluators)
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fineclip.engine.build import Run, build
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.engine.distributed import DistInfo, all_reduce_sum, barrier
from fineclip.engine.metrics_log import MetricsLogger, peak_memory_gb, reset_peak_memory
from fineclip.engine.resume import Progress, resume, save
from fineclip.engine.step import StepResult, train_step
from fineclip.errors import NonFiniteLossError
from fineclip.eval.evaluators import Evaluator, build_evaluators, format_metrics, run_evaluators
from fineclip.eval.maps import feature_maps
from fineclip.losses.gather import local_only

log = logging.getLogger(__name__)


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption) ask the loop to save and exit.

    After the checkpoint is written, ``hand_over`` calls the handler that was installed before
    (submitit's, which requeues the job) so that a requeued run continues with resume=auto.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def hand_over(self) -> None:
        if not self.signal_name:
            return
        signum = signal.Signals[self.signal_name]
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def log_step(run: Run, progress: Progress, result: StepResult, logger: MetricsLogger | None, bar, throughput):
    """Rank-mean of the loss and each term (the objective is their mean over ranks), lr, logit
    scale, images/s: to the log files and the progress bar."""
    values = torch.stack([result.loss, *result.parts.values()]).float()
    values = (all_reduce_sum(values) / run.dist.world_size).tolist()
    if logger is None:
        return
    metrics = {"train/loss": values[0]}
    metrics.update({f"train/loss_{k}": v for k, v in zip(result.parts, values[1:], strict=True)})
    metrics["train/lr"] = run.optimizer.param_groups[0]["lr"]
    metrics["train/logit_scale"] = run.model.logit_scale.item()
    metrics["train/images_per_s"] = throughput()
    logger.log(progress.step, metrics, epoch=progress.epoch)
    bar.set_postfix(loss=f"{values[0]:.3f}", **{k: f"{v:.3f}" for k, v in zip(result.parts, values[1:], strict=True)},
                    img_s=f"{metrics['train/images_per_s']:.0f}")


class Throughput:
    """Images per second since the last call."""

    def __init__(self) -> None:
        self.images, self.tick = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def __call__(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.tick, 1e-9)
        self.images, self.tick = 0, now
        return rate


def run_epoch(run: Run, progress: Progress, logger: MetricsLogger | None, stop: StopRequest) -> bool:
    """The remaining steps of ``progress.epoch``; False if a stop was requested (after saving)."""
    tcfg = run.cfg.trainer
    steps_per_epoch = run.batches.steps_per_epoch
    bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch + 1}/"
               f"{tcfg.epochs}", disable=not (tcfg.progress and run.dist.is_main), dynamic_ncols=True)
    throughput = Throughput()
    skipped = 0
    run.batches.set_position(progress.epoch, progress.step_in_epoch)
    run.teacher.set_epoch(progress.epoch)
    for micro_batches in run.batches:
        run.scheduler.step_update(progress.step + 1)  # the lr of optimizer step k is schedule(k), k = 1..total
        parity = run.dist.enabled and run.ddp_model is None  # trainer.sync_grads=false
        with local_only() if parity else contextlib.nullcontext():
            result = train_step(run.model, run.loss_fn, run.optimizer, micro_batches, ddp_model=run.ddp_model,
                                scaler=run.scaler, precision=run.precision, grad_clip=tcfg.grad_clip,
                                check_finite=True, teacher=run.teacher, stop_requested=stop.requested)
        if not result.finite:
            message = f"non-finite loss at step {progress.step + 1} (epoch {progress.epoch + 1}); parts: " + ", ".join(
                f"{k}={v.item():.4g}" for k, v in result.parts.items())
            if tcfg.on_nonfinite == "stop":
                raise NonFiniteLossError(message + f"; the last good checkpoint is in {run.run_dir / 'checkpoints'}"
                                         " (continue with trainer.resume=auto, e.g. with a lower lr)")
            skipped += 1
            log.warning("%s: step skipped (%d so far)", message, skipped)
        progress.step += 1
        progress.step_in_epoch += 1
        if result.finite:
            run.teacher.after_step(run.model, progress.step, run.total_steps)
        bar.update(1)
        throughput.add(run.global_batch)
        if result.finite and (progress.step % tcfg.log_every == 0 or progress.step == run.total_steps):
            log_step(run, progress, result, logger, bar, throughput)
        if result.stop_requested:
            bar.close()
            save(run, progress, f"stop requested by {stop.signal_name or 'another rank'}")
            log.warning("stopped by %s at step %d; continue with trainer.resume=auto",
                        stop.signal_name or "another rank", progress.step)
            return False
        if tcfg.checkpoint_every and progress.step % tcfg.checkpoint_every == 0 \
                and progress.step_in_epoch < steps_per_epoch:
            save(run, progress, f"every {tcfg.checkpoint_every} steps")
    bar.close()
    return True


# -- the whole run -----------------------------------------------------------------------------------
def log_feature_maps(run: Run, logger: MetricsLogger, step: int) -> None:
    """The dense-feature panels of the first ``trainer.log_maps`` val images (``feature_maps``), to TensorBoard/W&B."""
    count = int(run.cfg.trainer.get("log_maps", 0))
    if count > 0:
        logger.log_images(step, feature_maps(run.model, run.val_set, count, run.cfg, run.device))


def evaluate_and_log(run: Run, progress: Progress, logger: MetricsLogger, epoch: int,
                     evaluators: list[Evaluator]) -> dict:
    metrics = run_evaluators(evaluators, run.model, run.cfg, run.device, dataset=run.val_set,
                             progress=run.cfg.trainer.progress)
    logger.log(progress.step, {f"val/{k}": v for k, v in metrics.items()}, epoch=epoch)
    log_feature_maps(run, logger, progress.step)
    return metrics


def release_weights(run: Run, progress: Progress) -> None:
    """When the teacher makes the released weights (CLIPSelf's α-ensemble), write them as
    ``checkpoints/ensembled.pt`` and load them into the model for the final evaluation; ``last.pt``
    keeps the student, so the run can still be resumed or extended."""
    weights = run.teacher.final_weights(run.model)
    if weights is None:
        return
    if run.dist.is_main:
        state = {"model": weights, "config": OmegaConf.to_container(run.cfg, resolve=True),
                 "epoch": progress.epoch, "global_step": progress.step}
        path = save_checkpoint(state, run.run_dir / "checkpoints" / "ensembled.pt")
        log.info("released weights (the teacher's ensemble with the student): %s", path)
    run.model.load_state_dict(weights)


def train(cfg: DictConfig, run_dir: str | Path, dist_info: DistInfo | None = None) -> dict:
    """Train as configured; returns the final evaluation metrics (empty without a val set)."""
    run = build(cfg, Path(run_dir), dist_info or DistInfo())
    reset_peak_memory(run.device)  # this run's own peak, also as one job of a multirun
    main, tcfg = run.dist.is_main, cfg.trainer
    progress = resume(run)
    logger = None
    evaluators = build_evaluators(cfg) if main else []
    if main:
        logger = MetricsLogger(run.run_dir, tensorboard=tcfg.tensorboard, wandb=tcfg.get("wandb", False),
                               config=OmegaConf.to_container(cfg, resolve=True), name=cfg.name)
        (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "training %s on %s x%d (%s): %d images, %d steps (%d epochs x %d), batch %d/rank, losses %s",
            cfg.model.name, run.device, run.dist.world_size, run.precision, len(run.train_set), run.total_steps,
            tcfg.epochs, run.batches.steps_per_epoch, cfg.data.batch_size, dict(run.loss_fn.weights),
        )
    stop = StopRequest()
    try:
        while progress.epoch < tcfg.epochs:
            run.model.train()
            first_step, start = progress.step_in_epoch, time.perf_counter()
            if not run_epoch(run, progress, logger, stop):
                if logger is not None:
                    logger.close()
                stop.hand_over()
                return {}
            if main:  # this epoch's step time (scaled up if it was resumed mid-epoch), without eval
                done = max(run.batches.steps_per_epoch - first_step, 1)
                epoch_time = (time.perf_counter() - start) * run.batches.steps_per_epoch / done
                logger.log(progress.step, {"epoch/time_s": epoch_time,
                                           "epoch/peak_memory_gb": peak_memory_gb(run.device)}, epoch=progress.epoch)
            save(run, progress, f"end of epoch {progress.epoch + 1}")
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            eval_now = tcfg.eval_every and progress.epoch % tcfg.eval_every == 0 and progress.epoch < tcfg.epochs
            if main and eval_now and run.val_set is not None:
                evaluate_and_log(run, progress, logger, progress.epoch - 1, evaluators)
            barrier()
    finally:
        stop.restore()

    release_weights(run, progress)
    metrics: dict = {}
    if main and run.val_set is not None:
        metrics = evaluate_and_log(run, progress, logger, tcfg.epochs - 1, evaluators)
        (run.run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nfinal evaluation ({len(run.val_set)} val images):\n{format_metrics(metrics, evaluators)}")
    if main:
        logger.close()
        print(f"run directory: {run.run_dir}")
    barrier()
    return metrics
