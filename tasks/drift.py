"""Drift monitoring: is what the served model is asked still what it was trained for? (torch-free: numpy, scipy)

Black-box shift detection after Rabanser, Guennemann and Lipton, "Failing Loudly" (NeurIPS 2019): three views of each
image the model sees, each compared with a reference sample by two-sample Kolmogorov-Smirnov tests.

- **embedding**: the model's pooled features (its `embedding` ONNX output), projected onto the first principal
  components (PCA fitted on the training split's embeddings at export); one KS test per component.
- **softmax**: the model's probabilities (BBSD, "black-box shift detection"); one KS test per class (for two classes
  one column: the other is its complement).
- **image**: three numbers of the model's input itself, the uint8 tensor after the model's decode and resize
  (`image_statistics`): brightness (mean), contrast (standard deviation) and sharpness (the energy of second
  differences over that of first differences); one KS test each. It sees what frozen features barely register: a
  Gaussian blur of sigma 1 moves no embedding component measurably on ELPV but lowers the cells' sharpness
  (bench/bench_drift.py). A reference written before this detector existed has no image sample: then the first two
  views are tested, as before.

The reference sample is the validation split's outputs (data the weights never trained on, scored exactly as a
served image is), computed by the export stage from the exported ONNX model and written beside it
(`drift_reference.npz`, and `drift_reference.int8.npz` with the INT8 model's own outputs beside that model; each
model's metadata names its file and the file's sha256). Training images are not the
reference: a fine-tuned model is more confident on them than on any new image, so clean traffic would look shifted.

One test (`compare`): Bonferroni within each detector (its smallest p-value times its column count) and across
the detectors tested (times 3, or 2 without an image sample): the combined p-value is below `alpha` with probability
at most `alpha` when nothing changed. A stream (`Stream`, what the server runs, and `finetune drift` /
bench/bench_drift.py through the same functions) keeps the last `window` rows, tests every `every` new rows once the
window is full, and raises the alarm only after `consecutive` rejections in a row (and clears it after as many passes
in a row): overlapping windows make consecutive tests correlated, so the expected run length without drift is
measured (bench/bench_drift.py), with the arithmetic in docs/serving.md ("Drift monitoring").
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.special import kolmogorov

from tasks.files import atomic_path, sha256_file

REFERENCE_FILE = "drift_reference.npz"  # beside model.onnx (models/, a registry version folder)
INT8_REFERENCE_FILE = "drift_reference.int8.npz"  # beside model.int8.onnx: the INT8 model's own outputs
METADATA_KEY = "drift_reference"  # the ONNX metadata entry naming the file, its sha256 and what it holds
EMBEDDING = "embedding"  # the ONNX output holding the pooled features
DETECTORS = ("embedding", "softmax", "image")
IMAGE_STATISTICS = ("brightness", "contrast", "sharpness")  # the columns of `image_statistics`, in order


class DriftError(ValueError):
    """A reference that cannot be built or used; the message names the file or the problem."""


# ---- the reference sample ------------------------------------------------------------------------------------


def fit_pca(embeddings: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), basis (C, D)): the first `components` principal directions of `embeddings` (fewer when the data
    have fewer directions of non-zero variance), each signed so that its largest coefficient is positive."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DriftError(f"PCA needs at least 2 embeddings, got {x.shape}")
    mean = x.mean(0)
    centred = x - mean
    # the eigenvectors of the D x D scatter matrix: ~1 s for 2,000 x 1,280 where a full SVD takes ~20 s on 2 cores
    values, vectors = np.linalg.eigh(centred.T @ centred)
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = int(min(components, int((values > values[0] * 1e-10).sum()) if values[0] > 0 else 0))
    if keep < 1:
        raise DriftError("the embeddings do not vary: no principal component to monitor")
    basis = vectors[:, :keep].T.copy()
    basis *= np.sign(basis[np.arange(keep), np.abs(basis).argmax(1)])[:, None]
    return mean.astype(np.float32), basis.astype(np.float32)


def softmax_columns(probabilities: np.ndarray) -> np.ndarray:
    """The probability columns tested: all of them, or the first one for two classes (the other is 1 minus it)."""
    p = np.asarray(probabilities, np.float32)
    return p[:, :1] if p.shape[1] == 2 else p


def image_statistics(images: np.ndarray) -> np.ndarray:
    """(N, 3) float32 `IMAGE_STATISTICS` of model inputs (uint8, (N, C, H, W), what the model is fed), on the middle
    channel (green of RGB, most of the luminance; all three are the same for a grey image): brightness (mean),
    contrast (standard deviation) and sharpness: the energy of the second differences over that of the first
    differences, horizontal and vertical (sums of squares: the finest scale's share of the image's detail; a blur
    lowers it, noise raises it, brightness and contrast leave it). On every `step`-th row (horizontal differences)
    and column (vertical ones), step = H // 32 (7 at 224 px; every 4th or 8th row detected the same on ELPV): ~0.1 ms
    an image. Rows are independent: an image's numbers do not depend on the batch it came in. The export stage
    (reference sample), the server (its test thread), `finetune drift` and the benchmark all call this on the same
    tensor."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or min(x.shape[2:]) < 3:
        raise DriftError(f"image statistics need uint8 images (N, C, H, W) of at least 3 x 3, got {x.dtype} "
                         f"{x.shape}")
    step, channel = max(1, x.shape[2] // 32), x.shape[1] // 2
    rows = x[:, channel, ::step].astype(np.float32)  # (N, H / step, W): every step-th row
    cols = x[:, channel, :, ::step].astype(np.float32)  # (N, H, W / step)
    dx, dy = np.diff(rows, axis=2), np.diff(cols, axis=1)

    def energy(d: np.ndarray) -> np.ndarray:
        return np.einsum("nij,nij->n", d, d)  # sum of squares per image, without a temporary array

    first = energy(dx) + energy(dy)
    second = energy(np.diff(dx, axis=2)) + energy(np.diff(dy, axis=1))
    sharpness = np.divide(second, first, out=np.zeros(len(x), np.float32), where=first > 0)  # a flat image: 0
    flat = rows.reshape(len(x), -1)
    return np.stack([flat.mean(1), flat.std(1), sharpness], 1).astype(np.float32)


@dataclass(frozen=True)
class Reference:
    """PCA (mean, basis) and the reference sample of each view, each column sorted (the KS tests need it so)."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (C, D)
    embedding: np.ndarray  # (n, C) projected reference embeddings, sorted per column
    softmax: np.ndarray  # (n, K') reference probability columns, sorted per column
    info: dict = field(default_factory=dict)  # what it was built from (splits, counts, precision)
    image: np.ndarray | None = None  # (n, 3) `image_statistics` of the same images, sorted per column; None: not kept

    @classmethod
    def build(cls, fit: np.ndarray, embeddings: np.ndarray, probabilities: np.ndarray, components: int,
              info: dict | None = None, image: np.ndarray | None = None) -> "Reference":
        """PCA fitted on `fit` (training embeddings); the reference sample: `embeddings`, `probabilities` and the
        `image_statistics` of the same images (optional)."""
        mean, basis = fit_pca(fit, components)
        return cls(mean, basis, np.empty((0, len(basis)), np.float32), np.empty((0, 0), np.float32),
                   dict(info or {})).with_sample(embeddings, probabilities, image)

    def with_sample(self, embeddings: np.ndarray, probabilities: np.ndarray, image: np.ndarray | None = None,
                    **info) -> "Reference":
        """The same PCA with another reference sample (e.g. the INT8 model's outputs on the same images: without
        `image`, the image statistics are kept, as the images are the same)."""
        if len(embeddings) < 2 or len(embeddings) != len(probabilities):
            raise DriftError(f"a reference sample needs at least 2 rows of both outputs, got {len(embeddings)} "
                             f"embeddings and {len(probabilities)} probability rows")
        if image is not None and np.shape(image) != (len(embeddings), len(IMAGE_STATISTICS)):
            raise DriftError(f"the reference's image statistics must be {len(embeddings)} x {len(IMAGE_STATISTICS)}, "
                             f"got {np.shape(image)}")
        kept = self.image if image is None else np.sort(np.asarray(image, np.float32), 0)
        return Reference(self.mean, self.basis, np.sort(self.project(embeddings), 0),
                         np.sort(softmax_columns(probabilities), 0), {**self.info, **info, "n": len(embeddings)}, kept)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        # einsum's own loop, not BLAS: ~1 ms for 100 x 1,280 x 32, and no BLAS thread pool spinning beside the model's
        # threads (with OpenBLAS's 2 threads a matmul here cut the server's requests/s by a quarter on 2 cores)
        return np.einsum("nd,cd->nc", np.asarray(embeddings, np.float32) - self.mean, self.basis)

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def detectors(self) -> tuple[str, ...]:
        return DETECTORS if self.image is not None else DETECTORS[:2]


def save_reference(path: str | Path, reference: Reference) -> str:
    """Write the reference (PCA and reference sample) as one .npz, atomically; returns its sha256."""
    arrays = {"mean": reference.mean, "basis": reference.basis, "embedding": reference.embedding,
              "softmax": reference.softmax, "info": np.array(json.dumps(reference.info, sort_keys=True))}
    if reference.image is not None:  # with the names of its columns: a later set of statistics is never misread
        arrays.update(image=reference.image, image_statistics=np.array(json.dumps(IMAGE_STATISTICS)))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return sha256_file(path)


def load_reference(path: str | Path) -> Reference:
    """The reference in `path`; one written before the image detector (or with other image statistics than these)
    loads without an image sample, and is monitored with the embedding and softmax detectors only."""
    try:
        with np.load(path, allow_pickle=False) as z:
            image = None
            if "image" in z.files and json.loads(str(z["image_statistics"])) == list(IMAGE_STATISTICS):
                image = z["image"]
            return Reference(z["mean"], z["basis"], z["embedding"], z["softmax"], json.loads(str(z["info"])), image)
    except (OSError, KeyError, ValueError) as exc:
        raise DriftError(f"{path}: not a drift reference ({exc})") from None


def reference_of(model_path: str | Path, metadata: dict[str, str]) -> Reference:
    """The reference an exported model names in its metadata: the file beside the model, checked against the recorded
    sha256. `DriftError` says why there is none."""
    if METADATA_KEY not in metadata:
        raise DriftError(f"{model_path}: its metadata names no drift reference (exported without one)")
    try:
        entry = json.loads(metadata[METADATA_KEY])
        name, sha = entry["file"], entry["sha256"]
    except (ValueError, KeyError, TypeError):
        raise DriftError(f"{model_path}: metadata '{METADATA_KEY}' is not a file + sha256 record") from None
    found = Path(model_path).parent / Path(name).name
    if not found.is_file():
        raise DriftError(f"{model_path}: its drift reference {name} is not beside it")
    if sha256_file(found) != sha:
        raise DriftError(f"{found}: sha256 differs from the one {model_path} records (a reference of another model)")
    ref = load_reference(found)
    if (ref.basis.shape[1] != ref.dim or ref.embedding.shape[1] != len(ref.basis) or len(ref.embedding) < 2
            or (ref.image is not None and ref.image.shape != (len(ref.embedding), len(IMAGE_STATISTICS)))):
        raise DriftError(f"{found}: inconsistent shapes")
    return ref


# ---- one test --------------------------------------------------------------------------------------------------


def ks_statistics(reference_sorted: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Two-sample KS statistics D (the largest distance between the two empirical CDFs), every column at once: one
    stable argsort of both samples per column, the two CDFs as running counts, read at the last of each run of tied
    values (no Python loop over the columns: a test holds the GIL for well under a millisecond)."""
    n, m = len(reference_sorted), len(sample)
    both = np.concatenate([reference_sorted, np.asarray(sample, reference_sorted.dtype)])
    order = np.argsort(both, axis=0, kind="stable")
    values = np.take_along_axis(both, order, 0)
    from_reference = order < n
    gap = np.cumsum(from_reference, 0) / n - np.cumsum(~from_reference, 0) / m
    last_of_ties = np.ones_like(from_reference)
    last_of_ties[:-1] = values[1:] != values[:-1]
    return np.where(last_of_ties, np.abs(gap), 0.0).max(0)


def ks_pvalue(d: float | np.ndarray, n: int, m: int) -> np.ndarray:
    """Two-sided p-value of KS statistic(s) `d` for samples of `n` and `m` rows: the Kolmogorov distribution with
    Stephens' small-sample correction, Q((sqrt(en) + 0.12 + 0.11 / sqrt(en)) d), en = nm / (n + m) (Stephens 1970;
    Numerical Recipes' `probks`). A C ufunc (~1 us), where scipy's `kstwo.sf` (ks_2samp's "asymp") takes 1-80 ms per
    value; within 15% of the exact p-value from 1e-5 to 0.2 at the sizes used here (12-500 rows; tests/test_drift.py
    checks against `scipy.stats.ks_2samp(method="exact")`)."""
    en = n * m / (n + m)
    return np.clip(kolmogorov((np.sqrt(en) + 0.12 + 0.11 / np.sqrt(en)) * np.asarray(d, np.float64)), 0.0, 1.0)


@dataclass(frozen=True)
class Comparison:
    """One test of a sample against the reference."""

    pvalues: dict[str, float]  # per detector tested (Bonferroni over its columns), "combined" (x the detectors)
    statistics: dict[str, float]  # the largest KS statistic of each detector
    reject: bool  # combined p-value < alpha
    n: int
    alpha: float
    seconds: float

    def to_dict(self) -> dict:
        return {"pvalues": self.pvalues, "statistics": self.statistics, "reject": self.reject, "n": self.n,
                "alpha": self.alpha, "seconds": round(self.seconds, 5)}


def compare(reference: Reference, embeddings: np.ndarray, probabilities: np.ndarray, alpha: float,
            statistics: np.ndarray | None = None) -> Comparison:
    """Test one sample (rows of the model's `embedding` and `probabilities` outputs, and the `image_statistics` of the
    same images) against the reference. The image detector is tested when the reference has an image sample and
    `statistics` are given; the combined p-value is Bonferroni across the detectors tested."""
    t0 = time.perf_counter()
    if len(embeddings) < 1 or len(embeddings) != len(probabilities):
        raise DriftError(f"a sample needs rows of both outputs, got {len(embeddings)} and {len(probabilities)}")
    if statistics is not None and np.shape(statistics) != (len(embeddings), len(IMAGE_STATISTICS)):
        raise DriftError(f"image statistics must be {len(embeddings)} x {len(IMAGE_STATISTICS)}, got "
                         f"{np.shape(statistics)}")
    n, m = len(reference.embedding), len(embeddings)
    stats = {"embedding": ks_statistics(reference.embedding, reference.project(embeddings)),
             "softmax": ks_statistics(reference.softmax, softmax_columns(probabilities))}
    if reference.image is not None and statistics is not None:
        stats["image"] = ks_statistics(reference.image, statistics)
    # Bonferroni within a detector: its smallest p-value (largest D) times its number of columns
    pvalues = {k: min(1.0, float(ks_pvalue(d.max(), n, m)) * len(d)) for k, d in stats.items()}
    pvalues["combined"] = min(1.0, len(stats) * min(pvalues.values()))  # and across the detectors tested
    return Comparison(pvalues, {k: float(d.max()) for k, d in stats.items()}, pvalues["combined"] < alpha, m,
                      alpha, time.perf_counter() - t0)


# ---- a stream: the window, the schedule and the alarm ---------------------------------------------------------


class Window:
    """The last `size` rows (embedding, probabilities, the input image while needed, its image statistics),
    thread-safe: requests append, the test takes a snapshot and measures the new rows' images. An image is held only
    until its statistics are computed (`snapshot(measure=True)`), unless `keep_images` (the alarm saves the window's
    images)."""

    def __init__(self, size: int, keep_images: bool = False, measure_images: bool = False):
        if size < 2:
            raise DriftError(f"a drift window needs at least 2 rows, got {size}")
        self.size, self.keep_images, self.measure_images = size, keep_images, measure_images
        self._rows: list[list] = []  # [embedding, probabilities, image or None, statistics or None]
        self._start = 0  # ring buffer: the oldest row's index once full
        self._lock = threading.Lock()

    def append(self, embeddings: np.ndarray, probabilities: np.ndarray, images: np.ndarray | None = None,
               statistics: np.ndarray | None = None) -> None:
        """Add a batch's rows (references to its arrays' rows: no copy of the images), with their image statistics
        when the caller has them (else `snapshot(measure=True)` computes them from the images)."""
        hold = images is not None and (self.keep_images or (self.measure_images and statistics is None))
        with self._lock:
            for i in range(max(0, len(embeddings) - self.size), len(embeddings)):
                row = [embeddings[i], probabilities[i], images[i] if hold else None,
                       statistics[i] if statistics is not None else None]
                if len(self._rows) < self.size:
                    self._rows.append(row)
                else:
                    self._rows[self._start] = row
                    self._start = (self._start + 1) % self.size

    def snapshot(self, measure: bool = False) -> tuple[np.ndarray, np.ndarray, list, np.ndarray | None]:
        """(embeddings, probabilities, images or Nones, image statistics: None unless every row has them), oldest
        first. `measure`: first compute the image statistics of the rows taken that have an image and none yet (the
        rows appended since the last test: ~2 ms for 20 images of 224 px), in the caller's thread (the server's test
        thread), outside the lock: a request appending meanwhile replaces slots, never a row taken here."""
        with self._lock:
            rows = self._rows[self._start:] + self._rows[:self._start]
        for row in rows if measure else ():  # one image at a time: no copy into a batch (measured slower per image)
            if row[3] is None and row[2] is not None:
                row[3] = image_statistics(row[2][None])[0]
                if not self.keep_images:
                    row[2] = None  # measured: the window no longer holds the image
        if not rows:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), [], None
        statistics = np.stack([r[3] for r in rows]) if all(r[3] is not None for r in rows) else None
        images = [r[2] if self.keep_images else None for r in rows]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), images, statistics

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        with self._lock:
            self._rows, self._start = [], 0


@dataclass
class Outcome:
    """What one test of the stream found, and whether it raised the alarm (`alarm`: this test started an episode)."""

    result: Comparison
    detected: bool
    alarm: bool
    embeddings: np.ndarray
    probabilities: np.ndarray
    images: list
    statistics: np.ndarray | None = None  # the window's image statistics, when tested


class Stream:
    """The window, the schedule (a test every `every` rows once `window` rows are in) and the alarm (`consecutive`
    rejections in a row raise it, as many passes in a row clear it). `add` is all a request does; `test` runs the
    test (the server runs it in a thread of its own, never on the request path), the new rows' image statistics
    included."""

    def __init__(self, reference: Reference, window: int = 100, every: int = 20, alpha: float = 0.002,
                 consecutive: int = 2, keep_images: bool = False):
        if every < 1 or consecutive < 1 or not 0 < alpha < 1:
            raise DriftError(f"every {every} and consecutive {consecutive} must be >= 1, alpha {alpha} in (0, 1)")
        self.reference, self.every, self.alpha, self.consecutive = reference, every, alpha, consecutive
        self.window = Window(window, keep_images, measure_images=reference.image is not None)
        self.seen = self.tests = self.alarms = 0
        self._since_test = 0
        self.rejections = self.passes = 0  # current streaks
        self.detected = False
        self.last: Comparison | None = None
        self.last_alarm: dict | None = None

    def add(self, embeddings: np.ndarray, probabilities: np.ndarray, images: np.ndarray | None = None,
            statistics: np.ndarray | None = None) -> bool:
        """Append a batch's rows (the model's input `images`, or their `image_statistics` when already computed);
        True when a test is due (the caller then runs `test`, in whatever thread)."""
        self.window.append(embeddings, probabilities, images, statistics)
        self.seen += len(embeddings)
        self._since_test += len(embeddings)
        if self._since_test >= self.every and len(self.window) >= self.window.size:
            self._since_test = 0
            return True
        return False

    def test(self) -> Outcome:
        """Measure the new rows' images, test the window now and update the alarm (the test's `seconds` include
        the measuring)."""
        t0 = time.perf_counter()
        embeddings, probabilities, images, statistics = self.window.snapshot(measure=self.window.measure_images)
        result = compare(self.reference, embeddings, probabilities, self.alpha, statistics)
        result = replace(result, seconds=time.perf_counter() - t0)
        self.tests += 1
        self.last = result
        if result.reject:
            self.rejections, self.passes = self.rejections + 1, 0
        else:
            self.rejections, self.passes = 0, self.passes + 1
        alarm = not self.detected and self.rejections >= self.consecutive
        if alarm:
            self.detected, self.alarms = True, self.alarms + 1
            self.last_alarm = {"at": _now(), "seen": self.seen, "test": self.tests, **result.to_dict()}
        elif self.detected and self.passes >= self.consecutive:
            self.detected = False
        return Outcome(result, self.detected, alarm, embeddings, probabilities, images, statistics)

    def state(self) -> dict:
        """What /api/model and the page show."""
        ref = self.reference
        return {"window": self.window.size, "filled": len(self.window), "every": self.every, "alpha": self.alpha,
                "consecutive": self.consecutive, "seen": self.seen, "tests": self.tests, "detected": self.detected,
                "alarms": self.alarms, "detectors": list(ref.detectors),
                "last_test": self.last.to_dict() if self.last else None, "last_alarm": self.last_alarm,
                "reference": {"n": len(ref.embedding), "components": len(ref.basis),
                              "image_statistics": list(IMAGE_STATISTICS) if ref.image is not None else None,
                              **{k: v for k, v in ref.info.items() if k != "n"}}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
