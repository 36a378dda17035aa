"""What every source reader shares: its result (`SourceTable`), its error, the data-folder boundary, split names.

One policy for every source: a file (or a symbolic link's target) outside the data folder is refused, and a split
is named the same way whether a folder or a manifest names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# the usual names of the splits (case-insensitive): split folders of a `root/<split>/<class>/<image>` layout (Keras,
# an ImageFolder per split, Kaggle) and a manifest's `split` values
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


class SourceError(ValueError):
    """The data source is missing or unusable; the message names it."""


@dataclass
class SourceTable:
    """What a source reader returns.

    rows: one per image: path (relative to the data folder, as the images folder will hold it), label, source (the
    file to copy) and, when the source has them, split ("" = to be drawn), probability, type.
    classes: the classes the source declares apart from its rows (a folder's class folders, empty ones included;
    ELPV's task), or None when its labels are its classes (a manifest).
    whole_splits: the splits the source names as whole splits (a split folder): nothing more is drawn into them.
    """

    rows: pd.DataFrame
    classes: list[str] | None
    whole_splits: list[str] = field(default_factory=list)

    def class_names(self) -> list[str]:
        """The declared classes, else the labels present."""
        return list(self.classes) if self.classes is not None else sorted(self.rows["label"].unique())


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved (links followed), refused when it lands outside `root`: one policy for every source."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        how = (f" (it links to {resolved}); copy the file into the data folder instead of linking to it"
               if path.is_symlink() else "")
        raise SourceError(f"{what} '{path}' is outside the data folder {root}{how}")
    return resolved


def given_splits(rows: pd.DataFrame) -> list[str]:
    """The splits a source table names itself (split folders, a manifest's `split` column)."""
    if "split" not in rows.columns:
        return []
    return sorted(set(rows["split"].fillna("").astype(str)) - {""})
