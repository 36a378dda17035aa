"""Ingest stage: a data source -> `data/images/`, a split manifest (`data/manifest.csv`) and the
declared classes (`data/classes.json`).

Sources: the bundled ELPV set, an image folder (`root/<class>/**/*.png`, or split up front as
`root/<split>/<class>/**/*.png` with split folders train/, val/ (valid/, validation/) and test/), or a
CSV/Parquet manifest (`path,label[,split]`, paths relative to the manifest's folder, inside the data
folder). A split the source names for a row is kept. A folder's split folders are complete: the
images in train/ are drawn only into the splits that have no folder (a train/ and a test/ folder:
validation comes out of train/); a manifest's rows without a split are drawn into all three.
The manifest records, per image: path (relative to the images folder), label, split and what
`probe_image` finds (size, mode, bytes, sha256, decodes_ok, error). Broken, missing or unreadable
images are recorded, not dropped: the validate stage decides what to do with them. The declared
classes are every class the source names (a folder source's sub-folders, empty ones included), so
validation can tell that a class has no images. Symbolic links may point anywhere inside the data
folder and nowhere outside it, for every source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Collection

import numpy as np
import pandas as pd
from tqdm import tqdm

from tasks.crashpoints import crash_point
from tasks.entry import stage_main
from tasks.files import UMASK, atomic_path, fsync_dir, new_temp, write_json
from tasks.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, probe_image
from tasks.manifest import SPLITS, ManifestError, read_table, require_labels
from tasks.params import Params, stratify_columns

log = logging.getLogger(__name__)

ELPV_FOUR_CLASS = {0.0: "p0", 1 / 3: "p33", 2 / 3: "p67", 1.0: "p100"}


class SourceError(ValueError):
    """The data source is missing or unusable; the message names it."""


def elpv_root() -> Path:
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


def elpv_fingerprint(root: Path) -> dict:
    """Content hashes of the installed ELPV data (labels file; image names and bytes)."""
    h = hashlib.sha256()
    for f in sorted((root / "images").iterdir()):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return {"labels_sha256": hashlib.sha256((root / "labels.csv").read_bytes()).hexdigest(), "images_sha256": h.hexdigest()}


def check_elpv_source(source_dir: Path) -> None:
    """The installed package must hold exactly the data `source_dir/SOURCE.json` pins."""
    pin_file = Path(source_dir) / "SOURCE.json"
    if not pin_file.is_file():
        raise SourceError(f"{pin_file} not found: data.path must name the folder that pins the ELPV source (sources/elpv)")
    pinned = json.loads(pin_file.read_text())
    actual = elpv_fingerprint(elpv_root())
    for key, value in actual.items():
        if pinned.get(key) != value:
            raise SourceError(f"the installed elpv-dataset differs from {pin_file} ({key} {value[:12]}... != "
                              f"{str(pinned.get(key))[:12]}...); install version {pinned.get('version')} or update the pin")


def elpv_table(task: str = "binary", defect_threshold: float = 0.5) -> pd.DataFrame:
    """The bundled ELPV labels: binary (defective when probability > threshold) or 4 classes."""
    root = elpv_root()
    df = pd.read_csv(root / "labels.csv", sep=r"\s+", header=None, names=["path", "probability", "type"])
    df["probability"] = df["probability"].round(4)
    if task == "binary":
        df["label"] = np.where(df["probability"] > defect_threshold, "defective", "functional")
    else:
        df["label"] = df["probability"].map(lambda p: min(ELPV_FOUR_CLASS.items(), key=lambda kv: abs(kv[0] - p))[1])
    df["source"] = df["path"].map(lambda p: str(root / p))
    df["path"] = df["path"].str.removeprefix("images/")
    return df[["path", "label", "probability", "type", "source"]]


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved (links followed), refused when it lands outside `root`: one policy for every source."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        how = (f" (it links to {resolved}); copy the file into the data folder instead of linking to it"
               if path.is_symlink() else "")
        raise SourceError(f"{what} '{path}' is outside the data folder {root}{how}")
    return resolved


# the usual names of the splits (case-insensitive): split folders of a `root/<split>/<class>/<image>` layout (Keras,
# an ImageFolder per split, Kaggle) and a manifest's `split` values
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def _skipped(name: str) -> bool:
    """Hidden files and folders (`.DS_Store`, macOS's `._*` resource forks, `.ipynb_checkpoints`) and the `__MACOSX`
    folder a macOS zip unpacks into: never images of the data set."""
    return name.startswith(".") or name == "__MACOSX"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _skipped(p.name))


def split_folders(root: str | Path) -> dict[str, Path] | None:
    """The split folders when `root` is split up front (`root/<split>/<class>/<image>`), else None.

    Split-shaped means: every visible sub-folder is named like a split (SPLIT_NAMES) and one of them holds
    class folders. So classes that happen to be called `train` and `test`, holding images, stay classes."""
    root = Path(root)
    top = _subfolders(root)
    named = [p for p in top if p.name.lower() in SPLIT_NAMES]
    if not named or not any(_subfolders(p) for p in named):
        return None
    others = [p.name for p in top if p not in named]
    if others:
        raise SourceError(f"{root} mixes split folders ({', '.join(p.name for p in named)}) with other folders "
                          f"({', '.join(others)}): put every class folder under a split folder "
                          f"(<path>/<split>/<class>/<image>) or use no split folders at all (<path>/<class>/<image>; "
                          f"rename a class folder that is named like a split)")
    found: dict[str, Path] = {}
    for p in named:
        split = SPLIT_NAMES[p.name.lower()]
        if split in found:
            raise SourceError(f"{root}: both {found[split].name}/ and {p.name}/ name the {split} split; keep one")
        loose = [f.name for f in sorted(p.iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not _skipped(f.name)]
        if loose:
            raise SourceError(f"{p}: {len(loose)} image(s) directly in the split folder, outside any class folder "
                              f"(e.g. {loose[0]}): put them in {p.name}/<class>/, or move unlabelled images out of "
                              f"the data folder")
        found[split] = p
    return found


def folder_classes(root: str | Path) -> list[str]:
    """The classes a folder declares: its visible sub-folders (under each split folder when it is split up front),
    empty ones included."""
    splits = split_folders(root)
    folders = _subfolders(Path(root)) if splits is None else [c for p in splits.values() for c in _subfolders(p)]
    return sorted({p.name for p in folders})


def folder_table(root: str | Path) -> pd.DataFrame:
    """`root/<class>/**/<image>` -> rows (path relative to root, label = first folder); `root/<split>/<class>/...`
    -> the same with the split named by the split folder."""
    root = Path(root)
    if root.is_file():
        raise SourceError(f"data.path must be a folder of class folders (<path>/<class>/<image>), not the file {root}"
                          + ("; a CSV/Parquet table of images is data.source=manifest" if root.suffix.lower() in
                             (".csv", ".parquet") else ""))
    if not root.is_dir():
        raise SourceError(f"data folder not found: {root}")
    splits = split_folders(root)
    parents = {"": root} if splits is None else splits
    rows = []
    for split, parent in parents.items():
        for class_dir in _subfolders(parent):
            label = class_dir.name
            if not label.strip():
                raise SourceError(f"class folder {str(class_dir)!r} has a blank name; a label needs a visible character")
            inside(class_dir, root, "class folder")
            for f in sorted(class_dir.rglob("*")):
                if (f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                        and not any(_skipped(part) for part in f.relative_to(class_dir).parts)):
                    inside(f, root, "image")
                    # train/ is the pool the missing splits are drawn from (all of it trains when val/ and test/
                    # both exist)
                    rows.append({"path": f.relative_to(root).as_posix(), "label": label, "source": str(f),
                                 **({"split": "" if split == "train" else split} if splits is not None else {})})
    if not rows:
        raise SourceError(f"no images found in {root} (expected {root}/<class>/<image>{'|'.join(IMAGE_EXTENSIONS)})")
    return pd.DataFrame(rows)


def manifest_table(manifest: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """A CSV/Parquet manifest with `path,label[,split]`: paths relative to its folder, never outside `root`
    (default: its folder)."""
    manifest = Path(manifest)
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
        given = df["split"].fillna("").astype(str).str.strip()
        bad = sorted(set(given[~given.str.lower().isin(SPLIT_NAMES)]) - {""})
        if bad:
            raise SourceError(f"{manifest}: unknown split value(s) {bad}; allowed: {list(SPLITS)} (or "
                              f"{', '.join(n for n in SPLIT_NAMES if n not in SPLITS)}), or empty to draw the row's split")
        df["split"] = given.str.lower().map(SPLIT_NAMES).fillna("")
    return df


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


def given_splits(df: pd.DataFrame) -> list[str]:
    """The splits a source table names itself (split folders, a manifest's `split` column)."""
    if "split" not in df.columns:
        return []
    return sorted(set(df["split"].fillna("").astype(str)) - {""})


def whole_splits(source: str, table: pd.DataFrame) -> list[str]:
    """The splits nothing more is drawn into: a split folder is the whole split; a manifest's split values only pin
    their rows."""
    return given_splits(table) if source == "folder" else []


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


def source_table(source: str, path: str | None, task: str, defect_threshold: float,
                 manifest_name: str = "manifest.csv") -> tuple[pd.DataFrame, list[str]]:
    """The source's rows (path, label, source file, ...) and the classes it declares."""
    if source == "elpv":
        if path:
            check_elpv_source(Path(path))
        classes = ["defective", "functional"] if task == "binary" else sorted(ELPV_FOUR_CLASS.values())
        return elpv_table(task, defect_threshold), classes
    if source == "folder":
        table = folder_table(path)
        return table, folder_classes(path)
    root = Path(path)
    if root.is_file():
        raise SourceError(f"data.path must be the folder holding the manifest and its images (DVC then tracks every "
                          f"image in it), not the file {root}: set data.path={root.parent} data.manifest={root.name}")
    if not root.is_dir():
        raise SourceError(f"data folder not found: {root}")
    table = manifest_table(root / manifest_name, root)
    return table, sorted(table["label"].unique())


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
    """Copy the source images under `images_dir` (built beside it, then swapped in whole).

    A file that cannot be read is not copied; its row keeps `decodes_ok` false with the reason, for
    validation to judge. Nothing half-built is left behind, whatever fails (a kill included: the
    next run starts by removing leftovers)."""
    images_dir = Path(images_dir)
    df = df.copy()
    tmp = new_temp(images_dir, directory=True)
    old = None
    try:
        for i, (src, rel) in enumerate(tqdm(zip(df["source"], df["path"]), total=len(df), desc="copy images",
                                            unit="img", disable=None)):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, dst)
            except OSError as exc:
                df.loc[df.index[i], ["decodes_ok", "error"]] = [False, f"unreadable ({exc.strerror or exc})"]
        tmp.chmod(0o777 & ~UMASK)
        crash_point("ingest:copied")
        if images_dir.exists():
            old = new_temp(images_dir, directory=True)
            os.replace(images_dir, old)  # onto the empty temp folder: one rename
        os.replace(tmp, images_dir)
        fsync_dir(images_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return df


def run(source: str, path: str | None, task: str, defect_threshold: float, test: float, val: float,
        stratify_by: list[str], seed: int, workers: int, images_dir: Path, manifest_path: Path,
        max_pixels: int = DEFAULT_MAX_PIXELS, classes_path: Path | None = None,
        manifest_name: str = "manifest.csv") -> pd.DataFrame:
    """The ingest stage: read the source, split, probe, materialise images, the manifest and the classes."""
    table, classes = source_table(source, path, task, defect_threshold, manifest_name)
    log.info("ingest: %d images from %s source, classes %s", len(table), source, classes)
    named = given_splits(table)
    if named:
        log.info("ingest: the split(s) the source names are kept: %s", ", ".join(named))
    manifest = materialise(build_manifest(table, test, val, stratify_by, seed, workers, max_pixels,
                                          complete=whole_splits(source, table)), images_dir)
    with atomic_path(manifest_path) as tmp:
        manifest.drop(columns=["source"]).to_csv(tmp, index=False)
    if classes_path is not None:
        write_json(classes_path, {"classes": classes, "source": source, "given_splits": named})
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("ingest: split counts\n%s", counts.to_string())
    return manifest


def main(argv: list[str] | None = None) -> None:
    stage_main("ingest", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    d = p.data
    run(d.source, d.path, d.task, d.defect_threshold, d.split.test, d.split.val, stratify_columns(d), p.seed,
        d.workers, args.images, args.manifest, max_pixels=d.max_pixels, classes_path=args.classes,
        manifest_name=d.manifest)


if __name__ == "__main__":
    main()
