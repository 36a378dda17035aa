"""Classification metrics shared by training (checkpoint selection) and evaluation."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, recall_score


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Headline and per-class metrics; classes absent from both arrays count as 0, not NaN."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_recall": float(recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for accuracy, macro recall and macro F1 (test-set sampling error).

    All resamples at once: each resample's confusion matrix comes from one offset `bincount`.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n, k = len(y_true), n_classes
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    codes = (y_true * k + y_pred)[rng.integers(0, n, (resamples, n))]
    offsets = (np.arange(resamples) * k * k)[:, None]
    cm = np.bincount((codes + offsets).ravel(), minlength=resamples * k * k).reshape(resamples, k, k).astype(float)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    recall = np.divide(tp, cm.sum(2), out=np.zeros_like(tp), where=cm.sum(2) > 0)
    precision = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    stats = {"accuracy": tp.sum(1) / n, "macro_recall": recall.mean(1), "macro_f1": f1.mean(1)}
    tail = (1 - level) / 2 * 100
    return {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in stats.items()}
