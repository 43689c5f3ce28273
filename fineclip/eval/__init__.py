"""Evaluation: box classification (pooled dense box features vs class prompts) and retrieval."""

from fineclip.eval.metrics import box_accuracy, retrieval_recall
from fineclip.eval.prompts import DEFAULT_TEMPLATES, class_embeddings
from fineclip.eval.runner import evaluate, extract_features, format_metrics

__all__ = [
    "DEFAULT_TEMPLATES",
    "box_accuracy",
    "class_embeddings",
    "evaluate",
    "extract_features",
    "format_metrics",
    "retrieval_recall",
]
