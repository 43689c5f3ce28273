"""Evaluation as a list of evaluators, each enabled by config and formatting its own lines.

    evaluators = build_evaluators(cfg)       cfg.eval.evaluators: {name: {_target_, enabled, ...}}
    metrics = run_evaluators(evaluators, model, cfg, device, dataset)
    print(format_metrics(metrics, evaluators))

An evaluator is called with the model, the composed config, the device and the evaluation set of
``build_eval_set`` (None for a data config without a ``val`` split); it returns flat metrics whose
keys start with its own prefix (``box/``, ``retrieval/``, ``seg/``, ``zeroshot/``). A new kind of
evaluation is one new module with an ``Evaluator`` subclass and one entry in ``configs/eval/default.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


class Evaluator:
    """One kind of evaluation. ``enabled``: whether the run performs it (from config)."""

    name = "evaluator"

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)

    def __call__(self, model, cfg: DictConfig, device, dataset=None, crop_model=None, progress: bool = True) -> dict:
        raise NotImplementedError

    def format(self, metrics: dict) -> list[str]:
        """The human-readable lines of this evaluator's metrics (none when they are absent)."""
        return []


def build_evaluators(cfg: DictConfig, force: Sequence[str] = ()) -> list[Evaluator]:
    """The enabled evaluators of ``cfg.eval.evaluators`` (in their order); ``force`` enables some by name."""
    evaluators = []
    for name, node in (cfg.eval.get("evaluators") or {}).items():
        settings = OmegaConf.to_container(node, resolve=True)
        if name in force:
            settings["enabled"] = True
        evaluator = instantiate(settings)
        if evaluator.enabled:
            evaluators.append(evaluator)
    return evaluators


def run_evaluators(evaluators: Sequence[Evaluator], model, cfg: DictConfig, device, dataset=None, crop_model=None,
                   progress: bool = True) -> dict:
    metrics: dict = {}
    for evaluator in evaluators:
        metrics.update(evaluator(model, cfg, device, dataset=dataset, crop_model=crop_model, progress=progress))
    return metrics


def format_metrics(metrics: dict, evaluators: Sequence[Evaluator]) -> str:
    """A short human-readable block of the headline numbers, with the protocols and counts: each
    evaluator's own lines, in order."""
    return "\n".join(line for evaluator in evaluators for line in evaluator.format(metrics))
