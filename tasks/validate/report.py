"""What a validation leaves for people and for the next stage: the Markdown summary, the results JSON, the
validated manifest, and the Data Docs folder (GX's HTML, or the summary as HTML when GX could not render).

Every file is written atomically; the Data Docs folder is built in a temp folder and swapped in whole
(`tasks.files.atomic_dir`), so a reader never sees half of it.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Callable

from tasks.files import atomic_dir, atomic_path, atomic_write, write_json
from tasks.validate.checks import OFFENDING_CAP, ValidationOutcome

log = logging.getLogger(__name__)


def log_outcome(outcome: ValidationOutcome) -> None:
    log.info("validate: %d images, %d quarantined, %s in %.2fs (%s)", outcome.n_images, len(outcome.quarantined),
             "PASSED" if outcome.success else "FAILED", outcome.time_s,
             ", ".join(f"{k}={v:.2f}" for k, v in outcome.timings.items()))
    for message in outcome.failures:
        log.error("validate: %s", message)
    for message in outcome.warnings:
        log.warning("validate: %s", message)


def summary_markdown(outcome: ValidationOutcome) -> str:
    """A short human summary: verdict, the checks table, then the offending items per failed check."""
    verdict = "PASSED" if outcome.success else "FAILED"
    lines = [
        f"# Data validation: {verdict}",
        "",
        f"{outcome.n_images} images, {len(outcome.quarantined)} quarantined, {len(outcome.manifest)} validated "
        f"in {outcome.time_s:.2f}s.",
        "",
        "| check | status | blocking | offending |",
        "|---|---|---|---|",
        *(f"| {c.name} | {c.status} | {'yes' if c.blocking else 'no'} | {len(c.offending)} |" for c in outcome.checks),
    ]
    for c in outcome.checks:
        if c.status not in ("failed", "warning"):
            continue
        lines += ["", f"## {c.status.upper()}: {c.name}", "", f"Expected {c.description}.", ""]
        lines += [f"- `{o['item']}`" + (f": {o['detail']}" if o["detail"] else "") for o in c.offending[:OFFENDING_CAP]]
        if len(c.offending) > OFFENDING_CAP:
            lines.append(f"- ... and {len(c.offending) - OFFENDING_CAP} more (see results JSON)")
    if outcome.quarantined:
        lines += ["", "## Quarantined (removed from the validated manifest)", ""]
        lines += [f"- `{q['path']}`: {q['error']}" for q in outcome.quarantined[:OFFENDING_CAP]]
        if len(outcome.quarantined) > OFFENDING_CAP:
            lines.append(f"- ... and {len(outcome.quarantined) - OFFENDING_CAP} more (see results JSON)")
    return "\n".join(lines) + "\n"


def fallback_html(outcome: ValidationOutcome) -> str:
    """The summary as a page, for when GX did not run or could not render its Data Docs."""
    return f"<html><body><pre>{html.escape(summary_markdown(outcome))}</pre></body></html>\n"


def write_docs(build: Callable[[Path], ValidationOutcome], docs_dir: Path) -> ValidationOutcome:
    """`build(folder)` validates, rendering Data Docs into `folder` (a temp folder); the folder then replaces
    `docs_dir` whole, with the summary as its page when GX left none."""
    with atomic_dir(docs_dir) as tmp:
        outcome = build(tmp)
        if not (tmp / "index.html").exists():
            atomic_write(tmp / "index.html", fallback_html(outcome))
    return outcome


def write_reports(outcome: ValidationOutcome, out_manifest: Path | None, results_json: Path, summary_md: Path) -> None:
    """The validated manifest (CSV or Parquet, by its suffix; none when `out_manifest` is None), the results JSON
    and the Markdown summary."""
    if out_manifest is not None:
        with atomic_path(out_manifest) as tmp:
            frame = outcome.manifest.drop(columns=["source"], errors="ignore")
            if Path(out_manifest).suffix.lower() == ".parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False)
    write_json(results_json, outcome.to_json())
    atomic_write(summary_md, summary_markdown(outcome))
