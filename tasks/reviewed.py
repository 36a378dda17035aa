"""The review list: image files a person has looked at and accepted as labelled, so the label-issue checks do not
flag them again (`data/label_reviewed.csv` in the pipeline, a DVC dependency of the label_issues stage).

A CSV with a header `path,note`: `path` as the pipeline's manifest writes it (relative to the data folder), `note`
optional free text. Read as text (a path like `NA` or `007` stays itself). A missing file means nothing is
reviewed; ingest creates an empty one (header only) when there is none, so DVC always finds the dependency.
"""

from __future__ import annotations

from pathlib import Path

from tasks.files import atomic_write

HEADER = "path,note\n"


def ensure_review_list(path: str | Path) -> bool:
    """Create an empty review list (header only) at `path` when there is none; True when one was created."""
    path = Path(path)
    if path.exists():
        return False
    atomic_write(path, HEADER)
    return True


def read_reviewed(path: str | Path | None) -> dict[str, str]:
    """path -> note of every reviewed file (an empty dict when `path` is None or missing). Raises ManifestError,
    naming the file, when it has no `path` column."""
    from tasks.manifest import ManifestError, read_table

    if path is None or not Path(path).is_file() or not Path(path).read_text(encoding="utf-8", errors="replace").strip():
        return {}
    table = read_table(path)
    if "path" not in table.columns:
        raise ManifestError(f"{path}: no 'path' column; a review list is a CSV with the header path,note")
    notes = table["note"] if "note" in table.columns else [""] * len(table)
    return {p.strip(): str(n) for p, n in zip(table["path"], notes) if p.strip()}
