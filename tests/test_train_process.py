"""Training as real processes: killed with SIGKILL and resumed, and two processes under torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.params import write_overrides
from tests.conftest import REPO, make_dataset

pytestmark = pytest.mark.slow

SETTINGS = [
    "data.source=folder", "data.path=raw", "data.split.stratify_by=[]", "data.split.test=0.2", "data.split.val=0.2",
    "data.workers=2", "train.image_size=128", "train.cpu_image_size=128", "train.batch_size=4", "train.threads=1",
    "train.stages.0.epochs=2", "train.stages.0.lr=0.03", "train.stages.1.epochs=3", "train.stages.1.trainable=2",
]


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHONPATH=str(REPO))


def finetune(*args, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks.cli", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    make_dataset(root / "raw", per_class=30, size=128, mislabeled=3)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_overrides(root / "params.yaml", SETTINGS)
    finish(finetune("stage", "ingest", cwd=root))
    finish(finetune("stage", "fetch-model", cwd=root))
    return root


def train_args(name: str) -> list[str]:
    return ["stage", "train", "--manifest", "data/manifest.csv", "--checkpoint", f"out/{name}/model.pt",
            "--metrics", f"out/{name}/summary.json", "--history", f"out/{name}/history.csv",
            "--state", f"out/{name}/state.pt"]


def rows(path: Path) -> int:
    try:
        with path.open() as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)
    except FileNotFoundError:
        return 0


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kill_after", [1, 2])  # mid frozen stage; right after the unfreeze
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(project, kill_after):
    reference = project / "out" / "reference" / "model.pt"
    if not reference.exists():
        finish(finetune(*train_args("reference"), cwd=project))
    name = f"killed{kill_after}"
    history = project / "out" / name / "history.csv"
    proc = finetune(*train_args(name), cwd=project, start_new_session=True)
    deadline = time.time() + 300
    while rows(history) < kill_after:
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(project / "out" / name / "state.pt", weights_only=False)
    assert len(state["history"]) == kill_after, "the kill should land inside the next epoch"
    assert not (project / "out" / name / "model.pt").exists()

    out = finish(finetune(*train_args(name), cwd=project))
    assert "resuming from" in out
    assert not (project / "out" / name / "state.pt").exists()  # removed once the checkpoint is written
    ref, got = weights(reference), weights(project / "out" / name / "model.pt")
    assert all(torch.equal(v, ref[k]) for k, v in got.items())
    assert rows(history) == rows(project / "out" / "reference" / "history.csv") == 5


@pytest.mark.timeout(900)
def test_torchrun_two_processes(project):
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tasks.cli",
         *train_args("ddp")], cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finish(proc)
    summary = json.loads((project / "out" / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs"] == 5
    with (project / "out" / "ddp" / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [float(h["replica_max_diff"]) for h in history] == [0.0] * 5
    assert weights(project / "out" / "ddp" / "model.pt")
