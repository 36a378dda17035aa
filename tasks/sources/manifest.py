"""The manifest source: a CSV/Parquet table `path,label[,split]` in the data folder, its paths relative to it.

A path may not leave the data folder (nor may a symbolic link's target). A `split` value pins its row (the usual
names are accepted, SPLIT_NAMES); rows without one are drawn into all three splits. The labels are the classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from tasks.manifest import SPLITS, ManifestError, read_table, require_labels
from tasks.params import DataParams
from tasks.sources.common import SPLIT_NAMES, SourceError, SourceTable, inside


def _read_checked(manifest: Path) -> pd.DataFrame:
    """The table as text, with its columns and labels checked; errors name the file."""
    if not manifest.is_file():
        raise SourceError(f"manifest not found: {manifest}")
    try:
        df = read_table(manifest)
    except ManifestError as exc:
        raise SourceError(str(exc)) from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise SourceError(f"{manifest}: missing column(s) {sorted(missing)}; expected path,label[,split]")
    if df.empty:
        raise SourceError(f"{manifest}: lists no images (only a header)")
    try:
        require_labels(df, manifest)
    except ManifestError as exc:
        raise SourceError(str(exc)) from None
    return df


def _splits(given: pd.Series, manifest: Path) -> pd.Series:
    """A manifest's split values in the pipeline's names ("" = draw the row's split); unknown ones refused."""
    given = given.fillna("").astype(str).str.strip()
    bad = sorted(set(given[~given.str.lower().isin(SPLIT_NAMES)]) - {""})
    if bad:
        raise SourceError(f"{manifest}: unknown split value(s) {bad}; allowed: {list(SPLITS)} (or "
                          f"{', '.join(n for n in SPLIT_NAMES if n not in SPLITS)}), or empty to draw the row's split")
    return given.str.lower().map(SPLIT_NAMES).fillna("")


def manifest_table(manifest: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """A CSV/Parquet manifest with `path,label[,split]`: paths relative to its folder, never outside `root`
    (default: its folder)."""
    manifest = Path(manifest)
    df = _read_checked(manifest)
    base = manifest.parent
    root = Path(root) if root is not None else base
    paths, sources = [], []
    for p in df["path"].astype(str):
        if not p.strip():
            raise SourceError(f"{manifest}: a row has an empty path")
        listed = Path(os.path.normpath(base / p))
        try:
            sources.append(inside(listed, root, f"{manifest}: path"))
        except OSError as exc:  # e.g. a symlink loop
            raise SourceError(f"{manifest}: path '{p}' cannot be resolved ({exc.strerror or exc})") from None
        paths.append(Path(os.path.relpath(listed, root)).as_posix())
    df = df.copy()
    df["path"] = paths
    df["source"] = [str(s) for s in sources]
    df["label"] = df["label"].astype(str)
    if "split" in df.columns:
        df["split"] = _splits(df["split"], manifest)
    return df


def read(data: DataParams) -> SourceTable:
    """`data.source: manifest`: the table `data.manifest` in the folder `data.path` (which DVC tracks whole)."""
    root = Path(data.path)
    if root.is_file():
        raise SourceError(f"data.path must be the folder holding the manifest and its images (DVC then tracks every "
                          f"image in it), not the file {root}: set data.path={root.parent} data.manifest={root.name}")
    if not root.is_dir():
        raise SourceError(f"data folder not found: {root}")
    return SourceTable(manifest_table(root / data.manifest, root), classes=None)
