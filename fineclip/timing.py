"""Named sections of the training step.

Each section is a ``torch.profiler.record_function`` range (visible in any PyTorch profiler
trace, free otherwise). Inside ``timed_sections`` each section also synchronises the device
before and after itself and adds its wall time to a dict: the per-part split that
``python -m fineclip.benchmark`` reports, measured on the very code path the trainer runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

_totals: dict[str, float] | None = None
_device: torch.device | None = None


def _sync() -> None:
    if _device is not None and _device.type == "cuda":
        torch.cuda.synchronize(_device)


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    with torch.profiler.record_function(f"fineclip/{name}"):
        if _totals is None:
            yield
            return
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            _totals[name] = _totals.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def timed_sections(device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in each section entered inside the block (sections must not nest)."""
    global _totals, _device
    if _totals is not None:
        raise RuntimeError("timed_sections does not nest")
    _totals, _device = {}, torch.device(device)
    try:
        yield _totals
    finally:
        _totals, _device = None, None
