"""Classification metrics shared by training (checkpoint selection), evaluation and the gate.

Pure numpy/scikit-learn, no I/O. Label-based metrics come from the confusion matrix, in numpy, with scikit-learn's
formulas to the bit (tests/test_metrics.py compares them): importing sklearn.metrics costs a process about a second,
and training (every epoch's validation) and export need only these. Score-based ones (ROC-AUC, PR-AUC, their curves)
use scikit-learn, imported by the functions that need it; expected calibration error is numpy. Test-set sampling
error: percentile bootstrap intervals, all resamples at once (one offset `bincount` gives every resample's confusion
matrix), and paired comparisons of two models on the same images (paired bootstrap of a metric difference,
McNemar's exact and mid-p test for accuracy).
"""

from __future__ import annotations

import numpy as np

# Which way is better, per headline metric (the gate and the champion comparison read this).
DIRECTION = {
    "accuracy": "higher", "balanced_accuracy": "higher", "macro_precision": "higher", "macro_recall": "higher",
    "macro_f1": "higher", "roc_auc": "higher", "pr_auc": "higher", "ece": "lower",
}
# Metrics a paired comparison of two models can resample (label-based, plus ECE from the scores).
PAIRED_METRICS = ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "ece")
ECE_BINS = 15


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Headline and per-class metrics; classes absent from both arrays count as 0, not NaN.

    The numbers of scikit-learn's `precision_recall_fscore_support(labels=range(k), zero_division=0)`,
    `accuracy_score` and macro `recall_score` / `f1_score`, computed as they compute them
    (F1 = 2 TP / (true + predicted)).
    `balanced_accuracy` is scikit-learn's: mean recall over the classes present in `y_true`;
    `macro_recall` averages over every class in `classes` (an absent class counts as 0).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    cm = confusion(y_true, y_pred, len(classes))
    tp, support, predicted = np.diagonal(cm), cm.sum(1), cm.sum(0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:  # 0 where the denominator is 0 (zero_division=0)
        return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)

    tp_, support_, predicted_ = tp.astype(float), support.astype(float), predicted.astype(float)
    precision, recall, f1 = ratio(tp_, predicted_), ratio(tp_, support_), ratio(2.0 * tp_, support_ + predicted_)
    present = support > 0
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_precision": float(precision.mean()) if len(classes) else 0.0,
        "macro_recall": float(recall.mean()) if len(classes) else 0.0,
        "macro_f1": float(f1.mean()) if len(classes) else 0.0,
        "n": int(len(y_true)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(k, k) counts: row = true class, column = predicted class (scikit-learn's `confusion_matrix` layout)."""
    codes = np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)
    return np.bincount(codes.ravel(), minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def positive_index(classes: list[str], positive_class: str | None) -> int | None:
    """Index of the binary task's positive class: the named one, or the second in sorted order.

    None for more than two classes (score metrics are then one-vs-rest macro averages)."""
    if len(classes) != 2:
        return None
    if positive_class is None:
        return classes.index(sorted(classes)[1])
    if positive_class not in classes:
        raise ValueError(f"gates.positive_class '{positive_class}' is not one of the classes {classes}")
    return classes.index(positive_class)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - mean confidence| per equal-width bin of the top probability, weighted by the
    bin's share of images (bins (0, 1/B], (1/B, 2/B], ... (1 - 1/B, 1])."""
    probs, y_true = np.asarray(probs, dtype=float), np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    conf, correct = probs.max(1), (probs.argmax(1) == y_true).astype(float)
    return float(_ece_resampled(conf, correct, np.arange(len(y_true))[None, :], bins)[0])


def _ece_resampled(conf: np.ndarray, correct: np.ndarray, idx: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """ECE of each row of resample indices `idx` (R, n) at once."""
    r, n = idx.shape
    b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    codes = (b[idx] + (np.arange(r) * bins)[:, None]).ravel()
    gap = np.bincount(codes, weights=(correct - conf)[idx].ravel(), minlength=r * bins).reshape(r, bins)
    return np.abs(gap).sum(1) / n


def _binary_scores(is_pos: np.ndarray, score: np.ndarray) -> tuple[float | None, float | None]:
    """(ROC-AUC, average precision) of one-vs-rest scores; None where undefined (one class only)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    has_pos, has_neg = bool(is_pos.any()), bool((~is_pos).any())
    roc = float(roc_auc_score(is_pos, score)) if has_pos and has_neg else None
    ap = float(average_precision_score(is_pos, score)) if has_pos else None
    return roc, ap


def score_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], positive: int | None) -> dict:
    """ROC-AUC and PR-AUC (average precision) and ECE from the probabilities.

    Binary (`positive` given): the positive class's scores. More classes: one-vs-rest per class,
    macro-averaged over the classes where the score is defined (a class with no test images has no
    ROC-AUC; `None` is reported, never NaN). ECE: 15 equal-width bins over the top probability.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    per_class = {}
    for i, c in enumerate(classes):
        roc, ap = _binary_scores(y_true == i, probs[:, i]) if len(y_true) else (None, None)
        per_class[c] = {"roc_auc": roc, "pr_auc": ap}
    if positive is not None:
        roc_auc, pr_auc = per_class[classes[positive]]["roc_auc"], per_class[classes[positive]]["pr_auc"]
        averaging = f"binary, positive class '{classes[positive]}'"
    else:
        rocs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]
        aps = [v["pr_auc"] for v in per_class.values() if v["pr_auc"] is not None]
        roc_auc = float(np.mean(rocs)) if rocs else None
        pr_auc = float(np.mean(aps)) if aps else None
        averaging = "one-vs-rest, macro average over classes with test images"
    return {"roc_auc": roc_auc, "pr_auc": pr_auc, "ece": expected_calibration_error(probs, y_true),
            "score_averaging": averaging, "per_class_scores": per_class}


def curves(y_true: np.ndarray, probs: np.ndarray, positive: int | None) -> tuple[dict, dict, str]:
    """ROC (fpr, tpr) and PR (recall, precision) curve points for DVC plots.

    Binary: the positive class. More classes: micro-average (every one-vs-rest decision pooled), so
    one curve describes the model; the PNG shows each class too."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    if positive is not None:
        is_pos, score, label = y_true == positive, probs[:, positive], "positive class"
    else:
        onehot = np.eye(probs.shape[1], dtype=bool)[y_true]
        is_pos, score, label = onehot.ravel(), probs.ravel(), "micro-average, one-vs-rest"
    if not is_pos.any() or is_pos.all():
        return {"fpr": [], "tpr": [], "threshold": []}, {"recall": [], "precision": [], "threshold": []}, label
    fpr, tpr, t_roc = roc_curve(is_pos, score)
    precision, recall, t_pr = precision_recall_curve(is_pos, score)
    roc = {"fpr": fpr, "tpr": tpr, "threshold": np.minimum(t_roc, 1.0)}  # sklearn's first threshold is inf
    pr = {"recall": recall, "precision": precision, "threshold": np.append(t_pr, 1.0)}
    return roc, pr, label


# ---- sampling error -------------------------------------------------------------------------


def _resampled_confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Confusion matrices (R, k, k) of the resamples `idx` (R, n)."""
    r = len(idx)
    codes = (y_true * k + y_pred)[idx] + (np.arange(r) * k * k)[:, None]
    return np.bincount(codes.ravel(), minlength=r * k * k).reshape(r, k, k).astype(float)


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Label-based metrics of each confusion matrix in a stack (R, k, k), as classification_metrics."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    actual, predicted = cm.sum(2), cm.sum(1)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = actual > 0
    return {
        "accuracy": tp.sum(1) / cm.sum((1, 2)),
        "balanced_accuracy": np.divide((recall * present).sum(1), present.sum(1), out=np.zeros(len(cm)),
                                       where=present.sum(1) > 0),
        "macro_recall": recall.mean(1),
        "macro_f1": f1.mean(1),
        "recall": recall,
    }


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0, classes: list[str] | None = None) -> dict:
    """Percentile bootstrap intervals for accuracy, balanced accuracy, macro recall and macro F1, and
    (with `classes`) each class's recall under `per_class_recall` (test-set sampling error)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {}
    stats = _from_confusion(_resampled_confusion(y_true, y_pred, n_classes, _resample_indices(len(y_true), resamples, seed)))
    out = {name: _interval(stats[name], level) for name in ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1")}
    if classes is not None:
        out["per_class_recall"] = {c: _interval(stats["recall"][:, i], level) for i, c in enumerate(classes)}
    return out


def resampled_metric(metric: str, y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray,
                     probs: np.ndarray | None = None) -> np.ndarray:
    """`metric` on each resample `idx` (R, n); ECE needs `probs`."""
    if metric == "ece":
        if probs is None:
            raise ValueError("ECE needs the probabilities")
        probs = np.asarray(probs, dtype=float)
        return _ece_resampled(probs.max(1), (probs.argmax(1) == y_true).astype(float), idx)
    if metric not in PAIRED_METRICS:
        raise ValueError(f"cannot resample '{metric}'; one of {', '.join(PAIRED_METRICS)}")
    return _from_confusion(_resampled_confusion(y_true, y_pred, k, idx))[metric]


def paired_bootstrap(metric: str, y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, k: int,
                     probs_a: np.ndarray | None = None, probs_b: np.ndarray | None = None, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Difference metric(a) - metric(b) of two models scored on the same images, resampling images
    (the same resample for both, so what they share cancels). `p_value`: two-sided, twice the
    smaller share of resampled differences on either side of zero (1.0 when they never differ)."""
    y_true, pred_a, pred_b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    n = len(y_true)
    if n == 0:
        return {"delta": 0.0, "ci": [0.0, 0.0], "p_value": 1.0, "resamples": 0}
    full = np.arange(n)[None, :]
    delta = float(resampled_metric(metric, y_true, pred_a, k, full, probs_a)[0]
                  - resampled_metric(metric, y_true, pred_b, k, full, probs_b)[0])
    idx = _resample_indices(n, resamples, seed)
    d = resampled_metric(metric, y_true, pred_a, k, idx, probs_a) - resampled_metric(metric, y_true, pred_b, k, idx, probs_b)
    d = np.round(d, 12)  # float noise must not count as a difference
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {"delta": delta, "ci": _interval(d, level), "p_value": p, "resamples": resamples}


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """McNemar's test of equal accuracy for paired predictions: exact binomial and mid-p (two-sided).

    `a_only`: images only a gets right; `b_only`: only b. With no discordant images p = 1."""
    from scipy.stats import binom

    y_true = np.asarray(y_true)
    right_a, right_b = np.asarray(pred_a) == y_true, np.asarray(pred_b) == y_true
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    m, low = a_only + b_only, min(a_only, b_only)
    if m == 0:
        return {"a_only": 0, "b_only": 0, "p_exact": 1.0, "p_mid": 1.0}
    tail = float(binom.cdf(low, m, 0.5))
    p_exact, p_mid = min(1.0, 2 * tail), min(1.0, 2 * tail - float(binom.pmf(low, m, 0.5)))
    return {"a_only": a_only, "b_only": b_only, "p_exact": p_exact, "p_mid": p_mid}


def evaluation_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], positive_class: str | None = None,
                       resamples: int = 1000) -> dict:
    """Everything the evaluate stage reports from test labels and probabilities (pure): label-based
    and score-based metrics, the confusion matrix and 95% bootstrap CIs of the headline metrics."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    positive = positive_index(classes, positive_class)
    metrics = classification_metrics(y_true, y_pred, classes)
    scores = score_metrics(y_true, probs, classes, positive)
    for name, values in scores.pop("per_class_scores").items():
        metrics["per_class"][name].update(values)
    metrics.update(scores)
    metrics["positive_class"] = classes[positive] if positive is not None else None
    metrics["confusion_matrix"] = confusion(y_true, y_pred, len(classes)).tolist()
    metrics["ci"] = bootstrap_ci(y_true, y_pred, len(classes), resamples=resamples, classes=classes)
    metrics["classes"] = list(classes)
    return metrics
