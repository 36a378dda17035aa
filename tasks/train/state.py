"""The resumable training state: what a run has done so far, saved atomically after every epoch.

File format: a magic line, a JSON header line (`{"version", "fingerprint"}`), then a `torch.save`
payload of tensors, numbers, strings, lists and dicts only. The header is checked before anything
else is read, and the payload loads with `weights_only=True`, so a planted or foreign state file can
neither run code nor be resumed by the wrong run. RNG states are stored as tensors and lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from tasks.files import atomic_path, sha256_file
from tasks.params import PLACEMENT_KEYS, TrainParams

log = logging.getLogger(__name__)
MAGIC = b"FINETUNE-TRAIN-STATE\n"
VERSION = 3


@dataclass
class Progress:
    """Where the run is and what it has seen; the typed part of the saved state."""

    stage_index: int = 0
    epoch: int = 0  # epochs completed in stage `stage_index`
    stage_done: bool = False
    best: dict = field(default_factory=lambda: {"score": -math.inf})
    history: list[dict] = field(default_factory=list)
    stage_best: float = -math.inf
    bad_epochs: int = 0


@dataclass
class Saved:
    """A state read back from disk: progress plus the tensors of every live object."""

    progress: Progress
    model: dict
    best_weights: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    offsets: torch.Tensor
    rng: list  # one entry per rank
    ema: dict | None = None  # the weight average (train.ema_decay > 0) and its step count
    ema_step: int = 0


SAVED_KEYS = ("model", "best_weights", "optimizer", "scheduler", "scaler", "offsets", "rng", "ema", "ema_step")


def fingerprint(manifest_path: Path, weights_path: Path, params: TrainParams, seed: int, world: int) -> str:
    """Identifies a training run: a saved state is resumed only by a run with the same fingerprint (where the data
    lives and how it is read are left out: memory or disk, prefetched or not, training computes the same)."""
    parts = {"manifest": sha256_file(manifest_path), "weights": sha256_file(weights_path),
             "params": params.model_dump(mode="json", exclude=PLACEMENT_KEYS), "seed": seed, "world": world}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def save(path: Path, run_fingerprint: str, saved: Saved) -> None:
    payload = {k: getattr(saved, k) for k in SAVED_KEYS}
    payload["progress"] = asdict(saved.progress)
    header = json.dumps({"version": VERSION, "fingerprint": run_fingerprint}).encode() + b"\n"
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + header)
            torch.save(payload, f)


def load(path: Path | None, run_fingerprint: str) -> Saved | None:
    """The saved state if it belongs to this exact run (data, weights, params), else None."""
    if path is None or not Path(path).exists():
        return None
    try:
        with open(path, "rb") as f:
            if f.readline() != MAGIC:
                log.warning("train: %s is not a training state file; starting over", path)
                return None
            header = json.loads(f.readline())
            if header.get("version") != VERSION or header.get("fingerprint") != run_fingerprint:
                log.info("train: %s is from a different run (data, weights or params changed); starting over", path)
                return None
            payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        progress = Progress(**{f.name: payload["progress"][f.name] for f in fields(Progress)})
        return Saved(progress=progress, **{k: payload[k] for k in SAVED_KEYS})
    except Exception as exc:  # an unreadable or foreign file is not worth failing the run for
        log.warning("train: ignoring unreadable state file %s (%s); starting over", path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def rng_state(gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    """Every random stream the loop draws from, as tensors and lists (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {"gen": gen.get_state(), "aug_gen": aug_gen.get_state(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(words), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(gen: torch.Generator, aug_gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["gen"])
    aug_gen.set_state(state["aug_gen"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
