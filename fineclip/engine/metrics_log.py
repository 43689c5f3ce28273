"""Metrics to a json-lines file, TensorBoard and (optionally) Weights & Biases, in the run directory."""

from __future__ import annotations

import json
import os
import resource
import uuid
from numbers import Number
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: allocated CUDA memory on a GPU, the process's peak
    RSS on the CPU (Linux: VmHWM; elsewhere the lifetime peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: each job of a multirun (one process) reports its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


class MetricsLogger:
    """``log(step, {name: value})`` writes one json line (numbers and strings, e.g. the name of an
    evaluation protocol) and the numeric values as scalars to TensorBoard and W&B.

    W&B runs offline unless ``WANDB_MODE`` says otherwise (``WANDB_MODE=online`` to upload); its
    files go to ``<run_dir>/wandb``.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None, name: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard")) if tensorboard else None
        self.wandb_run = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as err:
                raise ImportError("trainer.wandb=true needs Weights & Biases: pip install -e '.[wandb]'") from err
            self.wandb_run = wandb_lib.init(
                project=os.environ.get("WANDB_PROJECT", "fineclip"), name=name or self.run_dir.name,
                dir=str(self.run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                resume="allow", id=_wandb_id(self.run_dir),
            )

    def log(self, step: int, metrics: dict, **extra) -> None:
        record = {"step": step, **extra}
        record.update({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, Number | torch.Tensor)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def log_images(self, step: int, images: dict) -> None:
        """(H, W, 3) uint8 arrays to TensorBoard (and W&B when on), one tag each."""
        if self.writer is not None:
            for tag, image in images.items():
                self.writer.add_image(tag, image, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb as wandb_lib

            self.wandb_run.log({tag: wandb_lib.Image(image) for tag, image in images.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run directory: a resumed run appends to the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
