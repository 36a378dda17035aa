"""The serving service, without HTTP: which model is served, how a request becomes a prediction
(preprocess -> predict -> postprocess), and the hot swap when the registry's champion changes.

- `Source` says where the model comes from: the registry's champion (followed: a promotion or a
  rollback swaps the served model), a pinned registry version, or an ONNX file (followed too: a new
  export written over it is swapped in). For registry models, `precision="int8"` serves the version's
  INT8 model where its export kept one (1.6-1.8x the requests/s on 2 CPU cores: docs/serving.md),
  else its fp32 model.
- `load` opens a model with `tasks.inference.OnnxClassifier` (the one ONNX Runtime + preprocessing
  path batch prediction and the gate use) and checks it with a warm-up batch before anything is served.
- `Service.refresh` is the hot swap: a cheap `stat` of what the source follows; when it changed, the
  new model is loaded beside the old one (in a thread: requests keep being answered), checked, then
  put in place with one assignment. A request captures the model once and finishes on it, so every
  request is answered during a swap; a model that fails its check is never served (the old one stays
  and the failure is logged, counted and reported on /api/model).
- Uploads are decoded by `deploy.decode` within a memory budget shared by all requests (`decode_memory` bytes).
- Drift monitoring (`deploy.monitor`): for a model exported with its `embedding` output and drift reference, each
  request's outputs are appended to the monitor's window; the test runs in the monitor's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from deploy import decode
from deploy.batching import Runner
from deploy.monitor import Monitor
from deploy.protocol import TensorSpec, V2Error, spec_of
from tasks import drift, registry
from tasks.files import sha256_file
from tasks.images import DEFAULT_MAX_PIXELS, ImageError
from tasks.inference import EMBEDDING, INPUT, OUTPUTS, ModelError, OnnxClassifier

log = logging.getLogger("deploy.service")
CARD = "model_card.md"
# metadata values that hold JSON
JSON_METADATA = ("classes", "preprocessing", "metrics", "verdict", "export", "drift_reference")
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class Source:
    """Where the served model comes from: `kind` is 'champion', 'version' or 'file'."""

    kind: str
    registry: Path | None = None
    version: str | None = None
    path: Path | None = None
    precision: str = "fp32"

    @classmethod
    def parse(cls, model: str, registry_root: str | Path, precision: str = "fp32") -> "Source":
        """'champion' -> the registry's champion (followed); '3' / 'v3' / 'v0003' -> that version; a path -> the file.
        `precision` ('fp32' | 'int8') picks which of a registry version's models; a file is what it is."""
        if precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        text = str(model).strip()
        if text == "champion":
            return cls("champion", registry=Path(registry_root), precision=precision)
        if not Path(text).exists() and _as_version(text) is not None:
            return cls("version", registry=Path(registry_root), version=_as_version(text), precision=precision)
        if precision != "fp32":
            raise ModelError(f"precision {precision} picks a registry version's model (champion or a version); "
                             f"{text} is a file: give the INT8 file itself instead (e.g. models/int8/"
                             f"{registry.INT8_FILE})")
        return cls("file", path=Path(text))

    def describe(self) -> str:
        if self.kind == "file":
            return f"file {self.path}"
        return f"registry {self.registry} ({'champion' if self.kind == 'champion' else self.version})"

    def locate(self) -> tuple[Path, str | None, Path | None]:
        """(ONNX file, registry version or None, model card or None), as the source says now."""
        if self.kind == "file":
            if not self.path.is_file():
                raise ModelError(f"{self.path}: no such ONNX file (give a model file, a registry version such as "
                                 "3, or 'champion')")
            card = self.path.parent / CARD
            return self.path, None, card if card.is_file() else None
        version = self.version
        if self.kind == "champion":
            alias = registry.read_champion(self.registry)
            if alias is None:
                raise ModelError(f"registry {self.registry} has no champion yet ({self.registry / registry.CHAMPION} "
                                 "does not exist): run the pipeline, or `finetune promote VERSION`, or serve a file "
                                 "with --model PATH")
            version = alias["version"]
        folder = registry.version_dir(self.registry, version)
        card = folder / CARD
        return self._model_file(folder, version), version, card if card.is_file() else None

    def _model_file(self, folder: Path, version: str) -> Path:
        if self.precision == "int8":
            if (folder / registry.INT8_FILE).is_file():
                return folder / registry.INT8_FILE
            log.warning("%s has no INT8 model (export keeps one only within export.int8_max_accuracy_drop of the "
                        "fp32 model's test accuracy): serving its fp32 model.onnx", version,
                        extra={"event": "precision", "version": version, "precision": "fp32"})
        return folder / "model.onnx"

    def fingerprint(self) -> tuple | None:
        """What changes when the source points at another model: one `stat`, no read. None: never changes."""
        watched = {"champion": self.registry / registry.CHAMPION if self.registry else None,
                   "file": self.path}.get(self.kind)
        if watched is None:
            return None
        try:
            st = os.stat(watched)
        except OSError:
            return ("missing",)
        return (st.st_ino, st.st_mtime_ns, st.st_size)


def _as_version(text: str) -> str | None:
    try:
        return registry.parse_version(text)
    except registry.RegistryError:
        return None


@dataclass
class LoadedModel:
    """One loaded, checked model and what the protocol says about it."""

    classifier: OnnxClassifier
    name: str
    version: str  # the registry version (v0003), or the file's sha256 prefix
    sha256: str
    path: Path
    source: str
    card: str | None
    loaded_at: str
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    reference: drift.Reference | None = None  # what drift monitoring compares this model's outputs with
    reference_note: str | None = None  # why there is none

    @cached_property
    def with_embedding(self) -> "_WithEmbedding":
        """This model for the runner when the monitor wants the `embedding` output too (one object per model, so
        micro-batching still merges its requests)."""
        return _WithEmbedding(self.classifier)

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    @property
    def precision(self) -> str:
        """'int8' for a model the export stage quantized (its metadata records the recipe), else 'fp32'."""
        return "int8" if "quantization" in self.classifier.metadata else "fp32"

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.classifier.run(images)

    def matches(self, version: str | None) -> bool:
        """Whether a version named in a URL is this model ('' or None: whatever is served)."""
        if version in (None, ""):
            return True
        return version == self.version or (self.version.startswith("v") and _as_version(version) == self.version)

    def metadata(self) -> dict:
        """`GET /v2/models/{name}` (KServe v2 model metadata), plus what was served from where."""
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [s.to_dict() for s in self.inputs.values()],
                "outputs": [s.to_dict() for s in self.outputs.values()],
                "parameters": {"source": self.source, "sha256": self.sha256, "precision": self.precision,
                               "loaded_at": self.loaded_at}}

    def info(self) -> dict:
        """What the web page shows: version, classes, preprocessing, lineage, model card."""
        meta = {}
        for key, value in self.classifier.metadata.items():
            if key in JSON_METADATA:
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            meta[key] = value
        return {"name": self.name, "version": self.version, "source": self.source, "sha256": self.sha256,
                "precision": self.precision, "loaded_at": self.loaded_at, "classes": self.classes,
                "preprocessing": self.classifier.preprocessing.to_dict(), "metadata": meta, "model_card": self.card}


class _WithEmbedding:
    def __init__(self, classifier: OnnxClassifier):
        self.run = classifier.run_with_embedding


def reference_of(classifier: OnnxClassifier) -> tuple[drift.Reference | None, str | None]:
    """The model's drift reference (the file its metadata names, checked), or None and why."""
    if not classifier.has_embedding:
        return None, (f"{classifier.path.name} has no '{EMBEDDING}' output (exported before drift monitoring, or "
                      "not by this pipeline)")
    try:
        return drift.reference_of(classifier.path, classifier.metadata), None
    except drift.DriftError as exc:
        return None, str(exc)


def load(source: Source, name: str, threads: int | None = None, batch_size: int = 32) -> LoadedModel:
    """Open the model the source names now and check it (ModelError says why it cannot be served)."""
    path, version, card = source.locate()
    classifier = OnnxClassifier(path, threads=threads, batch_size=batch_size)
    sha = sha256_file(path)
    inputs = {i.name: spec_of(i) for i in classifier.session.get_inputs()}
    outputs = {o.name: spec_of(o) for o in classifier.session.get_outputs() if o.name in OUTPUTS}
    model = LoadedModel(classifier, name, version or sha[:12], sha, path, source.describe(),
                        card.read_text(encoding="utf-8", errors="replace") if card else None,
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), inputs, outputs,
                        *reference_of(classifier))
    warm_up(model)
    return model


def warm_up(model: LoadedModel, n: int = 2) -> None:
    """Run a batch (mid-grey images) and check the outputs, before the model serves anything."""
    size = model.classifier.preprocessing.size
    try:
        logits, probs = model.run(np.full((n, 3, size, size), 128, np.uint8))
    except Exception as exc:  # ORT raises its own types
        raise ModelError(f"{model.path}: failed its warm-up batch ({str(exc).strip().splitlines()[0]})") from None
    k = len(model.classes)
    if logits.shape != (n, k) or probs.shape != (n, k):
        raise ModelError(f"{model.path}: warm-up outputs have shapes {logits.shape} and {probs.shape}, expected "
                         f"({n}, {k}) for its {k} classes")
    if not (np.isfinite(logits).all() and np.isfinite(probs).all()
            and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)):
        raise ModelError(f"{model.path}: warm-up outputs are not finite probabilities")


def top_k(model: LoadedModel, probabilities: np.ndarray, k: int) -> list[dict]:
    return [{"label": label, "probability": p} for label, p in model.classifier.top_k(probabilities, k)]


class Service:
    """The served model, the model runner and the hot swap. `current` is the model new requests use."""

    def __init__(self, source: Source, name: str, runner: Runner, threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, decode_memory: int = 256 << 20,
                 on_swap: Callable[[LoadedModel | None, LoadedModel | None, str | None], None] | None = None,
                 monitor: Monitor | None = None):
        self.source, self.name, self.runner, self.monitor = source, name, runner, monitor
        self.threads, self.max_pixels = threads, max_pixels
        self.decodes = decode.DecodeBudget(decode_memory)
        self.on_swap = on_swap or (lambda old, new, error: None)
        self._fingerprint = source.fingerprint()
        self.current: LoadedModel = load(source, name, threads, runner.max_batch)
        if monitor is not None:
            monitor.attach(self.current)
        self.last_swap: dict | None = None
        self._lock = asyncio.Lock()

    # ---- requests: preprocess -> predict -> postprocess ---------------------------------------

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The model a request addresses (404 for another name or version)."""
        model = self.current
        if name != model.name:
            raise V2Error(404, f"unknown model '{name}': this server serves '{model.name}'")
        if not model.matches(version):
            raise V2Error(404, f"model '{name}' has no version '{version}': it serves version {model.version}")
        return model

    async def preprocess(self, model: LoadedModel, files: list[tuple[str, bytes]]) -> np.ndarray:
        """Uploaded files -> one uint8 batch."""
        return np.stack([await self.preprocess_one(model, name, data) for name, data in files])

    async def preprocess_one(self, model: LoadedModel, filename: str, data: bytes) -> np.ndarray:
        """One uploaded file -> the model's input (3, S, S): its header read, then decoded in a thread once the
        decode budget has room for it (`deploy.decode`). Errors name the file: 400 not an image or over the pixel
        limit, 413 needing more decode memory than the server allows, 503 waiting too long for room."""
        size, name = model.classifier.preprocessing.size, filename or "<upload>"
        try:
            upload = await asyncio.to_thread(decode.inspect, data, name, size, self.max_pixels)
            try:
                async with self.decodes.hold(upload.cost, name):
                    return await asyncio.to_thread(decode.decode, upload, size, self.max_pixels)
            finally:
                upload.image.close()
        except decode.DecodeRefused as exc:
            raise V2Error(413, f"upload {exc}") from None
        except ImageError as exc:
            raise V2Error(400, f"upload {exc}") from None
        except TimeoutError:
            raise V2Error(503, f"upload {name}: the server is busy decoding other large images; try again") from None

    async def predict(self, model: LoadedModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, S, S) -> (logits, probabilities), on the runner (batched with others when on). When the
        model is monitored, its embedding comes too and the rows go to the drift window (an append)."""
        monitored = self.monitor is not None and self.monitor.monitors(model)
        try:
            if not monitored:
                return await self.runner.run(model, images)
            logits, probs, embedding = await self.runner.run(model.with_embedding, images)
            self.monitor.observe(model, images, probs, embedding)
            return logits, probs
        except ModelError as exc:
            raise V2Error(400, str(exc)) from None
        except Exception as exc:  # ONNX Runtime failures: a server-side error, the server keeps serving
            log.exception("inference failed")
            raise V2Error(500, f"inference failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None

    @staticmethod
    def postprocess(model: LoadedModel, filenames: list[str], probabilities: np.ndarray, k: int) -> list[dict]:
        """Per file: the top label, its probability and the top-k."""
        out = []
        for name, probs in zip(filenames, probabilities):
            best = top_k(model, probs, k)
            out.append({"filename": name, "label": best[0]["label"], "probability": best[0]["probability"],
                        "top_k": best})
        return out

    async def infer(self, model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The protocol's infer: the checked input tensor -> every output by name."""
        logits, probs = await self.predict(model, feeds[INPUT])
        return dict(zip(OUTPUTS, (logits, probs)))

    # ---- hot swap -------------------------------------------------------------------------------

    async def refresh(self, force: bool = False) -> dict:
        """Swap in the model the source names now, if it changed (or `force`): load beside, check, switch.
        Returns what happened; never raises for a bad new model (the current one stays)."""
        async with self._lock:
            fingerprint = self.source.fingerprint()
            if not force and fingerprint == self._fingerprint:
                return {"changed": False, "version": self.current.version}
            self._fingerprint = fingerprint
            old = self.current
            started = time.perf_counter()
            try:
                path, version, _ = self.source.locate()
                if version == old.version or (version is None and sha256_file(path) == old.sha256):
                    if self.last_swap is not None and not self.last_swap["ok"]:  # repaired: the error is over
                        self.last_swap = {"ok": True, "from": old.version, "to": old.version, "at": _now(),
                                          "note": f"the source names the served version {old.version} again"}
                        log.info("the model source names the served version %s again", old.version,
                                 extra={"event": "swap", "ok": True, "from": old.version, "to": old.version})
                    return {"changed": False, "version": old.version}
                new = await asyncio.to_thread(load, self.source, self.name, self.threads, self.runner.max_batch)
            except (ModelError, registry.RegistryError, OSError) as exc:
                error = str(exc)
                self.last_swap = {"ok": False, "from": old.version, "error": error, "at": _now()}
                log.error("hot swap refused: still serving %s", old.version, extra={"event": "swap", "ok": False,
                                                                                    "error": error})
                self.on_swap(old, None, error)
                return {"changed": False, "version": old.version, "error": error}
            self.current = new  # one assignment: new requests get the new model, running ones finish on the old
            if self.monitor is not None:
                self.monitor.attach(new)  # a new window, against the new model's reference
            seconds = round(time.perf_counter() - started, 3)
            self.last_swap = {"ok": True, "from": old.version, "to": new.version, "at": _now(), "seconds": seconds}
            log.info("hot swap: %s -> %s", old.version, new.version,
                     extra={"event": "swap", "ok": True, "from": old.version, "to": new.version, "seconds": seconds})
            self.on_swap(old, new, None)
            return {"changed": True, "version": new.version, "previous": old.version, "seconds": seconds}

    async def watch(self, interval_s: float) -> None:
        """Follow the source: a `stat` every `interval_s` seconds, a swap when it changed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:  # never let the watcher die
                log.exception("hot swap check failed")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
