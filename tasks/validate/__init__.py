"""Validate stage: the ingest manifest -> pass/fail, a validated manifest and reports (Great Expectations).

Modules, one job each: `checks` (the CHECKS catalogue, CheckResult, ValidationOutcome), `tables` (the per-image,
counts and fractions tables the expectations run on), `expectations` (each check as GX expectations, and why an
offending row offends), `gx` (the GX adapter: context, running, matching results), `results` (GX results ->
checks), `report` (Markdown, JSON, Data Docs folder), `stage` (`run`, `validate_into`, `main`).
"""

from tasks.validate.checks import CHECKS, CheckResult, ValidationOutcome, input_failure
from tasks.validate.report import summary_markdown, write_docs, write_reports
from tasks.validate.stage import ValidationFailed, main, run, validate_into, validate_manifest

__all__ = ["CHECKS", "CheckResult", "ValidationFailed", "ValidationOutcome", "input_failure", "main", "run",
           "summary_markdown", "validate_into", "validate_manifest", "write_docs", "write_reports"]
