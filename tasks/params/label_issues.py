"""The `label_issues` params section (the label_issues stage): in its own module to keep `schema` short; `schema`
imports it into `Params`. Same conventions: every field has its bounds, default and description (the params.yaml
comment, the dashboard form)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
IssueKind = Literal["label", "near_duplicate", "outlier"]


class LabelIssuesParams(BaseModel):
    """The label_issues stage: likely label errors (confident learning on out-of-fold predictions of a logistic
    regression on the frozen pretrained features), near-duplicates across splits and outliers (docs/data.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # as schema.Strict

    mode: Literal["off", "report", "warn", "block"] = Field(
        "report", description="what flagged files do: report (listed in reports/label_issues/ only) | warn (also "
        "logged as warnings) | block (the stage fails naming the files, so training never starts) | off (no check, an "
        "empty report). A file listed in data/label_reviewed.csv (path,note) is never flagged again")
    block_on: Annotated[list[IssueKind], Field(max_length=3)] = Field(
        default_factory=lambda: ["label", "near_duplicate"], description="the kinds of flagged files that warn and "
        "block act on: label (likely label error) | near_duplicate (near-identical images in different splits: "
        "train/test leakage) | outlier (far from every training image; outlier_quantile flags a few in any data set, "
        "so it only reports by default)")
    threshold: Fraction | None = Field(
        None, description="flag a file as a likely label error when its label-quality score is below this; null = "
        "confident learning decides (cleanlab's find_label_issues, prune_by_noise_rate: as many as the estimated "
        "noise rates imply)")
    max_fraction: Fraction = Field(0.1, description="at most this fraction of the files is flagged as likely label "
                                   "errors (the lowest label quality first)")
    score: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = Field(
        "self_confidence", description="the label-quality score (cleanlab): self_confidence (the out-of-fold "
        "probability of the given label) | normalized_margin | confidence_weighted_entropy; 0 = surely wrong, 1 = "
        "surely right")
    folds: Annotated[int, Field(ge=2, le=20)] = Field(
        5, description="cross-validation folds for the out-of-fold probabilities (fewer when a class has fewer "
        "images)")
    near_duplicate_similarity: Fraction = Field(
        0.99, description="two files in different splits are near-duplicates when the cosine similarity of their "
        "mean-centred features is at least this (a resized or brightened copy scores above 0.99; on ELPV, distinct "
        "cells reach 0.99 only for all-black cells: docs/data.md)")
    outlier_quantile: Fraction = Field(
        0.99, description="a file is an outlier when its mean distance to its 5 nearest training images is above this "
        "quantile of the training images' own distances")
    image_size: Annotated[int, Field(ge=32, le=1024)] | None = Field(
        None, description="input size (px) the features are computed at; null = the pretrained weights' own size "
        "(224 for EfficientNet-Lite0)")
