"""The one reader for tables of images and labels: pipeline manifests, users' manifests, predictions.

Labels and paths are text as users write them: a class called `NA`, `null`, `nan` or `007` stays
that string (pandas would read the first three as missing and the last as the number 7). Empty
labels are refused by name. Numeric and boolean columns of the pipeline's own manifest are
converted explicitly.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SPLITS = ("train", "val", "test")
NUMERIC_COLUMNS = ("width", "height", "channels", "bytes", "probability")
BOOLEAN_COLUMNS = ("decodes_ok",)


class ManifestError(ValueError):
    """A table of images cannot be used; the message names the file, the row or column and the problem."""


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file with every column as text (nothing turned into NaN or a number)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
            return df.astype(object).where(df.notna(), "").astype(str)
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"{path}: cannot read ({reason})") from None


def require_labels(df: pd.DataFrame, source: str | Path, column: str = "label") -> None:
    """Refuse rows whose label is empty or only whitespace, naming them."""
    if column not in df.columns:
        return
    empty = df.index[df[column].astype(str).str.strip() == ""]
    if len(empty):
        rows = ", ".join(str(i + 2) for i in empty[:10])  # +2: 1-based, after the header line
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise ManifestError(f"{source}: empty {column} on line(s) {rows}{more}; every image needs a label")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A pipeline manifest (ingest or validate output): text columns as text, the rest typed."""
    df = read_table(path)
    for col in NUMERIC_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    for col in BOOLEAN_COLUMNS:
        if col in df.columns:
            df[col] = df[col].str.strip().str.lower().isin(("true", "1", "yes"))
    require_labels(df, path)
    return df


def classes_of(manifest: pd.DataFrame) -> list[str]:
    """The class names, sorted (the model's output order)."""
    return sorted(manifest["label"].astype(str).unique())


def rows_of(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    return manifest[manifest["split"] == split]
