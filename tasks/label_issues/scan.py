"""The checks, on features already computed: pure functions of (features, labels, splits, params).

- Likely label errors, the way confident learning finds them (Northcutt, Jiang and Chuang, JAIR 2021): out-of-fold
  predicted probabilities from a K-fold logistic regression on the frozen features (every image is scored by a
  model that never saw its label), then cleanlab's `find_label_issues` (prune by the estimated noise rates) and
  its label-quality score (0 = surely mislabelled, 1 = surely right) to rank them.
- Near-duplicates across splits (train/test leakage): cosine similarity of mean-centred features at least
  `near_duplicate_similarity`. Centring removes what every image of a data set shares, so two different cells
  of one kind no longer look alike and a re-encoded, resized or slightly edited copy still does.
- Outliers: the mean distance to the 5 nearest training images (scikit-learn), above `outlier_quantile` of the
  training images' own distances.

Files listed as reviewed are never flagged (they are counted as such).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tasks.params import LabelIssuesParams

NEIGHBOURS = 5
SPLIT_ORDER = ("train", "val", "test")


class NotEnoughImages(ValueError):
    """Some class has too few images for cross-validated probabilities."""


@dataclass
class Findings:
    """What the checks found. `table`: one row per image (path, split, label, suggested, quality, outlier_distance,
    reviewed); the three frames below hold the flagged rows only, worst first."""

    table: pd.DataFrame
    classes: list[str]
    label_issues: pd.DataFrame  # path, split, label, suggested, quality
    near_duplicates: pd.DataFrame  # path, split, label, other_path, other_split, other_label, similarity
    outliers: pd.DataFrame  # path, split, label, distance
    reviewed_hits: list[str]  # reviewed files that would otherwise have been flagged
    folds: int = 0
    note: str = ""  # why the label check did not run ('' when it did)
    outlier_threshold: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def flagged(self, kinds) -> list[str]:
        """The files flagged by the given kinds of check (label, near_duplicate, outlier), each once, in order."""
        out: list[str] = []
        if "label" in kinds:
            out += list(self.label_issues["path"])
        if "near_duplicate" in kinds:
            for a, b in zip(self.near_duplicates["path"], self.near_duplicates["other_path"]):
                out += [a, b]
        if "outlier" in kinds:
            out += list(self.outliers["path"])
        return list(dict.fromkeys(out))


def out_of_fold_probs(features: np.ndarray, y: np.ndarray, n_classes: int, folds: int,
                      seed: int) -> tuple[np.ndarray, int]:
    """(N, n_classes) probabilities, each row from a logistic regression fitted on the other folds (stratified);
    the number of folds used (fewer than asked when a class has fewer images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    counts = np.bincount(y, minlength=n_classes)
    k = int(min(folds, counts.min()))
    if k < 2:
        raise NotEnoughImages(f"class counts {counts.tolist()}: every class needs at least 2 images for "
                              "out-of-fold probabilities")
    model = make_pipeline(Normalizer(), LogisticRegression(C=10.0, max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    return cross_val_predict(model, features, y, cv=cv, method="predict_proba"), k


def label_flags(y: np.ndarray, probs: np.ndarray, params: LabelIssuesParams) -> tuple[np.ndarray, np.ndarray]:
    """(label quality per row, likely-label-error mask) before review and the max_fraction cap."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(y, probs, method=params.score)
    if params.threshold is not None:
        return quality, quality < params.threshold
    return quality, find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1)


def unit_centred(features: np.ndarray) -> np.ndarray:
    """Features minus their mean, scaled to unit length (cosine similarity = dot product)."""
    if not len(features):
        return features
    z = features - features.mean(axis=0, keepdims=True)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def near_duplicate_pairs(z: np.ndarray, splits: np.ndarray, threshold: float,
                         chunk: int = 2048) -> list[tuple[int, int, float]]:
    """(i, j, similarity) for rows in different splits with similarity >= threshold (i's split first in
    train, val, test order); memory is one chunk x the other splits' rows."""
    order = [s for s in SPLIT_ORDER if (splits == s).any()] + sorted(set(splits) - set(SPLIT_ORDER))
    pairs = []
    for n, split in enumerate(order):
        mine = np.flatnonzero(splits == split)
        theirs = np.flatnonzero(np.isin(splits, order[n + 1:]))
        if not len(theirs):
            continue
        for start in range(0, len(mine), chunk):
            rows = mine[start : start + chunk]
            sims = z[rows] @ z[theirs].T
            for a, b in zip(*np.nonzero(sims >= threshold)):
                pairs.append((int(rows[a]), int(theirs[b]), float(sims[a, b])))
    return sorted(pairs, key=lambda p: -p[2])


def outlier_distances(z: np.ndarray, reference: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """Each row's mean distance to its NEIGHBOURS nearest reference rows (itself left out), and the threshold:
    `quantile` of the reference rows' own distances."""
    from sklearn.neighbors import NearestNeighbors

    ref = np.flatnonzero(reference)
    k = min(NEIGHBOURS, len(ref) - 1)
    if k < 1:
        return np.zeros(len(z)), float("inf")
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(z[ref]).kneighbors(z)
    self_match = ref[idx] == np.arange(len(z))[:, None]
    # drop the row itself where it is among its neighbours, else the farthest: k distances per row
    keep = ~self_match
    keep[~self_match.any(axis=1), -1] = False
    scores = np.where(keep, dist, 0.0).sum(axis=1) / k
    return scores, float(np.quantile(scores[ref], quantile))


def scan(features: np.ndarray, rows: pd.DataFrame, params: LabelIssuesParams, reviewed: set[str],
         seed: int) -> Findings:
    """Every check over `rows` (path, split, label; row i has features[i])."""
    t0 = time.perf_counter()
    table = rows[["path", "split", "label"]].astype(str).reset_index(drop=True)
    classes = sorted(table["label"].unique())
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    table["reviewed"] = table["path"].isin(reviewed)
    timings: dict[str, float] = {}
    label_issues, note, folds = table.iloc[:0].assign(suggested="", quality=0.0), "", 0
    table["suggested"], table["quality"] = "", np.nan
    hits: list[str] = []
    if len(table) < 2:
        note = "fewer than 2 images: nothing to compare"
        features = np.zeros((len(table), 1), dtype=np.float32)  # the look-alike checks below find nothing
    elif len(classes) < 2:
        note = f"one class only ({classes[0]}): no label can be compared with another"
    else:
        try:
            probs, folds = out_of_fold_probs(features, y, len(classes), params.folds, seed)
        except NotEnoughImages as exc:
            note = str(exc)
        else:
            timings["out_of_fold_s"] = round(time.perf_counter() - t0, 2)
            t = time.perf_counter()
            quality, mask = label_flags(y, probs, params)
            timings["confident_learning_s"] = round(time.perf_counter() - t, 3)
            table["suggested"] = [classes[i] for i in probs.argmax(axis=1)]
            table["quality"] = quality
            hits += list(table.loc[mask & table["reviewed"], "path"])
            flagged = table[mask & ~table["reviewed"]].sort_values("quality", kind="stable")
            label_issues = flagged.head(int(params.max_fraction * len(table)))
    t = time.perf_counter()
    z = unit_centred(features)
    splits = table["split"].to_numpy()
    pairs = near_duplicate_pairs(z, splits, params.near_duplicate_similarity)
    dups = pd.DataFrame([{"path": table.at[i, "path"], "split": table.at[i, "split"], "label": table.at[i, "label"],
                          "other_path": table.at[j, "path"], "other_split": table.at[j, "split"],
                          "other_label": table.at[j, "label"], "similarity": round(s, 4)} for i, j, s in pairs],
                        columns=["path", "split", "label", "other_path", "other_split", "other_label", "similarity"])
    either = dups["path"].isin(reviewed) | dups["other_path"].isin(reviewed)
    hits += list(dups.loc[either, "path"]) + list(dups.loc[either, "other_path"])
    timings["near_duplicates_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    reference = (splits == "train") if (splits == "train").sum() > NEIGHBOURS else np.ones(len(splits), bool)
    table["outlier_distance"], threshold = outlier_distances(z, reference, params.outlier_quantile)
    far = table[table["outlier_distance"] > threshold]
    hits += list(far.loc[far["reviewed"], "path"])
    outliers = far[~far["reviewed"]].sort_values("outlier_distance", ascending=False, kind="stable")
    timings["outliers_s"] = round(time.perf_counter() - t, 3)
    return Findings(table, classes, label_issues[["path", "split", "label", "suggested", "quality"]],
                    dups[~either].reset_index(drop=True),
                    outliers[["path", "split", "label"]].assign(distance=outliers["outlier_distance"].round(4)),
                    sorted(set(hits) & reviewed), folds, note, None if not np.isfinite(threshold) else threshold,
                    timings)
