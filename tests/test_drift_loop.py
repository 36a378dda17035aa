"""The loop closed for real: a `prefect server` and a process worker (as `finetune prefect up` starts them) with
prefect.yaml's deployments, a tiny model trained by the pipeline, and the real model server following the champion
with drift monitoring and `--drift-retrain finetune-retrain/nightly`.

A clean stream raises nothing and starts nothing; a drifted stream raises `drift_detected`, saves the window's
images and starts a retraining run, which (the data unchanged) retrains nothing and says to label the saved images;
once they are labelled into the data, the next alarm's run retrains, the gates pass, the new version is promoted and
the server hot-swaps to it with a fresh window, and the version's lineage says why it was trained."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tasks import drift, lineage, registry
from tasks.promote.serving_check import ServerProcess
from tests.conftest import copy_project
from tests.test_prefect_deployments import (
    artifacts_of,
    client,
    finish,
    logs_of,
    running_prefect,
)
from tests.test_serving import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop(trained_tiny, tmp_path_factory):
    """A copy of the session's trained tiny project (champion v0001) with prefect.yaml on a real server + worker; a
    flow run (every stage up to date) records the champion's lineage, which retraining compares the data with."""
    from flows.pipeline import finetune_pipeline

    root = copy_project(trained_tiny, tmp_path_factory.mktemp("drift") / "proj")
    with running_prefect(root) as local:
        first = finetune_pipeline(workdir=str(root))
        assert first["promotion"]["champion"] == "v0001"
        yield root, local


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "L").save(buf, "PNG")
    return buf.getvalue()


def clean(n: int, seed: int) -> list[bytes]:
    """Like the training data (tests/conftest.py make_dataset): noisy dark or bright squares."""
    rng = np.random.default_rng(seed)
    return [png(np.clip(rng.normal((50, 200)[i % 2], 25, (64, 64)), 0, 255).astype(np.uint8)) for i in range(n)]


def striped(n: int, seed: int) -> list[bytes]:
    """A new camera: the same brightness levels, with bold stripes across the cell."""
    rng = np.random.default_rng(seed)
    bands = (np.arange(64) // 4 % 2 * 120 - 60)[None, :]
    return [png(np.clip(rng.normal((50, 200)[i % 2], 25, (64, 64)) + bands, 0, 255).astype(np.uint8))
            for i in range(n)]


def send(server: ServerProcess, uploads: list[bytes]) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for i, data in enumerate(uploads):
            r = http.post("/api/predict", files={"files": (f"{i}.png", data, "image/png")})
            assert r.status_code == 200, r.text


def drift_state(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/api/model", timeout=30).json()


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def drift_runs() -> list:
    """Runs of the retraining deployment the model server started (tagged `drift`; the schedule's upcoming runs are
    not)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client() as c:
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])))
    return [r for r in runs if "drift" in r.tags]


def test_clean_traffic_starts_nothing_and_drift_retrains_promotes_and_hot_swaps(loop, tmp_path):
    root, local = loop
    saved = tmp_path / "drifted"
    server = ServerProcess("champion", "--registry", str(root / "registry"), "--poll-s", "0.2", "--drift-window", "20",
                           "--drift-every", "10", "--drift-consecutive", "2", "--drift-alpha", "0.01",
                           "--drift-retrain", "finetune-retrain/nightly", "--prefect-api-url", local.api_url,
                           "--drift-retrain-cooldown-s", "0", "--drift-save-dir", str(saved), "--drift-save-max", "40",
                           cwd=root).__enter__()
    try:
        server.wait_ready(120)
        state = drift_state(server)["drift"]
        assert state["enabled"] and state["reference"]["reference_split"] == "val" and state["tests"] == 0

        send(server, clean(40, seed=5))  # tests after 20, 30 and 40 images
        state = wait_until(lambda: (s := drift_state(server)["drift"])["tests"] >= 3 and s, server, 120, "three tests")
        assert not state["detected"] and state["alarms"] == 0 and metric(server, "drift_detected") == 0
        assert drift_runs() == []

        # a new camera: the alarm, the saved window, and a retraining run with the drift as its trigger
        send(server, striped(30, seed=6))
        state = wait_until(lambda: (s := drift_state(server)["drift"])["alarms"] == 1 and s.get("retrain", {}).get("last")
                           and s, server, 120, "the alarm and the retraining request")
        assert state["detected"] and metric(server, "drift_detected") == 1 and metric(server, "drift_alarms_total") == 1
        assert state["retrain"]["last"]["ok"], state["retrain"]
        folder = Path(state["save"]["last"]["folder"])
        assert folder.parent == saved and len(list(folder.glob("*.png"))) == 20
        assert [str(r.id) for r in drift_runs()] == [state["retrain"]["last"]["flow_run_id"]]
        run = finish(state["retrain"]["last"]["flow_run_id"])
        assert run.state.type.value == "COMPLETED", (run.state.message, logs_of(run.id)[-3000:])
        assert run.parameters["trigger"]["kind"] == "drift" and run.parameters["trigger"]["model_version"] == "v0001"
        arts = artifacts_of(run.id)
        assert "drift detected on v0001" in arts["trigger"].data and '"pvalues"' in arts["trigger"].data
        assert "retraining on it would reproduce the champion" in arts["outcome"].data  # the data has not changed
        assert f"label the drifted images saved in {folder}" in arts["outcome"].data
        assert registry.read_champion(root / "registry")["version"] == "v0001"

        # a person labels the saved images into the data; traffic turns clean (the alarm clears), then drifts again
        for i, image in enumerate(sorted(folder.glob("*.png"))):
            level = np.asarray(Image.open(image).convert("L"), np.float32).mean()
            shutil.copy(image, root / "raw" / ("bright" if level > 125 else "dark") / f"striped-{i}.png")
        send(server, clean(40, seed=7))
        wait_until(lambda: not drift_state(server)["drift"]["detected"], server, 120, "the alarm to clear")
        send(server, striped(30, seed=8))
        state = wait_until(lambda: (s := drift_state(server)["drift"])["alarms"] == 2
                           and s["retrain"]["last"]["flow_run_id"] != str(run.id) and s, server, 120, "the second alarm")
        second = finish(state["retrain"]["last"]["flow_run_id"])
        assert second.state.type.value == "COMPLETED", (second.state.message, logs_of(second.id)[-3000:])
        assert "promoted v0002 over v0001" in artifacts_of(second.id)["outcome"].data
        entry = lineage.latest(root / "registry", "v0002")
        assert entry["trigger"]["kind"] == "drift" and entry["trigger"]["pvalues"]["combined"] < 0.01
        assert entry["trigger"]["window"] == 20 and entry["trigger"]["model_version"] == "v0001"
        assert (root / "registry" / "versions" / "v0002" / drift.REFERENCE_FILE).is_file()

        # the server follows the champion: the new model, a new window against its own reference
        info = wait_until(lambda: (i := drift_state(server))["version"] == "v0002" and i, server, 120, "the hot swap")
        assert info["drift"]["enabled"] and info["drift"]["tests"] == 0 and not info["drift"]["detected"]
        assert metric(server, "drift_detected") == 0 and metric(server, "drift_alarms_total") == 2
    finally:
        server.stop()
        server.cleanup()
