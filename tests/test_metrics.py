"""Metrics against scikit-learn on random predictions; bootstrap intervals that make sense."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from tasks.metrics import bootstrap_ci, classification_metrics, confusion
from tests.conftest import REPO


@pytest.mark.parametrize("k, n, absent", [(2, 300, None), (4, 300, None), (5, 37, 3), (3, 0, None)])
def test_label_metrics_are_sklearns_to_the_bit(k, n, absent):
    """Computed in numpy (training and export never import sklearn) with sklearn's formulas: the same floats, not
    approximately the same (a checkpoint chosen by validation macro F1 must not change with the implementation). A
    class missing from the data (`absent`) counts as 0, as sklearn's zero_division=0 says."""
    rng = np.random.default_rng(k * 100 + n)
    y, p = rng.integers(0, k, n), rng.integers(0, k, n)
    if absent is not None:
        y[y == absent], p[p == absent] = (absent + 1) % k, (absent + 2) % k
    labels = list(range(k))
    m = classification_metrics(y, p, [f"c{i}" for i in range(k)])
    assert m["n"] == n
    if not n:  # (sklearn 1.9 refuses empty arrays) nothing to score: zeros, never NaN
        assert [m[name] for name in ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1")] == [0.0] * 4
        assert all(v == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for v in m["per_class"].values())
        return
    assert m["accuracy"] == accuracy_score(y, p)
    assert m["balanced_accuracy"] == balanced_accuracy_score(y, p)
    assert m["macro_recall"] == recall_score(y, p, labels=labels, average="macro", zero_division=0)
    assert m["macro_f1"] == f1_score(y, p, labels=labels, average="macro", zero_division=0)
    assert m["macro_precision"] == precision_score(y, p, labels=labels, average="macro", zero_division=0)
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    assert [list(v.values()) for v in m["per_class"].values()] == [
        [precision[i], recall[i], f1[i], support[i]] for i in range(k)]
    assert confusion(y, p, k).tolist() == confusion_matrix(y, p, labels=labels).tolist()


def test_training_and_export_never_import_sklearn():
    """What the numpy label metrics are for: a stage process that only needs them does not pay sklearn's import."""
    code = ("import sys, numpy as np; from tasks.metrics import classification_metrics; "
            "classification_metrics(np.array([0, 1]), np.array([1, 1]), ['a', 'b']); "
            "import tasks.train.loop, tasks.export.stage; print(sorted(m for m in sys.modules if m.startswith('sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 2000):
        y = rng.integers(0, 2, n)
        p = np.where(rng.random(n) < 0.85, y, 1 - y)
        m = classification_metrics(y, p, ["a", "b"])
        ci = bootstrap_ci(y, p, 2)
        for name in ("accuracy", "macro_recall", "macro_f1"):
            lo, hi = ci[name]
            assert lo <= m[name] <= hi
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 2
    assert bootstrap_ci(y, p, 2) == bootstrap_ci(y, p, 2)  # seeded


def test_bootstrap_handles_a_class_never_predicted():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 0, 0, 0])
    ci = bootstrap_ci(y, p, 3)
    assert all(0.0 <= v <= 1.0 for pair in ci.values() for v in pair)


# ---- evaluate-stage metrics against scikit-learn --------------------------------------------

from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from tasks.metrics import (  # noqa: E402
    evaluation_metrics,
    expected_calibration_error,
    mcnemar,
    paired_bootstrap,
    positive_index,
)


def random_probs(rng, n, k, y=None, skill=1.5):
    """Softmax scores, informative about `y` when given (so AUCs are away from 0.5)."""
    logits = rng.normal(size=(n, k))
    if y is not None:
        logits[np.arange(n), y] += skill
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_evaluation_metrics_match_sklearn_on_random_predictions(k):
    rng = np.random.default_rng(10 + k)
    y = rng.integers(0, k, 400)
    probs = random_probs(rng, 400, k, y)
    classes = [f"c{i}" for i in range(k)]
    m = evaluation_metrics(y, probs, classes)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert m["macro_recall"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    if k == 2:
        assert m["positive_class"] == "c1"
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, probs[:, 1]))
    else:
        assert m["positive_class"] is None
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        onehot = np.eye(k)[y]
        assert m["pr_auc"] == pytest.approx(average_precision_score(onehot, probs, average="macro"))
    for i, c in enumerate(classes):
        assert m["per_class"][c]["roc_auc"] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
    for name in ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1"):
        lo, hi = m["ci"][name]
        assert lo <= m[name] <= hi
    assert set(m["ci"]["per_class_recall"]) == set(classes)


def test_positive_class_picks_the_scores():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    probs = random_probs(rng, 300, 2, y)
    m = evaluation_metrics(y, probs, ["defective", "functional"], positive_class="defective")
    assert m["positive_class"] == "defective"
    assert m["pr_auc"] == pytest.approx(average_precision_score(y == 0, probs[:, 0]))
    assert positive_index(["b", "a"], None) == 0  # the second in *sorted* order is "b", at index 0
    with pytest.raises(ValueError, match="gates.positive_class 'nope'"):
        positive_index(["a", "b"], "nope")


def ece_by_hand(probs, y, bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("k", [2, 4])
def test_ece_matches_a_plain_loop(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 500)
    probs = random_probs(rng, 500, k, y)
    assert expected_calibration_error(probs, y) == pytest.approx(ece_by_hand(probs, y))
    perfect = np.eye(k)[y]  # confident and always right: perfectly calibrated
    assert expected_calibration_error(perfect, y) == pytest.approx(0.0)


def test_scores_with_a_class_missing_from_the_test_split_are_none_not_nan():
    y = np.array([0, 0, 1, 1, 0])
    probs = random_probs(np.random.default_rng(0), 5, 3, y)
    m = evaluation_metrics(y, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["roc_auc"] is None and m["per_class"]["c"]["support"] == 0
    assert m["roc_auc"] == pytest.approx(np.mean([roc_auc_score(y == i, probs[:, i]) for i in (0, 1)]))
    one_class = evaluation_metrics(np.zeros(4, int), random_probs(np.random.default_rng(0), 4, 2), ["a", "b"])
    assert one_class["roc_auc"] is None and one_class["pr_auc"] is None


def test_mcnemar_matches_the_exact_binomial_test():
    from scipy.stats import binomtest

    y = np.zeros(40, int)
    a = np.r_[np.zeros(30, int), np.ones(10, int)]          # right on 30
    b = np.r_[np.zeros(22, int), np.ones(18, int)]          # right on 22, all inside a's
    mc = mcnemar(y, a, b)
    assert (mc["a_only"], mc["b_only"]) == (8, 0)
    assert mc["p_exact"] == pytest.approx(binomtest(0, 8, 0.5).pvalue)
    assert mc["p_mid"] < mc["p_exact"]
    assert mcnemar(y, a, a) == {"a_only": 0, "b_only": 0, "p_exact": 1.0, "p_mid": 1.0}


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    a = np.where(rng.random(500) < 0.9, y, 1 - y)
    b = np.where(rng.random(500) < 0.7, y, 1 - y)
    r = paired_bootstrap("accuracy", y, a, b, 2)
    assert r["delta"] == pytest.approx(accuracy_score(y, a) - accuracy_score(y, b))
    assert r["ci"][0] <= r["delta"] <= r["ci"][1] and r["ci"][0] > 0 and r["p_value"] < 0.01
    same = paired_bootstrap("macro_f1", y, a, a, 2)
    assert same["delta"] == 0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
