"""Evaluation: box classification and retrieval, segmentation, zero-shot classification (each an
``Evaluator``, enabled by ``cfg.eval``), their protocols, metrics and the feature maps behind the pictures."""

from fineclip.eval.box_retrieval import evaluate, extract_features
from fineclip.eval.evaluators import build_evaluators, format_metrics, run_evaluators
from fineclip.eval.metrics import box_accuracy, retrieval_recall

__all__ = [
    "box_accuracy",
    "build_evaluators",
    "evaluate",
    "extract_features",
    "format_metrics",
    "retrieval_recall",
    "run_evaluators",
]
