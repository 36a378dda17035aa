"""Batch prediction (`finetune predict`): an exported model over image files, folders and manifests.

Streaming: paths are walked lazily, images are decoded in threads one batch ahead
(`OnnxClassifier.predict_files`), and each row is written as soon as its batch is done, so memory stays
at about two batches whatever the number of images. The model is resolved exactly as the server
resolves it (`deploy.service.Source`: a file, a registry version, or `champion`), and images go through
the same decode path and the same ONNX Runtime model, so the labels are the server's.

Output: CSV (default; `path,label,probability,p_<class>...,error`), JSON (`.json`: one array) or JSON Lines
(`.jsonl`), written atomically (a temp file renamed into place), or CSV on stdout without `--out`.
A file that cannot be read gets a row with `error` set; the others are still predicted.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

from deploy.service import Source
from tasks.files import atomic_path
from tasks.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from tasks.inference import FilePrediction, OnnxClassifier
from tasks.manifest import ManifestError, read_table

MANIFESTS = (".csv", ".parquet")
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}


class PredictError(ValueError):
    """Bad arguments for batch prediction; the message names the path and the fix."""


@dataclass(frozen=True)
class Summary:
    model: str
    version: str | None
    images: int
    errors: int
    out: str


def check_inputs(paths: list[Path]) -> None:
    """Fail before any work when an argument is neither a file nor a folder."""
    if not paths:
        raise PredictError("no inputs: give image files, folders or manifests (.csv/.parquet with a 'path' column)")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise PredictError(f"no such file or folder: {', '.join(missing)}")


def iter_images(paths: list[Path], root: Path | None = None) -> Iterator[Path]:
    """Every image the arguments name, lazily: files as given, folders walked in sorted order (image
    extensions only), manifests row by row (paths relative to `root`, default the manifest's folder)."""
    for path in paths:
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                        yield Path(folder) / name
        elif path.suffix.lower() in MANIFESTS:
            table = read_table(path)
            if "path" not in table.columns:
                raise ManifestError(f"{path}: a manifest needs a 'path' column (columns: {list(table.columns)})")
            base = root if root is not None else path.parent
            for rel in table["path"]:
                yield base / rel
        else:
            yield path


class _Writer:
    """Rows out as CSV, a JSON array or JSON Lines."""

    def __init__(self, stream: TextIO, fmt: str, classes: list[str]):
        self.stream, self.fmt, self.classes, self.n = stream, fmt, classes, 0
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["path", "label", "probability", *(f"p_{c}" for c in classes), "error"])
        elif fmt == "json":
            stream.write("[")

    def write(self, row: dict) -> None:
        if self.fmt == "csv":
            probs = row["probabilities"] or {}
            self.csv.writerow([row["path"], row["label"] or "", _num(row["probability"]),
                               *(_num(probs.get(c)) for c in self.classes), row["error"] or ""])
        elif self.fmt == "json":
            self.stream.write(("\n" if self.n == 0 else ",\n") + json.dumps(row))
        else:
            self.stream.write(json.dumps(row) + "\n")
        self.n += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.n else "]\n")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def row_of(prediction: FilePrediction, classes: list[str]) -> dict:
    if prediction.probabilities is None:
        return {"path": prediction.path, "label": None, "probability": None, "probabilities": None,
                "error": prediction.error}
    probs = prediction.probabilities
    best = int(probs.argmax())
    return {"path": prediction.path, "label": classes[best], "probability": float(probs[best]),
            "probabilities": {c: float(p) for c, p in zip(classes, probs)}, "error": None}


@contextmanager
def _output(out: Path | None) -> Iterator[TextIO]:
    if out is None:
        yield sys.stdout
        return
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as stream:
        yield stream


def predict(model: str, inputs: list[Path], out: Path | None = None, registry: Path = Path("registry"),
            root: Path | None = None, workers: int = 4, batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
            progress: bool = True) -> Summary:
    """Predict every image `inputs` names with `model` (a file, a registry version or 'champion')."""
    fmt = FORMATS.get(out.suffix.lower()) if out is not None else "csv"
    if fmt is None:
        raise PredictError(f"--out {out}: use a .csv, .json or .jsonl file name")
    check_inputs(inputs)
    path, version, _ = Source.parse(model, registry).locate()
    classifier = OnnxClassifier(path, batch_size=batch_size)
    errors = 0
    with _output(out) as stream:
        writer = _Writer(stream, fmt, classifier.classes)
        bar = tqdm(desc="predict", unit="img", disable=not progress or None, file=sys.stderr)
        for prediction in classifier.predict_files(iter_images(inputs, root), workers=workers, max_pixels=max_pixels):
            writer.write(row_of(prediction, classifier.classes))
            errors += prediction.error is not None
            bar.update(1)
        bar.close()
        writer.close()
    return Summary(str(path), version, writer.n, errors, str(out) if out else "-")
