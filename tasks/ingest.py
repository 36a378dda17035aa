"""Ingest stage: a data source -> `data/images/`, a split manifest (`data/manifest.csv`) and the
declared classes (`data/classes.json`).

The sources (the bundled ELPV set, an image folder, a CSV/Parquet manifest) are read by `tasks.sources`;
this stage splits, probes and materialises what they return. A split the source names for a row is kept;
the splits a source names as whole splits (a folder's split folders) are not drawn into (a train/ and a
test/ folder: validation comes out of train/); a manifest's rows without a split are drawn into all three.
The manifest records, per image: path (relative to the images folder), label, split and what
`probe_image` finds (size, mode, bytes, sha256, decodes_ok, error). Broken, missing or unreadable
images are recorded, not dropped: the validate stage decides what to do with them. The declared
classes are every class the source names (a folder source's sub-folders, empty ones included), so
validation can tell that a class has no images. It also creates the label review list (`path,note`, header only)
when there is none: the label_issues stage depends on it, and a person adds the files they accept to it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Collection

import pandas as pd
from tqdm import tqdm

from tasks.crashpoints import crash_point
from tasks.entry import stage_main
from tasks.files import atomic_dir, atomic_path, write_json
from tasks.images import DEFAULT_MAX_PIXELS, probe_image
from tasks.params import DataParams, Params, stratify_columns
from tasks.reviewed import ensure_review_list
from tasks.sources.common import SourceError, given_splits
from tasks.sources.readers import read_source

log = logging.getLogger(__name__)


def _stable_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def assign_splits(df: pd.DataFrame, test: float, val: float, stratify_by: list[str], seed: int,
                  complete: Collection[str] = ()) -> pd.Series:
    """Deterministic split, stratified by label plus `stratify_by` columns.

    Within each stratum, rows are ordered by a seeded hash of their path (independent of input
    order) and the first round(n*test) go to test, the next round(n*val) to val. An existing
    `split` column is respected for the rows that have one; the splits in `complete` are not drawn
    into (a folder split up front: its test/ folder is the whole test split).
    """
    missing = [c for c in stratify_by if c not in df.columns]
    if missing:
        raise SourceError(f"split.stratify_by names column(s) {missing} that the source does not have")
    split = pd.Series("", index=df.index, dtype=object)
    if "split" in df.columns:
        given = df["split"].fillna("").astype(str)
        split[given != ""] = given[given != ""]
    test, val = (0.0 if "test" in complete else test), (0.0 if "val" in complete else val)
    todo = df[split == ""]
    keys = ["label", *stratify_by]
    for _, group in todo.groupby(keys, sort=True, dropna=False):
        order = sorted(group.index, key=lambda i: _stable_key(seed, str(group.at[i, "path"])))
        n = len(order)
        n_test = int(round(n * test))
        n_val = int(round(n * val))
        if n - n_test - n_val < 1 and n > 0:  # keep at least one training example per stratum
            n_val = max(0, n - n_test - 1)
        for rank, i in enumerate(order):
            split[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


PROBE_CHUNK = 4096  # images probed per chunk: one chunk's rows are Python objects, the rest are columns


def probe_all(sources: list[str], workers: int, max_pixels: int, chunk: int = PROBE_CHUNK) -> pd.DataFrame:
    """Probe every image in parallel (PIL releases the GIL while decoding), with a progress bar. Chunk by chunk:
    only one chunk's futures and row dicts exist at a time (a million submitted at once would cost ~1 KB each)."""
    parts = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(sources), desc="probe images", unit="img", disable=None) as bar:
        for start in range(0, len(sources), chunk):
            rows = []
            for row in pool.map(lambda s: probe_image(s, max_pixels), sources[start : start + chunk]):
                rows.append(row)
                bar.update()
            parts.append(pd.DataFrame(rows))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def build_manifest(table: pd.DataFrame, test: float, val: float, stratify_by: list[str], seed: int,
                   workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS, probe=probe_all,
                   complete: Collection[str] = ()) -> pd.DataFrame:
    """The source table with its split and each image's probe (`probe(sources, workers, max_pixels)`:
    threads here; `finetune validate --dask-workers` passes a Dask-backed one with the same rows)."""
    df = table.reset_index(drop=True).copy()
    df["split"] = assign_splits(df, test, val, stratify_by, seed, complete)
    probes = probe(df["source"].tolist(), workers, max_pixels)
    df = pd.concat([df, probes], axis=1)
    front = ["path", "label", "split"]
    return df[front + [c for c in df.columns if c not in front]]


def materialise(df: pd.DataFrame, images_dir: Path) -> pd.DataFrame:
    """Copy the source images under `images_dir` (built in a temp folder, then swapped in whole).

    A file that cannot be read is not copied; its row keeps `decodes_ok` false with the reason, for
    validation to judge. Nothing half-built is left behind, whatever fails (a kill included: the
    next run sweeps the leftovers)."""
    df = df.copy()
    with atomic_dir(images_dir) as tmp:
        for i, (src, rel) in enumerate(tqdm(zip(df["source"], df["path"]), total=len(df), desc="copy images",
                                            unit="img", disable=None)):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, dst)
            except OSError as exc:
                df.loc[df.index[i], ["decodes_ok", "error"]] = [False, f"unreadable ({exc.strerror or exc})"]
        crash_point("ingest:copied")
    return df


def run(source: str, path: str | None, task: str, defect_threshold: float, test: float, val: float,
        stratify_by: list[str], seed: int, workers: int, images_dir: Path, manifest_path: Path,
        max_pixels: int = DEFAULT_MAX_PIXELS, classes_path: Path | None = None,
        manifest_name: str = "manifest.csv", reviewed_path: Path | None = None) -> pd.DataFrame:
    """The ingest stage: read the source, split, probe, materialise images, the manifest and the classes (and an
    empty label review list at `reviewed_path` when there is none)."""
    table = read_source(DataParams(source=source, path=path, task=task, defect_threshold=defect_threshold,
                                   manifest=manifest_name))
    classes = table.class_names()
    log.info("ingest: %d images from %s source, classes %s", len(table.rows), source, classes)
    named = given_splits(table.rows)
    if named:
        log.info("ingest: the split(s) the source names are kept: %s", ", ".join(named))
    manifest = materialise(build_manifest(table.rows, test, val, stratify_by, seed, workers, max_pixels,
                                          complete=table.whole_splits), images_dir)
    with atomic_path(manifest_path) as tmp:
        manifest.drop(columns=["source"]).to_csv(tmp, index=False)
    if classes_path is not None:
        write_json(classes_path, {"classes": classes, "source": source, "given_splits": named})
    if reviewed_path is not None and ensure_review_list(reviewed_path):
        log.info("ingest: created an empty label review list %s (path,note)", reviewed_path)
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("ingest: split counts\n%s", counts.to_string())
    return manifest


def main(argv: list[str] | None = None) -> None:
    stage_main("ingest", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    d = p.data
    run(d.source, d.path, d.task, d.defect_threshold, d.split.test, d.split.val, stratify_columns(d), p.seed,
        d.workers, args.images, args.manifest, max_pixels=d.max_pixels, classes_path=args.classes,
        manifest_name=d.manifest, reviewed_path=args.reviewed)


if __name__ == "__main__":
    main()
