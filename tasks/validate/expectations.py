"""The checks as GX expectations: which expectation, over which table, and how an offending row is explained.

`specs(...)` lists one `Spec` per expectation; a check (`CHECKS` name) may need several (size_bounds: width,
height and pixels). Each expectation carries its check's name in `meta`, shown in the Data Docs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from tasks.manifest import SPLITS
from tasks.params import ValidateParams
from tasks.validate.gx import load_gx


@dataclass
class Spec:
    """One GX expectation, the table it runs on and the check (short name) it belongs to."""

    check: str
    table: str
    expectation: Any
    index: str = "path"  # column that names an offending row in the GX result
    detail: Callable[[dict], str] | None = None  # offending GX row -> why it offends


class RowDetails:
    """Why an offending image offends, worded from its manifest row and the rows with the same content.

    Each method takes GX's unexpected-row record (`row` is the manifest position)."""

    def __init__(self, df: pd.DataFrame, params: ValidateParams, max_pixels: int):
        self.rows = df.to_dict("index")
        self.labels = {r["path"]: r["label"] for r in self.rows.values()}
        self.by_sha: dict[str, list[tuple[str, str]]] = {}
        for r in self.rows.values():
            if r["decodes_ok"] and r["sha256"]:
                self.by_sha.setdefault(r["sha256"], []).append((r["path"], r["split"]))
        self.params, self.max_pixels = params, max_pixels

    def decode(self, u: dict) -> str:
        return self.rows[u["row"]]["error"] or "does not decode"

    def leak(self, u: dict) -> str:
        r = self.rows[u["row"]]
        others = [f"{p} [{s}]" for p, s in self.by_sha[r["sha256"]] if p != r["path"]]
        return f"in {r['split']}; same content (sha256 {r['sha256'][:12]}) as " + ", ".join(others)

    def conflict(self, u: dict) -> str:
        r = self.rows[u["row"]]
        others = [f"{p} [{self.labels[p]}]" for p, _ in self.by_sha[r["sha256"]] if self.labels[p] != r["label"]]
        return f"labelled '{r['label']}'; same content (sha256 {r['sha256'][:12]}) as " + ", ".join(others)

    def duplicate(self, u: dict) -> str:
        r = self.rows[u["row"]]
        others = [p for p, s in self.by_sha[r["sha256"]] if s == r["split"] and p != r["path"]]
        return f"same content as {', '.join(others)} in {r['split']}"

    def size(self, u: dict) -> str:
        r = self.rows[u["row"]]
        w, h = r["width"], r["height"]
        why = []
        if min(w, h) < self.params.min_side:
            why.append(f"side < min_side {self.params.min_side}")
        if max(w, h) > self.params.max_side:
            why.append(f"side > max_side {self.params.max_side}")
        if w * h > self.max_pixels:
            why.append(f"{w * h} pixels > data.max_pixels {self.max_pixels}")
        return f"{w}x{h}: " + ", ".join(why)


def _file_specs(gxe, why: RowDetails, params: ValidateParams, max_pixels: int) -> list[Spec]:
    """The checks over `images` that every manifest gets."""
    sides = (params.min_side, params.max_side)
    return [
        Spec("has_images", "images", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        Spec("decodes", "images", gxe.ExpectColumnValuesToBeInSet(column="decodes_ok", value_set=[True]),
             detail=why.decode),
        Spec("split_values", "images", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
             detail=lambda u: f"split '{u['split']}'"),
        Spec("no_leakage", "images", gxe.ExpectColumnValuesToBeBetween(column="splits_with_same_content", max_value=1),
             detail=why.leak),
        Spec("label_conflicts", "images",
             gxe.ExpectColumnValuesToBeBetween(column="labels_with_same_content", max_value=1), detail=why.conflict),
        Spec("duplicates_within_split", "images",
             gxe.ExpectCompoundColumnsToBeUnique(column_list=["sha256", "split"], ignore_row_if="any_value_is_missing"),
             detail=why.duplicate),
        *(
            Spec("size_bounds", "images", gxe.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi),
                 detail=why.size)
            for col, lo, hi in (("width", *sides), ("height", *sides), ("pixels", None, max_pixels))
        ),
        Spec("modes", "images", gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(params.allowed_modes)),
             detail=lambda u: f"mode '{u['mode']}' not in {list(params.allowed_modes)}"),
    ]


def _class_specs(gxe, classes: list[str]) -> list[Spec]:
    """The checks against the declared classes (only when the source declares them)."""
    return [
        Spec("labels_in_set", "images", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)),
             detail=lambda u: f"label '{u['label']}' not in {list(classes)}"),
        Spec("no_empty_class", "images", gxe.ExpectColumnDistinctValuesToContainSet(column="label",
                                                                                   value_set=list(classes))),
    ]


def _fractions_spec(gxe, df: pd.DataFrame, expected: dict[str, float], tolerance: float) -> Spec:
    """Split fractions within `tolerance` of `expected` (only when ingest drew the splits)."""
    def detail(u: dict) -> str:
        split = u["group"].removeprefix("split=")
        fraction = float((df["split"] == split).mean()) if len(df) else 0.0
        return f"fraction {fraction:.3f}, expected {expected[split]:.3f} +/- {tolerance}"

    return Spec("split_fractions", "split_fractions",
                gxe.ExpectColumnValuesToBeBetween(column="deviation", max_value=tolerance), index="group",
                detail=detail)


def specs(df: pd.DataFrame, params: ValidateParams, classes: list[str] | None,
          expected_fractions: dict[str, float] | None, max_pixels: int) -> list[Spec]:
    """Every expectation to run over `df` (the normalised manifest) and its derived tables."""
    gxe = load_gx().expectations
    found = _file_specs(gxe, RowDetails(df, params, max_pixels), params, max_pixels)
    found.append(Spec("min_per_class_split", "class_split_counts",
                      gxe.ExpectColumnValuesToBeBetween(column="n", min_value=params.min_images_per_class),
                      index="group", detail=lambda u: f"{u['n']} image(s), need >= {params.min_images_per_class}"))
    if classes is not None:
        found += _class_specs(gxe, classes)
    if expected_fractions is not None:
        found.append(_fractions_spec(gxe, df, expected_fractions, params.split_tolerance))
    for spec in found:
        spec.expectation.meta = {"check": spec.check}  # shown in the Data Docs next to the expectation
    return found
