"""What the command-line entry points share: the config folder, the checks that turn a config
that cannot run into one clear message, and the errors reported without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from fineclip.errors import ConfigError, user_error_in

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
T = TypeVar("T")


def check_required_paths(cfg: DictConfig) -> None:
    """Every key in ``cfg.required_paths`` must be set and point to an existing file or folder."""
    problems = []
    for key, meaning in (cfg.get("required_paths") or {}).items():
        value = OmegaConf.select(cfg, key, default=None)
        if value in (None, "", "???"):
            problems.append(f"  {key}=<path>   not given: {meaning}")
        elif not Path(str(value)).exists():
            problems.append(f"  {key}={value}   does not exist: {meaning}")
    if problems:
        name = cfg.get("name", "this experiment")
        raise ConfigError(f"{name} needs these paths:\n" + "\n".join(problems) + "\nset them on the command line, e.g. "
                          + " ".join(f"{k}=/path" for k in cfg.required_paths))


def require_data_root(data_cfg: DictConfig | None, key: str = "data") -> None:
    """A data config with a ``root`` key needs it set: its paths are built from it."""
    if data_cfg is not None and "root" in data_cfg and data_cfg.get("root") in (None, "", "???"):
        raise ConfigError(f"{key}.root is not set: give the local folder of this data set, e.g. {key}.root=/data/coco "
                          "(what it must hold is written at the top of its configs/data/*.yaml)")


def check_config(cfg: DictConfig) -> None:
    """All start-up checks of a composed train/evaluate config, before anything is built."""
    check_required_paths(cfg)
    require_data_root(cfg.data)
    if cfg.get("eval") is not None:
        require_data_root(cfg.eval.get("benchmark"), "eval.benchmark")


def exit_on_user_error(run: Callable[[], T], log: logging.Logger) -> T:
    """``run()``; a user error is logged as one message (no traceback) and exits with status 1."""
    try:
        return run()
    except Exception as err:
        found = user_error_in(err)
        if found is None:
            raise
        log.error("%s", found)
        sys.exit(1)
