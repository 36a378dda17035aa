"""The image-folder source: `root/<class>/**/<image>`, or split up front as `root/<split>/<class>/**/<image>`.

Split folders (train/, val/ or valid/ or validation/, test/; SPLIT_NAMES) are whole splits: only the splits that
have no folder are drawn, from train/. The declared classes are every class folder, empty ones included, so
validation can tell that a class has no images. Hidden files and folders and macOS zip leftovers are never
images of the data set.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.images import IMAGE_EXTENSIONS
from tasks.params import DataParams
from tasks.sources.common import SPLIT_NAMES, SourceError, SourceTable, given_splits, inside


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


def _class_images(class_dir: Path) -> list[Path]:
    """The images under one class folder, at any depth, hidden ones left out."""
    return [f for f in sorted(class_dir.rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            and not any(_skipped(part) for part in f.relative_to(class_dir).parts)]


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
            for f in _class_images(class_dir):
                inside(f, root, "image")
                # train/ is the pool the missing splits are drawn from (all of it trains when val/ and test/ both
                # exist)
                rows.append({"path": f.relative_to(root).as_posix(), "label": label, "source": str(f),
                             **({"split": "" if split == "train" else split} if splits is not None else {})})
    if not rows:
        raise SourceError(f"no images found in {root} (expected {root}/<class>/<image>{'|'.join(IMAGE_EXTENSIONS)})")
    return pd.DataFrame(rows)


def read(data: DataParams) -> SourceTable:
    """`data.source: folder`: the images under `data.path`, its class folders, its split folders as whole splits."""
    rows = folder_table(data.path)
    return SourceTable(rows, folder_classes(data.path), whole_splits=given_splits(rows))
