"""The retraining flow on generated data, run in this process against a Prefect server (tests/conftest.py), on a
copy of the session's trained tiny project: no new data, no retraining; new images, a retraining that promotes; a
worse recipe, a failed gate that keeps the champion. Its own file so that `make test`'s workers can run it beside tests/test_prefect_deployments.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import lineage, registry, stages
from tasks.params import load_params
from tests.conftest import copy_project, make_dataset

pytestmark = pytest.mark.slow


def test_retraining_only_on_new_data_and_promoting_only_a_winner(prefect_server, trained_tiny, tmp_path):
    """Run in this process against a Prefect server, on a copy of the session's trained tiny project (champion
    v0001, registered by `dvc repro`): a flow run finds every stage up to date and records the champion's lineage;
    unchanged data, no retraining; new images, a retraining that promotes (every stage downstream of the data ran,
    the weights were not fetched again); a worse recipe on new data, a failed gate that keeps the champion."""
    from flows.pipeline import StageFailed, finetune_pipeline
    from flows.retrain import finetune_retrain

    root = copy_project(trained_tiny, tmp_path / "retrain")
    reg = root / "registry"
    first = finetune_pipeline(workdir=str(root))  # nothing changed: every stage is up to date (dvc.lock says so)
    assert set(first["stages"].values()) == {"skipped (up to date)"} and list(first["stages"]) == list(stages.NAMES)
    assert first["promotion"]["champion"] == "v0001" and "champion v0001" in first["summary"]
    assert Path(first["outputs"]["model"]).is_file() and registry.read_champion(reg)["version"] == "v0001"
    assert lineage.latest(reg, "v0001")["data"]["dvc_hash"]  # recorded by the flow run: retraining can compare

    same = finetune_retrain(workdir=str(root), params={"gates": {"min": {"accuracy": 0.6}}})
    assert not same["retrained"] and same["outcome"].startswith("no change: data raw (")
    assert "champion v0001" in same["outcome"] and load_params(root / "params.yaml").gates.min.accuracy == 0.5  # untouched

    make_dataset(tmp_path / "more", per_class=8, size=64, seed=7)  # new images of both classes
    for label in ("dark", "bright"):
        shutil.move(tmp_path / "more" / label, root / "raw" / label / "new")
    retrained = finetune_retrain(workdir=str(root))
    assert retrained["retrained"] and retrained["outcome"].startswith("retrained on new data raw (")
    assert retrained["stages"] == {name: "skipped (up to date)" if name == "fetch_model" else "ran"
                                   for name in stages.NAMES}, retrained["stages"]
    assert retrained["outcome"].endswith("promoted v0002 over v0001"), retrained["outcome"]
    recorded = lineage.latest(reg, "v0002")["data"]["dvc_hash"]
    assert recorded != lineage.latest(reg, "v0001")["data"]["dvc_hash"]

    (root / "raw" / "dark" / "new" / "000.png").unlink()  # new data again, and a recipe that cannot learn it
    state = finetune_retrain(workdir=str(root), overrides=["train.stages.0.lr=0.000001", "train.stages.1.epochs=0",
                                                                   "gates.min.accuracy=0.7"],
                             return_state=True)
    assert state.type.value == "FAILED"
    assert "not promoted because stage 'gate' failed: gate failed" in state.message
    assert "the champion stays v0002" in state.message
    assert registry.read_champion(reg)["version"] == "v0002"
    with pytest.raises(StageFailed):
        state.result()
