"""`finetune validate PATH`: any image folder or manifest through ingest's reading and the validate
stage's checks, without the pipeline (it composes two stages, so it lives above them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tasks import validate as validate_mod
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.ingest import (
    SourceError,
    build_manifest,
    folder_classes,
    folder_table,
    manifest_table,
    probe_all,
    whole_splits,
)
from tasks.params import ValidateParams


def validate_path(path: Path, params: ValidateParams, out_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                  probe=None) -> validate_mod.ValidationOutcome:
    """`finetune validate PATH`: validate an image folder or a CSV/Parquet manifest without the pipeline.

    The manifest is built in memory (splits 0.25/0.10, the splits the source names kept: split folders, a
    `split` column); for a folder, its class sub-folders are the declared classes, so an empty one is reported.
    Reports go to `out_dir`: manifest.csv, validation.json, validation.md and docs/. `probe` replaces
    ingest's threaded probing (e.g. by the Dask-backed one of `flows.scale`; same rows).
    """
    start = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    classes = None
    try:
        if path.is_dir():
            table = folder_table(path)
            classes = folder_classes(path)
        elif not path.exists():
            raise SourceError(f"{path}: not found")
        elif path.suffix.lower() in (".csv", ".parquet"):
            table = manifest_table(path)
        else:
            raise SourceError(f"{path}: not an image folder nor a .csv/.parquet manifest")
    except SourceError as exc:
        outcome = validate_mod.input_failure(str(exc), start)
        validate_mod.write_reports(outcome, None, out_dir / "validation.json", out_dir / "validation.md")
        return outcome
    manifest = build_manifest(table, test=0.25, val=0.10, stratify_by=[], seed=42,
                              workers=min(8, os.cpu_count() or 1), max_pixels=max_pixels, probe=probe or probe_all,
                              complete=whole_splits("folder" if path.is_dir() else "manifest", table))
    outcome = validate_mod.write_docs(
        lambda d: validate_mod.validate_into(manifest, params, classes, None, d, max_pixels), out_dir / "docs")
    outcome.time_s = time.perf_counter() - start
    validate_mod.write_reports(outcome, out_dir / "manifest.csv", out_dir / "validation.json", out_dir / "validation.md")
    return outcome
