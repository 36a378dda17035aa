"""The tables the expectations run on, derived from the ingest manifest.

Checks about files run over `images_table` (one row per image, unknown values as nulls); checks about groups run
over small derived tables (images per class and split, split fractions), so GX names the offending group. The
leakage and label-conflict checks run over derived per-file columns (how many splits / labels hold the same
bytes), so GX still names the offending files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.manifest import SPLITS

log = logging.getLogger(__name__)


def truthy(value: Any) -> bool:
    """A manifest's boolean as CSV, Parquet or Python wrote it."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if pd.notna(value) else False


def normalise(manifest: pd.DataFrame) -> pd.DataFrame:
    """Types as the checks expect them, whatever a CSV/Parquet round trip did to them."""
    df = manifest.reset_index(drop=True).copy()
    for col in ("path", "label", "split", "mode", "sha256", "error"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    for col in ("width", "height"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64")
    df["decodes_ok"] = df["decodes_ok"].map(truthy).astype(bool)
    return df


def missing_files(manifest: pd.DataFrame, images_dir: Path) -> pd.DataFrame:
    """Mark rows whose file is not under `images_dir` as undecodable: training could not read them."""
    if "path" not in manifest.columns or "decodes_ok" not in manifest.columns:
        return manifest
    exists = manifest["path"].astype(str).map(lambda p: (images_dir / p).is_file())
    if exists.all():
        return manifest
    out = manifest.copy()
    out["decodes_ok"] = out["decodes_ok"].map(truthy) & exists
    if "error" not in out.columns:
        out["error"] = ""
    out["error"] = out["error"].astype(object).where(exists, f"file missing from {images_dir}")
    return out


def quarantine(df: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Under `quarantine`, drop undecodable rows and record them; under `fail`, keep everything."""
    if policy != "quarantine":
        return df, []
    bad = df[~df["decodes_ok"]]
    records = [
        {"path": r.path, "label": r.label, "split": r.split, "error": r.error or "does not decode"}
        for r in bad.itertuples(index=False)
    ]
    for r in records:
        log.warning("validate: quarantined %s (%s)", r["path"], r["error"])
    return df[df["decodes_ok"]], records


def images_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per image, with unknown values as nulls so GX skips them instead of failing them twice.

    A file that does not decode is reported by `decodes` only: its sha256 does not count for
    leakage (every empty file has the same hash) and its mode/size count only if known.
    """
    ok = df["decodes_ok"]
    known_size = (df["width"] > 0) & (df["height"] > 0)
    sha = df["sha256"].where(ok & (df["sha256"] != ""))
    by_content = sha.to_frame().assign(split=df["split"], label=df["label"]).dropna().groupby("sha256")
    n_splits = sha.map(by_content["split"].nunique())
    n_labels = sha.map(by_content["label"].nunique())
    return pd.DataFrame(
        {
            "row": df.index.astype("int64"),
            "path": df["path"],
            "label": df["label"],
            "split": df["split"],
            "decodes_ok": ok,
            "mode": df["mode"].where(df["mode"] != ""),
            "width": df["width"].where(known_size),
            "height": df["height"].where(known_size),
            "pixels": (df["width"] * df["height"]).where(known_size),
            "sha256": sha,
            "splits_with_same_content": n_splits,
            "labels_with_same_content": n_labels,
        }
    )


def counts_table(df: pd.DataFrame, classes: list[str] | None = None) -> pd.DataFrame:
    """Images per (label, split), including the zero cells a plain groupby would leave out (and the declared
    classes that have no image at all)."""
    counts = df.groupby(["label", "split"]).size()
    rows = [
        {"group": f"label={label} split={split}", "label": label, "split": split, "n": int(counts.get((label, split), 0))}
        for label in sorted(set(df["label"]) | set(classes or []))
        for split in SPLITS
    ]
    return pd.DataFrame(rows, columns=["group", "label", "split", "n"])


def fractions_table(df: pd.DataFrame, expected: dict[str, float], tolerance: float) -> pd.DataFrame:
    """Each split's fraction of the images beside the configured one."""
    total = max(len(df), 1)
    rows = []
    for split, want in expected.items():
        frac = float((df["split"] == split).sum()) / total
        rows.append({"group": f"split={split}", "split": split, "fraction": round(frac, 4), "expected": want,
                     "tolerance": tolerance, "deviation": round(abs(frac - want), 6)})
    return pd.DataFrame(rows, columns=["group", "split", "fraction", "expected", "tolerance", "deviation"])
