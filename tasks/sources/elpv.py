"""The bundled ELPV source: 2,624 solar-cell electroluminescence images from the `elpv-dataset` package.

The images stay in the installed package (its license forbids copying them into the repository); `data.path`
names a folder whose `SOURCE.json` pins the package's content by hash, so DVC sees a changed package as changed
data. Labels come from the experts' defect probability (0, 1/3, 2/3, 1): binary (defective above
`data.defect_threshold`) or four classes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.params import DataParams
from tasks.sources.common import SourceError, SourceTable

FOUR_CLASS = {0.0: "p0", 1 / 3: "p33", 2 / 3: "p67", 1.0: "p100"}
BINARY_CLASSES = ["defective", "functional"]


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
        df["label"] = df["probability"].map(lambda p: min(FOUR_CLASS.items(), key=lambda kv: abs(kv[0] - p))[1])
    df["source"] = df["path"].map(lambda p: str(root / p))
    df["path"] = df["path"].str.removeprefix("images/")
    return df[["path", "label", "probability", "type", "source"]]


def read(data: DataParams) -> SourceTable:
    """`data.source: elpv`: the pin checked when `data.path` names one, the labels for `data.task`."""
    if data.path:
        check_elpv_source(Path(data.path))
    classes = BINARY_CLASSES if data.task == "binary" else sorted(FOUR_CLASS.values())
    return SourceTable(elpv_table(data.task, data.defect_threshold), list(classes))
