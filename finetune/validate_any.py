"""`finetune validate PATH`: any image folder or manifest through the data sources' readers, ingest's splitting
and probing, and the validate stage's checks, without the pipeline (it composes two stages, so it lives above
them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tasks import validate as validate_mod
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.ingest import build_manifest, probe_all
from tasks.params import DataParams, Params, SplitParams, ValidateParams, stratify_columns
from tasks.sources.common import SourceError
from tasks.sources.readers import read_source


def source_for(path: Path, split: SplitParams) -> DataParams:
    """The data section that reads `path`: a folder is a folder source, a .csv/.parquet file a manifest source (its
    folder is the data folder)."""
    if path.is_dir():
        return DataParams(source="folder", path=str(path), split=split)
    if not path.exists():
        raise SourceError(f"{path}: not found")
    if path.suffix.lower() in (".csv", ".parquet"):
        return DataParams(source="manifest", path=str(path.parent), manifest=path.name, split=split)
    raise SourceError(f"{path}: not an image folder nor a .csv/.parquet manifest")


def validate_path(path: Path, params: ValidateParams, out_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                  probe=None, split: SplitParams | None = None, seed: int | None = None
                  ) -> validate_mod.ValidationOutcome:
    """`finetune validate PATH`: validate an image folder or a CSV/Parquet manifest without the pipeline.

    The manifest is built in memory, split as the pipeline would (`split`: params' data.split, `seed`: params'
    seed; their defaults when not given; stratified as the source's policy says), the splits the source names
    kept (split folders, a `split` column); for a folder, its class sub-folders are the declared classes, so an
    empty one is reported. Reports go to `out_dir`: manifest.csv, validation.json, validation.md and docs/.
    `probe` replaces ingest's threaded probing (e.g. by the Dask-backed one of `flows.scale`; same rows).
    """
    start = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    split = split if split is not None else SplitParams()
    seed = seed if seed is not None else Params.model_fields["seed"].default
    try:
        data = source_for(path, split)
        table = read_source(data)
        manifest = build_manifest(table.rows, split.test, split.val, stratify_columns(data), seed,
                                  workers=min(8, os.cpu_count() or 1), max_pixels=max_pixels,
                                  probe=probe or probe_all, complete=table.whole_splits)
    except SourceError as exc:  # the source is missing or unusable (or split.stratify_by names no column of it)
        outcome = validate_mod.input_failure(str(exc), start)
        validate_mod.write_reports(outcome, None, out_dir / "validation.json", out_dir / "validation.md")
        return outcome
    outcome = validate_mod.write_docs(
        lambda d: validate_mod.validate_into(manifest, params, table.classes, None, d, max_pixels), out_dir / "docs")
    outcome.time_s = time.perf_counter() - start
    validate_mod.write_reports(outcome, out_dir / "manifest.csv", out_dir / "validation.json", out_dir / "validation.md")
    return outcome


def check_labels(path: Path, outcome: validate_mod.ValidationOutcome, params: Params, out_dir: Path,
                 reviewed: Path | None = None, cache_dir: Path | None | str = "auto") -> dict:
    """The label_issues stage's checks on what `validate_path` validated: the backbone named in `params.model`
    (fetch_model's `tasks.backbones.create`, verified), features cached by content, every check of
    `params.label_issues`. Reports go to `out_dir` (label_issues.json/.md/.png, flagged.csv); returns the JSON's
    content (its `status` is blocked when label_issues.mode is block and flagged files are not reviewed)."""
    from tasks import backbones
    from tasks.features import backbone, cache_root
    from tasks.label_issues import inspect, verdict
    from tasks.label_issues.report import summary, write_all
    from tasks.reviewed import read_reviewed

    data_dir = Path(path) if Path(path).is_dir() else Path(path).parent  # manifest paths are relative to its folder
    m, li = params.model, params.label_issues
    model, meta = backbones.create(m.source, m.arch, m.weights, m.sha256)
    cache = cache_root(out_dir) if cache_dir == "auto" else cache_dir
    found, context = inspect(backbone(model, meta, li.image_size), outcome.manifest, data_dir, li, params.seed,
                             set(read_reviewed(reviewed)), cache, min(8, os.cpu_count() or 1), params.data.max_pixels)
    status, blocking = verdict(found, li)
    data = summary(found, li.mode, status, blocking, context)
    write_all(data, found, data_dir, out_dir, out_dir / "flagged.csv", str(reviewed or "a review list"),
              params.data.max_pixels)
    return data
