"""The catalogue of checks and what a validation comes to: `CHECKS`, `CheckResult`, `ValidationOutcome`.

Each check has a stable short name used in `params.yaml` (`validate.warn_only`) and in the reports; a check is
one or more Great Expectations expectations (`tasks.validate.expectations`). Bad data never raises: the outcome
says what failed and names the files, and the caller decides the exit code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "split", "width", "height", "mode", "sha256", "decodes_ok")
OFFENDING_CAP = 50  # offending items kept per check in results.json / summary.md (the count is always exact)
MESSAGE_CAP = 10  # offending items spelled out in one failure message

CHECKS: dict[str, str] = {
    "has_images": "the manifest has at least one image",
    "decodes": "every image decodes",
    "split_values": "split is one of train/val/test",
    "labels_in_set": "labels belong to the declared classes",
    "no_empty_class": "every declared class has at least one image",
    "min_per_class_split": "each class has at least validate.min_images_per_class images in each split",
    "split_fractions": "split fractions are within validate.split_tolerance of the configured ones",
    "no_leakage": "no image content (sha256) is shared across splits",
    "label_conflicts": "identical images (sha256) carry the same label",
    "duplicates_within_split": "no image content (sha256) repeats within a split",
    "size_bounds": "width/height within [min_side, max_side] and width*height <= max_pixels",
    "modes": "image mode is one of validate.allowed_modes",
}


@dataclass
class CheckResult:
    name: str
    description: str
    blocking: bool
    success: bool
    skipped: str = ""  # why the check did not apply (e.g. no declared classes)
    observed: dict[str, Any] = field(default_factory=dict)
    offending: list[dict[str, str]] = field(default_factory=list)  # [{item, detail}], all of them
    gx_expectations: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        if self.success:
            return "passed"
        return "failed" if self.blocking else "warning"

    def message(self) -> str:
        shown = "; ".join(f"{o['item']} ({o['detail']})" if o["detail"] else o["item"] for o in self.offending[:MESSAGE_CAP])
        more = f"; ... and {len(self.offending) - MESSAGE_CAP} more" if len(self.offending) > MESSAGE_CAP else ""
        head = f"{self.name}: expected {self.description}"
        return f"{head}: {len(self.offending)} offending: {shown}{more}" if self.offending else head

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "blocking": self.blocking,
            "success": self.success,
            "status": self.status,
            "skipped": self.skipped or None,
            "observed": self.observed,
            "offending": self.offending[:OFFENDING_CAP],
            "offending_count": len(self.offending),
            "gx_expectations": self.gx_expectations,
        }


@dataclass
class ValidationOutcome:
    success: bool
    failures: list[str]
    warnings: list[str]
    checks: list[CheckResult]
    quarantined: list[dict[str, str]]
    n_images: int
    manifest: pd.DataFrame = field(repr=False)  # the input minus quarantined rows
    time_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "n_images": self.n_images,
            "n_validated": len(self.manifest),
            "expectations": [c.to_json() for c in self.checks],
            "quarantined": self.quarantined,
            "quarantined_count": len(self.quarantined),
            "failures": self.failures,
            "warnings": self.warnings,
            "time_s": round(self.time_s, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def input_failure(message: str, start: float, manifest: pd.DataFrame | None = None,
                  offending: list[dict[str, str]] | None = None) -> ValidationOutcome:
    """An outcome for input that could not be validated at all (no manifest, wrong columns)."""
    log.error("validate: %s", message)
    manifest = pd.DataFrame() if manifest is None else manifest
    check = CheckResult("input", "a readable manifest with the ingest columns", True, False, offending=offending or [])
    return ValidationOutcome(False, [message], [], [check], [], len(manifest), manifest.iloc[0:0],
                             time_s=time.perf_counter() - start)


def schema_failure(manifest: pd.DataFrame, missing: list[str], start: float) -> ValidationOutcome:
    """A manifest without the columns ingest writes: one failure naming them."""
    message = f"manifest is missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} (run the ingest stage)"
    return input_failure(message, start, manifest, offending=[{"item": c, "detail": "missing column"} for c in missing])
