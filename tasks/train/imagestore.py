"""Decoded images on disk: each split's uint8 (N, 3, S, S) array in a file, decoded once per data version and size.

A store is a folder `<cache>/<fingerprint>/` holding `images.u8` (the raw C-order array: `np.memmap` opens
it) and `header.json` (shape, dtype, fingerprint). The fingerprint covers what the pixels depend on: each
image's path and content hash in manifest order, the size, and the decoder's source (`tasks/images.py`),
so a changed image, size or decode path gets a new store and an unchanged split is never decoded again.
It is filled in chunks (bounded memory, decode threads) inside a temp folder that is renamed into place
when complete: a reader sees a whole store or none, and a killed build leaves only a temp that the next
writer sweeps. Training reads random batches from it (`tasks.train.rowfile`): the same uint8 values the
in-memory tensor holds, so training on either gives the same weights.

Where: `$FINETUNE_CACHE_DIR` if set, else `.dvc/tmp/finetune/cache` in the DVC project (ignored by git
and DVC, on the project's filesystem, so the final rename is atomic), else `.finetune/cache` in the
current folder. Delete it at any time; stores are rebuilt when needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from tasks import images as decoder
from tasks.crashpoints import crash_point
from tasks.files import atomic_dir, read_json
from tasks.images import DEFAULT_MAX_PIXELS, load_for_model
from tasks.train.rowfile import RowFile, scratch_rows

log = logging.getLogger(__name__)
VERSION = 1
CACHE_ENV = "FINETUNE_CACHE_DIR"
CHUNK = 256  # images decoded (and resized) per chunk: bounds the memory a build needs


class ImageStore:
    """uint8 images (N, 3, S, S) in a RowFile, indexed like the in-memory tensor: `store[idx]` is a tensor."""

    def __init__(self, rows: RowFile, folder: Path | None = None):
        self.rows, self.folder = rows, folder

    @classmethod
    def open(cls, folder: Path) -> "ImageStore":
        header = read_json(folder / "header.json")
        n, *row = header["shape"]
        return cls(RowFile(folder / "images.u8", n, tuple(row), header["dtype"]), folder)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.rows.row)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        elif isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        return torch.from_numpy(self.rows.read(idx))


def cache_root(near: str | Path = ".") -> Path:
    """Where stores live (see the module docstring): the DVC project is the one holding `near`, or the cwd."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    start = Path(near).absolute()
    for parent in (start, *start.parents):
        if (parent / ".dvc").is_dir():
            return parent / ".dvc" / "tmp" / "finetune" / "cache"
    return Path.cwd() / ".finetune" / "cache"


def fingerprint(paths: list[Path], hashes: list[str] | None, size: int) -> str:
    """What the decoded pixels depend on: paths and contents in order, size, store version, decoder source."""
    h = hashlib.sha256(json.dumps({"version": VERSION, "size": size}).encode())
    h.update(hashlib.sha256(Path(decoder.__file__).read_bytes()).digest())
    for i, p in enumerate(paths):
        if hashes is not None and hashes[i]:
            content = hashes[i]
        else:  # no content hash in the table: size and mtime stand in for it
            st = os.stat(p)
            content = f"{st.st_size}:{st.st_mtime_ns}"
        h.update(f"{p}\0{content}\n".encode())
    return h.hexdigest()


def build(folder: Path, n: int, size: int, fill: Callable[[int, int], np.ndarray], key: str,
          desc: str | None = None) -> ImageStore:
    """Write a store to `folder` chunk by chunk (`fill(start, stop)` -> uint8 (stop - start, 3, size, size)),
    atomically: into a temp folder, swapped into place when whole. A store another process finished first wins."""
    with atomic_dir(folder, first_wins=True) as tmp:
        rows = RowFile(tmp / "images.u8", n, (3, size, size), np.uint8, create=True)
        for start in tqdm(range(0, n, CHUNK), desc=desc, unit="chunk", leave=False, disable=None if desc else True):
            stop = min(start + CHUNK, n)
            rows.write(np.arange(start, stop), fill(start, stop))
        rows.sync()
        rows.close()
        crash_point("imagestore:filled")  # tests: killed with the data written, before the swap
        header = {"version": VERSION, "fingerprint": key, "shape": [n, 3, size, size], "dtype": "uint8"}
        with open(tmp / "header.json", "w") as f:
            f.write(json.dumps(header, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return ImageStore.open(folder)


def decode_into(paths: list[Path], size: int, workers: int, max_pixels: int) -> Callable[[int, int], np.ndarray]:
    """A `fill` for `build` that decodes files with the one decode path, in threads."""
    def fill(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, 3, size, size), dtype=np.uint8)

        def one(i: int) -> None:
            out[i - start] = load_for_model(paths[i], size, max_pixels)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(start, stop)))
        return out

    return fill


def store_folder(manifest: pd.DataFrame, images_dir: Path, split: str, size: int,
                 root: Path | None = None) -> tuple[Path, list[Path]]:
    """The folder of one split's store at `size` (it may not exist yet) and the split's image paths."""
    rows = manifest[manifest["split"] == split]
    paths = [Path(images_dir) / p for p in rows["path"]]
    hashes = list(rows["sha256"]) if "sha256" in rows.columns else None
    return (root or cache_root(images_dir)) / fingerprint(paths, hashes, size), paths


def split_store(manifest: pd.DataFrame, images_dir: Path, split: str, size: int, workers: int = 4,
                max_pixels: int = DEFAULT_MAX_PIXELS, root: Path | None = None) -> ImageStore:
    """The store of one split's images at `size`: opened when this data version was decoded before, else built."""
    folder, paths = store_folder(manifest, images_dir, split, size, root)
    key = folder.name
    if (folder / "header.json").exists():
        try:
            store = ImageStore.open(folder)
            if read_json(folder / "header.json").get("fingerprint") == key and store.shape == (len(paths), 3, size,
                                                                                                 size):
                log.info("%s images: decoded store %s", split, folder)
                return store
        except (OSError, ValueError, KeyError):
            pass
        log.warning("%s images: store %s is unreadable; decoding again", split, folder)
        shutil.rmtree(folder, ignore_errors=True)
    log.info("%s images: decoding %d files at %d px into %s", split, len(paths), size, folder)
    return build(folder, len(paths), size, decode_into(paths, size, workers, max_pixels), key, f"decode {split}")


def derived(store: ImageStore, size: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> ImageStore:
    """A scratch store of `transform` applied chunk by chunk (e.g. resized for a low-resolution stage); the file is
    nameless and goes away with the store."""
    rows = scratch_rows(store.folder or cache_root(), f"resized-{size}", len(store), (3, size, size), np.uint8)
    for start in range(0, len(store), CHUNK):
        stop = min(start + CHUNK, len(store))
        rows.write(np.arange(start, stop), transform(store[start:stop]).numpy())
    return ImageStore(rows)
