"""Atomic checkpoint files, loaded with ``weights_only=True``, and the search for the newest good one."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fineclip.errors import CheckpointError

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to a temp file in the same folder, fsync it, then rename over ``path``:
    a crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err


def save_step_checkpoint(state: dict[str, Any], folder: str | Path, step: int, keep: int = 2) -> Path:
    """Save ``step_NNNNNNNN.pt``, point ``last.pt`` at it (atomically; a hard link when possible),
    and delete all but the newest ``keep`` step files (``keep`` <= 0 keeps all)."""
    folder = Path(folder)
    path = save_checkpoint(state, folder / f"step_{step:08d}.pt")
    tmp = folder / ".last.pt.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        save_checkpoint(state, tmp)
    os.replace(tmp, folder / "last.pt")
    if keep > 0:
        for old in step_checkpoints(folder)[keep:]:
            old.unlink()
    return path


def step_checkpoints(folder: str | Path) -> list[Path]:
    """The ``step_*.pt`` files of ``folder``, newest first."""
    files = [p for p in Path(folder).glob("step_*.pt") if STEP_FILE.search(p.name)]
    return sorted(files, key=lambda p: int(STEP_FILE.search(p.name).group(1)), reverse=True)


def load_latest_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable step checkpoint; unreadable ones are reported and passed over."""
    for path in step_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; falling back to an older checkpoint", err)
    return None
