"""Using an exported model: ONNX Runtime session, metadata, preprocessing, batch prediction.

What serving, batch prediction and the gate's champion scoring share. It imports neither torch nor
prefect (a test checks), so a serving image needs only onnxruntime, numpy and Pillow. Everything a
consumer needs is in the ONNX file's metadata: `classes` (JSON list, the output order),
`preprocessing` (the `tasks.preprocess.Preprocessing` record) and the lineage the export wrote.
The graph takes uint8 images and outputs `logits` and `probabilities` (softmax inside the graph), and, when exported
with a drift reference, `embedding` (the pooled features the server's drift monitoring tests: tasks/drift.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from tasks.images import DEFAULT_MAX_PIXELS, ImageError
from tasks.preprocess import Preprocessing

INPUT = "image"
OUTPUTS = ("logits", "probabilities")
EMBEDDING = "embedding"  # the optional third output: pooled features before the classifier


class ModelError(ValueError):
    """An ONNX file that is not a usable model of this pipeline; the message names the file and the problem."""


@dataclass(frozen=True)
class FilePrediction:
    """One file's outcome: probabilities in `classes` order, or the reason it could not be read."""

    path: str
    probabilities: np.ndarray | None
    error: str | None = None


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with full graph optimisation (`threads`: intra-op threads, None = all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable ONNX model ({reason})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata the export wrote into the file (classes, preprocessing, lineage, metrics...)."""
    return dict(session(path, threads=1).get_modelmeta().custom_metadata_map)


class OnnxClassifier:
    """An exported classifier, loaded once; thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 32):
        self.path = Path(path)
        self.session = session(self.path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.classes: list[str] = [str(c) for c in json.loads(self.metadata["classes"])]
            self.preprocessing = Preprocessing.from_json(self.metadata["preprocessing"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{self.path}: metadata lacks a usable 'classes'/'preprocessing' record ({exc}); "
                             "export it with this pipeline") from None
        names = {i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()}
        if names[0] != {INPUT} or not set(OUTPUTS) <= names[1]:
            raise ModelError(f"{self.path}: expected input '{INPUT}' and outputs {list(OUTPUTS)}, found "
                             f"{sorted(names[0])} and {sorted(names[1])}")
        self.batch_size = batch_size
        self.has_embedding = EMBEDDING in names[1]

    def load(self, source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """A file -> this model's input (uint8, (3, size, size)), through the one decode path."""
        return self.preprocessing.load(source, max_pixels)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, 3, size, size) -> (logits, probabilities), in batches of `batch_size`."""
        logits, probs = self._outputs(self._checked(images), OUTPUTS)
        return logits, probs

    def run_with_embedding(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 images -> (logits, probabilities, embedding), for a model exported with its `embedding` output."""
        if not self.has_embedding:
            raise ModelError(f"{self.path}: no '{EMBEDDING}' output (exported without a drift reference)")
        logits, probs, embedding = self._outputs(self._checked(images), OUTPUTS + (EMBEDDING,))
        return logits, probs, embedding

    def _checked(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        expected = (3, self.preprocessing.size, self.preprocessing.size)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ModelError(f"input must be uint8 of shape (N, {', '.join(map(str, expected))}), got "
                             f"{images.dtype} {tuple(images.shape)}")
        return images

    def _outputs(self, images: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        if len(images) == 0:  # ONNX Runtime's answer to an empty batch varies by graph: shape the empty outputs here
            return [np.zeros((0, self._width(name)), np.float32) for name in names]
        parts = [self.session.run(list(names), {INPUT: images[start : start + self.batch_size]})
                 for start in range(0, len(images), self.batch_size)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]

    def _width(self, name: str) -> int:
        if name in OUTPUTS:
            return len(self.classes)
        shape = next(o.shape for o in self.session.get_outputs() if o.name == name)
        return shape[1] if isinstance(shape[1], int) else 0

    def predict_files(self, paths: Iterable[str | Path], workers: int = 4,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[FilePrediction]:
        """Stream predictions over files: decoded in threads one batch ahead, so memory stays at about
        two batches whatever the number of files. Unreadable files come back with `error` set."""
        batches = _chunks(iter(paths), self.batch_size)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            def submit(batch):
                return batch, [pool.submit(self._try_load, p, max_pixels) for p in batch]

            pending = None
            for batch in batches:
                current = submit(batch)
                if pending is not None:
                    yield from self._finish(*pending)
                pending = current
            if pending is not None:
                yield from self._finish(*pending)

    def _try_load(self, path, max_pixels: int) -> np.ndarray | str:
        try:
            return self.load(path, max_pixels)
        except ImageError as exc:
            return str(exc)

    def _finish(self, batch: list, futures: list) -> Iterator[FilePrediction]:
        loaded = [f.result() for f in futures]
        ok = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
        probs = self.run(np.stack([loaded[i] for i in ok]))[1] if ok else None
        rows = dict(zip(ok, probs)) if probs is not None else {}
        for i, path in enumerate(batch):
            if i in rows:
                yield FilePrediction(str(path), rows[i])
            else:
                yield FilePrediction(str(path), None, loaded[i])

    def top_k(self, probabilities: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-probabilities, kind="stable")[: max(1, k)]
        return [(self.classes[i], float(probabilities[i])) for i in order]


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
