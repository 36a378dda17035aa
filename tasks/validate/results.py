"""GX results -> checks: each `CHECKS` entry's verdict, what was observed, and every offending item, in manifest
order, with the reason each offends."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tasks.params import ValidateParams
from tasks.validate.checks import CHECKS, CheckResult
from tasks.validate.expectations import Spec
from tasks.validate.gx import gx_error


def _offending(spec: Spec, res: dict) -> list[dict[str, str]]:
    error = gx_error(res)
    if error is not None:
        return [{"item": f"(GX could not evaluate {spec.expectation.expectation_type})", "detail": error, "_order": -1}]
    items = []
    for position, u in enumerate(res.get("result", {}).get("unexpected_index_list") or []):
        order = u.get("row", position)  # manifest order for files, table order for groups
        items.append({"item": str(u[spec.index]), "detail": spec.detail(u) if spec.detail else "", "_order": order})
    return items


def _observed(name: str, df: pd.DataFrame, tables: dict[str, pd.DataFrame], classes: list[str] | None,
              gx_results: list[dict], n_offending: int) -> dict[str, Any]:
    """What was seen, in a form a person can read in results.json."""
    if name == "has_images":
        return {"n_images": len(df)}
    if name == "min_per_class_split":
        counts = tables["class_split_counts"]
        return {label: {r.split: int(r.n) for r in g.itertuples()} for label, g in counts.groupby("label")}
    if name == "split_fractions":
        return {r.split: {"fraction": r.fraction, "expected": r.expected} for r in tables["split_fractions"].itertuples()}
    if name == "no_empty_class":
        present = set(df["label"])
        return {"images_per_class": {c: int((df["label"] == c).sum()) for c in classes or []},
                "missing": sorted(set(classes or []) - present)}
    if name == "modes":
        return {"modes": {(k or "(unknown)"): int(v) for k, v in df["mode"].value_counts().items()}}
    if name == "labels_in_set":
        return {"labels": sorted(set(df["label"]))}
    # Rows with a null in the checked column (unknown size, undecodable hash) are skipped by GX.
    checked = max((int(r.get("result", {}).get("element_count") or 0) - int(r.get("result", {}).get("missing_count") or 0)
                   for r in gx_results), default=0)
    return {"rows_checked": checked, "rows_unexpected": n_offending}


def build_checks(specs: list[Spec], gx_results: dict[int, dict], df: pd.DataFrame, tables: dict[str, pd.DataFrame],
                 params: ValidateParams, classes: list[str] | None) -> list[CheckResult]:
    """One `CheckResult` per `CHECKS` entry, in catalogue order; a check with no expectation run is skipped, saying
    why."""
    checks = []
    for name, description in CHECKS.items():
        mine = [s for s in specs if s.check == name]
        blocking = name not in params.warn_only
        if not mine:
            why = ("no classes declared" if name in ("labels_in_set", "no_empty_class") else
                   "no expected split fractions (the splits are the source's own, or none were configured)")
            checks.append(CheckResult(name, description, blocking, success=True, skipped=why))
            continue
        results = [gx_results[id(s)] for s in mine]
        offending: dict[str, dict] = {}
        for spec, res in zip(mine, results):
            for item in _offending(spec, res):
                offending.setdefault(item["item"], item)  # size_bounds: one entry per file, not per column
        if name == "no_empty_class":  # GX reports only the first few missing values; name them all
            offending = {f"label={c}": {"item": f"label={c}", "detail": "no images", "_order": i}
                         for i, c in enumerate(sorted(set(classes or []) - set(df["label"])))}
        ordered = sorted(offending.values(), key=lambda o: o.pop("_order"))
        checks.append(CheckResult(
            name, description, blocking,
            success=all(bool(r.get("success")) for r in results),
            observed=_observed(name, df, tables, classes, results, len(ordered)),
            offending=ordered,
            gx_expectations=[s.expectation.expectation_type for s in mine],
        ))
    return checks
