"""Metrics against scikit-learn on random predictions; bootstrap intervals that make sense."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from tasks.metrics import bootstrap_ci, classification_metrics


@pytest.mark.parametrize("k", [2, 4])
def test_headline_metrics_match_sklearn(k):
    rng = np.random.default_rng(k)
    y, p = rng.integers(0, k, 300), rng.integers(0, k, 300)
    m = classification_metrics(y, p, [f"c{i}" for i in range(k)])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_recall"] == pytest.approx(recall_score(y, p, average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


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
