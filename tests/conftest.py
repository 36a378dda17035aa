"""Shared fixtures: tiny generated, learnable image folders; quiet DVC/Prefect; one Prefect server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if "PREFECT_HOME" not in os.environ:  # a throwaway Prefect home per process, removed when it exits
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (and its stage processes): no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium (apt; `make test` installs it) driven by Playwright through `executable_path` (never
    `playwright install`, which downloads a browser). In CI a missing chromium fails the test instead of skipping."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make browser` installs Debian's chromium with apt-get")
        pytest.skip("chromium is not installed (`make browser` installs it with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                                              "--disable-background-networking", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    """One tiny project (tests/test_end_to_end.py `new_project`) trained end to end by `dvc repro`, once per run of
    the suite: `make test`'s workers share it (the first to need it builds it under a file lock, the pattern
    pytest-xdist documents; the others wait for it or find it built). Tests take a copy (`copy_project`) and change
    that, never this one."""
    from filelock import FileLock

    from tests.test_end_to_end import dvc, new_project

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    root, built = shared / "trained" / "tiny", shared / "trained" / "built"
    with FileLock(str(shared / "trained.lock")):
        if not built.exists():
            if root.parent.exists():
                shutil.rmtree(root.parent)  # a build that failed part way: start again
            new_project(root)
            dvc("repro", cwd=root)
            built.touch()
    return root


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a git + DVC project folder, outputs, DVC cache and registry included (DVC rehashes by content)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


# The files that take longest (a few full pipeline runs each), longest first: `make test` hands them out first so that
# no long file is left running alone at the end. The first two start together: the first builds `trained_tiny`, the
# second needs none (a worker waiting on the build would idle). A file missing here only starts later.
LONGEST_FIRST = ("test_prefect_deployments", "test_readme_own_data", "test_end_to_end", "test_crash",
                 "test_retrain_flow", "test_drift_loop", "test_scale", "test_label_issues", "test_train_process")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with slow tests, each file's tests together and in order (the
    Makefile's `--dist loadfile --no-loadscope-reorder` hands the files to the workers in this order)."""
    def module(item) -> str:
        return item.module.__name__.rsplit(".", 1)[-1]

    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(module(item), len(rank)), module(item) not in slow))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect server (SQLite) for the session's tests in this process, started as `finetune run` starts its
    temporary one (on a copy of the migrated template database: ~9 s instead of ~20 s). Like Prefect's
    prefect_test_harness, only this process's client is pointed at it; processes the tests start are told. Yields
    its `finetune.local_prefect.Local`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from finetune import local_prefect as lp

    local = lp.Local(tmp_path_factory.mktemp("prefect-server"), lp.free_port())
    lp.start_server(local)
    try:
        with temporary_settings(updates={PREFECT_API_URL: local.api_url}):
            yield local
            lp.drain()
    finally:
        lp.stop(local, grace_s=10)


def brightness_onnx(path, classes, size=32, threshold=128.0, extra: dict | None = None):
    """A tiny 'model' with this pipeline's ONNX contract: uint8 NCHW in, logits and probabilities out;
    it calls an image 'bright' when its mean pixel is above `threshold`."""
    import json

    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("Sub", ["m2", "t"], ["d"]),
        helper.make_node("Mul", ["d", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
             helper.make_tensor("t", TensorProto.FLOAT, [], [threshold]),
             helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [0.1, -0.1])]  # logits [bright, dark]
    graph = helper.make_graph(nodes, "bright", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["b", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    metadata = {"classes": json.dumps(classes), "preprocessing": json.dumps({"size": size}), **(extra or {})}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path
