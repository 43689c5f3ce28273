"""Checks on a composed config that turn a missing path into one clear message."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to set."""


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


def require_data_root(data_cfg: DictConfig, key: str = "data") -> None:
    """A data config with a ``root`` key needs it set: its paths are built from it."""
    if "root" in data_cfg and data_cfg.get("root") in (None, "", "???"):
        raise ConfigError(f"{key}.root is not set: give the local folder of this data set, e.g. {key}.root=/data/coco "
                          "(what it must hold is written at the top of its configs/data/*.yaml)")
