"""Each stage killed with SIGKILL at a named point (tasks.crashpoints), then the pipeline run again: it
finishes, leaves no temp files, and the registry still reads. Also: a manifest source's images are what
DVC tracks."""

from __future__ import annotations

import random
import re
import shutil

import pandas as pd
import pytest

from tasks import registry
from tasks.params import write_overrides
from tests.conftest import copy_project
from tests.test_end_to_end import dvc, new_project, read, sh, stages_run

pytestmark = pytest.mark.slow

# Where each stage can be killed (every atomic write has a point `write:<file name>` just before its rename).
CRASH_POINTS = {
    "ingest": ["ingest:copied", "write:manifest.csv", "write:classes.json"],
    "validate": ["write:validated.csv", "write:validation.json", "write:validation.md"],
    "fetch_model": ["write:weights.pt", "write:meta.json"],
    "train": ["train:step:stage=0:epoch=1:batch=1", "write:train_state.pt", "write:model.pt", "write:summary.json"],
    "evaluate": ["write:metrics.json", "write:predictions.csv", "write:confusion.png"],
    "gate": ["write:verdict.json", "write:verdict.md"],
    "export": ["write:model.onnx", "write:model_card.md", "write:export.json"],
    "promote": ["registry:staged", "write:champion.json", "write:promote.json"],
}
SEED = 20261129
CHOSEN = {stage: random.Random(f"{SEED}:{stage}").choice(points) for stage, points in CRASH_POINTS.items()}
LEFTOVERS = (".*.tmp", ".staging-*", "*.tmp", "*.old")


@pytest.fixture(scope="module")
def project(trained_tiny, tmp_path_factory):
    """A copy of the session's tiny project, trained end to end by `dvc repro`."""
    return copy_project(trained_tiny, tmp_path_factory.mktemp("crash") / "p")


def leftovers(root):
    """Temp files in the workspace or the registry (temps are written in .dvc/tmp/finetune, swept by the next
    writer: a killed stage that DVC restores from its run cache leaves nothing in the workspace)."""
    found = []
    for pattern in LEFTOVERS:
        found += [p for p in root.rglob(pattern) if ".git" not in p.parts and ".dvc" not in p.parts]
    return found


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", list(CRASH_POINTS), ids=[f"{s}@{p}" for s, p in CHOSEN.items()])
def test_a_stage_killed_at_a_random_point_recovers_on_the_next_run(project, stage):
    root = project
    if stage == "promote":  # a fresh registry (judged again), so the promote stage has a version to stage
        shutil.rmtree(root / "registry")
        dvc("repro", "-f", "--single-item", "gate", cwd=root)
    killed = sh(*_dvc(), "repro", "-f", "--single-item", stage, cwd=root, check=False,
                extra_env={"FINETUNE_CRASH_AT": CHOSEN[stage]})
    # DVC reports the kill as -9, or as 137 when its shell waited for the command (128 + SIGKILL)
    assert killed.returncode != 0 and re.search(r"exited with (-9|137)\b", killed.stderr), killed.stderr[-2000:]
    again = dvc("repro", cwd=root)
    # DVC removed the stage's outputs before the killed run: it runs again, or restores them from its run cache
    assert stage in stages_run(again.stdout) or f"Stage '{stage}' is cached" in again.stdout, again.stdout
    assert "up to date" in dvc("status", cwd=root).stdout
    assert leftovers(root) == []
    reg = root / "registry"
    alias = registry.read_champion(reg)
    assert alias is not None and all(registry.read_metadata(reg, v)["onnx_sha256"] for v in registry.list_versions(reg))
    assert read(root, "reports/promote.json")["champion"] == alias["version"]


def _dvc():
    import sys

    return [sys.executable, "-m", "dvc"]


@pytest.mark.timeout(900)
def test_replacing_an_image_of_a_manifest_source_reruns_ingest(tmp_path):
    """DVC tracks the whole data folder of a manifest source, not just the table."""
    root = new_project(tmp_path / "m")
    rows = [{"path": p.relative_to(root / "raw").as_posix(), "label": p.parent.name}
            for p in sorted((root / "raw").rglob("*.png"))]
    pd.DataFrame(rows).to_csv(root / "raw" / "labels.csv", index=False)
    write_overrides(root / "params.yaml", ["data.source=manifest", "data.manifest=labels.csv", "export.int8=false"])
    dvc("repro", "ingest", cwd=root)
    first = (root / "data/manifest.csv").read_text()
    img = root / "raw" / rows[0]["path"]
    img.write_bytes((root / "raw" / rows[-1]["path"]).read_bytes())  # same name, other content
    status = dvc("status", cwd=root).stdout
    assert "ingest" in status and "modified" in status, status
    assert "ingest" in stages_run(dvc("repro", "ingest", cwd=root).stdout)
    assert (root / "data/manifest.csv").read_text() != first  # the new content's sha256 is recorded
