"""Pooled frozen-backbone features of image files, cached by content: what the label-issue checks (and any other
stage that needs embeddings without training) compute once per data and weights version.

A feature is the pretrained network's pooled output before its classifier (`forward_head(..., pre_logits=True)`;
1,280 numbers for EfficientNet-Lite0), computed in eval mode on the image as every stage decodes it
(`tasks.images.load_for_model`, squashed to `size`) and normalised with the weights' statistics
(`tasks.tensors.model_input`). Nothing is trained.

The cache is one file per (weights, input size, normalisation) in a folder DVC and git do not track
(`$FINETUNE_CACHE_DIR/features`, else `.dvc/tmp/finetune/cache/features` in the DVC project, else
`.finetune/cache/features`): rows keyed by each image's sha256, so a rerun with unchanged images computes nothing,
a relabelled data set reuses every row (labels are not part of the key), and a new or changed image computes only
its own row. The file is replaced atomically. Delete the folder at any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks import backbones
from tasks.files import atomic_path, read_json
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.preprocess import Preprocessing
from tasks.tensors import DecodedOnDemand, batches, model_input

log = logging.getLogger(__name__)

VERSION = 1  # bump when what a feature means changes (pooling, decode path): old cache files are then unused
CACHE_ENV = "FINETUNE_CACHE_DIR"
ONNX_MIN_IMAGES = 256  # from this many images to compute on, ONNX Runtime pays for its ~5-13 s graph export


def cache_root(near: str | Path = ".") -> Path:
    """Where feature files live: `$FINETUNE_CACHE_DIR/features`, else the DVC project's `.dvc/tmp` (holding
    `near`), else `.finetune/cache/features` in the current folder (ignored by git)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "features"
    start = Path(near).absolute()
    for parent in (start, *start.parents):
        if (parent / ".dvc").is_dir():
            return parent / ".dvc" / "tmp" / "finetune" / "cache" / "features"
    return Path.cwd() / ".finetune" / "cache" / "features"


@dataclass(frozen=True)
class Backbone:
    """A pretrained network in eval mode, with what its features depend on."""

    model: nn.Module
    meta: dict  # fetch_model's metadata (source, arch, sha256, preprocessing...)
    pre: Preprocessing  # the input size and statistics the features are computed at

    def key(self) -> str:
        """The cache file's name: weights, architecture, input size and normalisation, feature version."""
        what = {"version": VERSION, "source": self.meta.get("source"), "arch": self.meta.get("arch"),
                "sha256": self.meta.get("sha256"), "size": self.pre.size, "mean": self.pre.mean, "std": self.pre.std}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def backbone(model: nn.Module, meta: dict, size: int | None = None) -> Backbone:
    """`model` (with `meta` from `tasks.backbones.create` or models/base/meta.json) at `size` px (None: the weights'
    own input size)."""
    weights = Preprocessing.from_dict(meta["preprocessing"])
    model.eval()
    return Backbone(model.to(memory_format=torch.channels_last), meta,
                    Preprocessing(size=size or weights.size, mean=weights.mean, std=weights.std))


def load_backbone(base_dir: Path, size: int | None = None) -> Backbone:
    """The pretrained network fetch_model saved (`weights.pt` + `meta.json`), original head kept."""
    base_dir = Path(base_dir)
    meta = read_json(base_dir / "meta.json")
    model = backbones.build(meta)
    model.load_state_dict(torch.load(base_dir / "weights.pt", map_location="cpu", weights_only=True))
    return backbone(model, meta, size)


class _Pooled(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1)


def onnx_runner(net: Backbone, batch_size: int) -> Callable[[torch.Tensor], np.ndarray] | None:
    """The feature extractor in ONNX Runtime (on CPU 3-4x faster than PyTorch eager for EfficientNet-Lite0, the
    same features to ~1e-5), or None when this network does not export (PyTorch then computes them)."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Pooled(net.model).eval(), (torch.zeros(batch_size, 3, net.pre.size, net.pre.size),), dynamo=True,
                optimize=True, verify=False, verbose=False, input_names=["x"], output_names=["features"],
                dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto = program.model_proto.SerializeToString()
    except Exception as exc:  # any exporter failure: PyTorch gives the same features, only slower
        log.info("features: computed in PyTorch (ONNX export failed: %s)", str(exc).splitlines()[0][:200])
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    log.info("features: computed in ONNX Runtime (graph exported in %.1fs)", time.perf_counter() - t0)
    return lambda x: session.run(None, {"x": np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]


@torch.no_grad()
def pooled(net: Backbone, paths: Sequence[Path], workers: int = 4, batch_size: int = 32,
           max_pixels: int = DEFAULT_MAX_PIXELS, desc: str | None = "features", runtime: str = "auto") -> np.ndarray:
    """(N, D) float32 pooled features of image files, computed now (no cache). `runtime`: torch | onnxruntime |
    auto (ONNX Runtime from ONNX_MIN_IMAGES images on, where exporting the graph pays for itself)."""
    from tqdm import tqdm

    run = None
    if runtime == "onnxruntime" or (runtime == "auto" and len(paths) >= ONNX_MIN_IMAGES):
        run = onnx_runner(net, batch_size)
    pooled_torch = _Pooled(net.model).eval()
    images = DecodedOnDemand(list(paths), net.pre.size, workers, max_pixels)
    out = []
    for batch in tqdm(batches(images, batch_size), total=-(-len(images) // batch_size), desc=desc, unit="batch",
                      leave=False, disable=True if desc is None else None):
        x = model_input(batch, net.pre.mean, net.pre.std, torch.device("cpu"))
        out.append(run(x.contiguous()) if run is not None else pooled_torch(x).float().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class FeatureStats:
    cached: int  # images whose features came from the cache
    computed: int  # images computed now (and added to it)
    seconds: float
    cache_file: str


def cached_features(net: Backbone, paths: Sequence[Path], hashes: Sequence[str], cache_dir: Path | None,
                    workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS,
                    batch_size: int = 32) -> tuple[np.ndarray, FeatureStats]:
    """Features of `paths` (row i for paths[i]), read from the cache where `hashes[i]` (the file's sha256) is there,
    computed and added otherwise. `cache_dir` None: no cache. An empty hash is never cached."""
    t0 = time.perf_counter()
    file = None if cache_dir is None else Path(cache_dir) / f"{net.key()}.npz"
    known = _read(file)
    todo = [i for i, h in enumerate(hashes) if not h or h not in known]
    fresh = pooled(net, [paths[i] for i in todo], workers, batch_size, max_pixels) if todo else None
    new = {hashes[i]: fresh[k] for k, i in enumerate(todo) if hashes[i]} if todo else {}
    if new and file is not None:
        _write(file, {**known, **new})
    rows = []
    by_index = {i: fresh[k] for k, i in enumerate(todo)} if todo else {}
    for i, h in enumerate(hashes):
        rows.append(by_index[i] if i in by_index else known[h])
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), dtype=np.float32)
    stats = FeatureStats(len(hashes) - len(todo), len(todo), round(time.perf_counter() - t0, 2), str(file or ""))
    log.info("features: %d images, %d from the cache, %d computed at %d px (%.1fs)%s", len(hashes), stats.cached,
             stats.computed, net.pre.size, stats.seconds, f"; cache {file}" if file else "")
    return feats, stats


def _read(file: Path | None) -> dict[str, np.ndarray]:
    if file is None or not file.exists():
        return {}
    try:
        with np.load(file, allow_pickle=False) as data:
            return dict(zip(data["keys"].tolist(), data["features"]))
    except (OSError, ValueError, KeyError) as exc:  # a damaged cache file is rebuilt, never trusted
        log.warning("features: ignoring unreadable cache file %s (%s)", file, exc)
        return {}


def _write(file: Path, rows: dict[str, np.ndarray]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    keys = np.array(list(rows), dtype="U64")
    with atomic_path(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=keys, features=np.stack(list(rows.values())).astype(np.float32))
