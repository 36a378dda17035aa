"""Shared fixtures: tiny generated, learnable image folders; quiet DVC/Prefect; one Prefect server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, classes=("dark", "bright"), per_class: int = 24, size: int = 48, seed: int = 0,
                 mislabeled: int = 0) -> Path:
    """`root/<class>/<i>.png`: noisy grayscale squares whose brightness depends on the class.

    Learnable in one epoch, invariant to flips/rotations (like the augmentation), distinct bytes.
    The last `mislabeled` images of each class look like the next class, so no model is perfect.
    """
    rng = np.random.default_rng(seed)
    levels = np.linspace(50, 200, len(classes))
    for k, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            level = levels[(k + 1) % len(classes)] if i >= per_class - mislabeled else levels[k]
            arr = np.clip(rng.normal(level, 25, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(root / label / f"{i:03d}.png")
    return root


def fit(model, classes, x, y, vx, vy, params, mean, std, seed: int = 0, **kwargs):
    """`tasks.train.loop.fit` on in-memory tensors, on the CPU (what most training tests need)."""
    import torch

    from tasks.train.loop import Data, Split
    from tasks.train.loop import fit as fit_

    data = Data(list(classes), Split(x, y), Split(vx, vy))
    return fit_(model, data, params, list(mean), list(std), seed, kwargs.pop("device", torch.device("cpu")), **kwargs)


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_dataset(tmp_path / "images")


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session; starting one takes ~20 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
