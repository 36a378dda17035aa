"""Validate stage: the ingest manifest -> pass/fail, a validated manifest and human-readable reports.

Every check is a real Great Expectations (GX Core 1.x) expectation, run through an ephemeral
context over in-memory DataFrames, so the Data Docs show exactly what was checked. Checks
that are about groups rather than files (images per class and split, split fractions) run
over small derived tables; the leakage check runs over a derived per-file column (how many
splits hold the same bytes), so GX still names the offending files.

Each check has a stable short name (`CHECKS`) used in `params.yaml` (`validate.warn_only`)
and in the reports. Bad data never raises: the outcome says what failed and names the files,
and the caller decides the exit code.
"""

from __future__ import annotations

import logging
import time
from argparse import Namespace
from pathlib import Path

import pandas as pd

from tasks.entry import stage_main
from tasks.files import read_json
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.manifest import read_manifest
from tasks.params import Params, ValidateParams
from tasks.validate.checks import CHECKS, REQUIRED_COLUMNS, ValidationOutcome, input_failure, schema_failure
from tasks.validate.expectations import specs as expectation_specs
from tasks.validate.gx import gx_context, load_gx, run_gx
from tasks.validate.report import log_outcome, write_docs, write_reports
from tasks.validate.results import build_checks
from tasks.validate.tables import (
    counts_table,
    fractions_table,
    images_table,
    missing_files,
    normalise,
    quarantine,
)

log = logging.getLogger(__name__)


def validate_manifest(manifest: pd.DataFrame, params: ValidateParams, classes: list[str] | None,
                      expected_fractions: dict[str, float] | None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationOutcome:
    """Run every check over `manifest`; never raises for bad data (see `ValidationOutcome`)."""
    return validate_into(manifest, params, classes, expected_fractions, docs_dir=None, max_pixels=max_pixels)


def validate_into(manifest: pd.DataFrame, params: ValidateParams, classes: list[str] | None,
                  expected_fractions: dict[str, float] | None, docs_dir: Path | None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationOutcome:
    """`validate_manifest`, rendering GX's Data Docs into `docs_dir` too (when not None)."""
    start = time.perf_counter()
    unknown = sorted(set(params.warn_only) - set(CHECKS))
    if unknown:
        log.warning("validate.warn_only names unknown check(s) %s; known: %s", unknown, list(CHECKS))
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        return schema_failure(manifest, missing, start)
    classes = None if classes is None else [str(c) for c in classes]  # labels are compared as text

    timings: dict[str, float] = {}
    t = time.perf_counter()
    load_gx()
    timings["gx_import_s"] = time.perf_counter() - t  # ~3 s in a fresh process, 0 afterwards

    df_all = normalise(manifest)
    df, quarantined = quarantine(df_all, params.on_corrupt)
    tables = {"images": images_table(df), "class_split_counts": counts_table(df, classes)}
    if expected_fractions is not None:
        tables["split_fractions"] = fractions_table(df, expected_fractions, params.split_tolerance)
    specs = expectation_specs(df, params, classes, expected_fractions, max_pixels)

    t = time.perf_counter()
    context = gx_context(docs_dir)
    timings["gx_context_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gx_results = run_gx(context, tables, specs)
    timings["gx_validate_s"] = time.perf_counter() - t
    if docs_dir is not None:
        t = time.perf_counter()
        try:
            context.build_data_docs(site_names=["local_site"])
        except Exception as exc:  # the verdict stands without the HTML; write_docs leaves a fallback page
            log.warning("validate: GX Data Docs could not be built (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        timings["gx_docs_s"] = time.perf_counter() - t

    checks = build_checks(specs, gx_results, df, tables, params, classes)
    outcome = ValidationOutcome(
        success=all(c.success for c in checks if c.blocking),
        failures=[c.message() for c in checks if c.status == "failed"],
        warnings=[c.message() for c in checks if c.status == "warning"],
        checks=checks,
        quarantined=quarantined,
        n_images=len(df_all),
        manifest=manifest.reset_index(drop=True).loc[df.index],
        timings=timings,
    )
    outcome.time_s = time.perf_counter() - start
    log_outcome(outcome)
    return outcome


def run(manifest_path: Path, images_dir: Path, params: ValidateParams, out_manifest: Path, results_json: Path,
        summary_md: Path, docs_dir: Path, classes: list[str] | None = None,
        expected_fractions: dict[str, float] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationOutcome:
    """The validate stage: manifest -> validated manifest, results JSON, summary and Data Docs."""
    start = time.perf_counter()
    manifest_path, images_dir = Path(manifest_path), Path(images_dir)
    try:
        manifest = read_manifest(manifest_path)
    except Exception as exc:  # missing or unreadable file: a message, not a traceback
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        outcome = input_failure(f"cannot read manifest {manifest_path}: {reason}", start)
    else:
        checked = missing_files(manifest, images_dir)
        outcome = write_docs(lambda d: validate_into(checked, params, classes, expected_fractions, d, max_pixels),
                             docs_dir)
        outcome.manifest = manifest.loc[outcome.manifest.index]  # the rows as ingest wrote them
    outcome.time_s = time.perf_counter() - start
    write_reports(outcome, out_manifest, results_json, summary_md)
    return outcome


class ValidationFailed(RuntimeError):
    """A blocking check failed; the message names the checks and files."""


def main(argv: list[str] | None = None) -> None:
    stage_main("validate", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    split, out = p.data.split, args.out_dir
    declared = read_json(args.classes) if args.classes.exists() else {}
    # split fractions are checked when ingest drew the splits; the ones a source names itself (split folders, a
    # manifest's split column) are the user's to choose
    fractions = None if declared.get("given_splits") else {"train": 1 - split.test - split.val, "val": split.val,
                                                            "test": split.test}
    outcome = run(args.manifest, args.images, p.validate_, args.out_manifest, out / "validation.json",
                  out / "validation.md", out / "docs", classes=declared.get("classes"), expected_fractions=fractions,
                  max_pixels=p.data.max_pixels)
    if not outcome.success:
        raise ValidationFailed("data validation failed: " + " | ".join(outcome.failures)
                               + f" (details: {out}/validation.md)")
