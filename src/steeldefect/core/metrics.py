"""Classification metrics and their aggregation over fold models, in percent.

Every number in a run's tables comes from here: validation metrics in the grid, test metrics of the
Keras and LiteRT models, and the mean ± std over the K fold models that the report prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score

METRIC_NAMES = ("accuracy", "precision_macro", "recall_macro")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall (percent), per-class recall and the confusion matrix."""
    class_ids = list(range(n_classes))
    return {
        "accuracy": 100.0 * accuracy_score(y_true, y_pred),
        "precision_macro": 100.0 * precision_score(y_true, y_pred, labels=class_ids, average="macro", zero_division=0),
        "recall_macro": 100.0 * recall_score(y_true, y_pred, labels=class_ids, average="macro", zero_division=0),
        "recall_per_class": [
            100.0 * r for r in recall_score(y_true, y_pred, labels=class_ids, average=None, zero_division=0)
        ],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=class_ids).tolist(),
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population std (numpy's default, as the reference's np.std) over fold models."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std())}


def aggregate(per_model: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std of each headline metric (and of each class's recall) over fold models, and how
    many models that is."""
    out: dict[str, Any] = {name: mean_std([m[name] for m in per_model]) for name in METRIC_NAMES}
    if per_model and all("recall_per_class" in m for m in per_model):
        # The rarest or hardest class is where a plant's model fails first: its recall, per class.
        out["recall_per_class"] = [mean_std(values) for values in zip(*(m["recall_per_class"] for m in per_model))]
    out["n_models"] = len(per_model)
    return out
