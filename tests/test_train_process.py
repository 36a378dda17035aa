"""Training as real processes: killed with SIGKILL at a named point and resumed, and two processes under torchrun.

The kill is deterministic: `FINETUNE_CRASH_AT` names the optimizer step at which the process SIGKILLs itself
(`tasks.crashpoints`), so a loaded machine cannot make it land elsewhere (no sleeps, no polling)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
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


def env(**extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHONPATH=str(REPO), **extra)


def finetune(*args, cwd: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=cwd, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
@pytest.mark.parametrize("stage, epoch, done", [
    (0, 1, 1),  # mid frozen stage: 1 epoch done, killed at the 3rd step of the 2nd
    (1, 0, 2),  # right after the unfreeze: killed at the 3rd step of the first unfrozen epoch
])
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(project, stage, epoch, done):
    reference = project / "out" / "reference" / "model.pt"
    if not reference.exists():
        finish(finetune(*train_args("reference"), cwd=project))
    name = f"killed-{stage}-{epoch}"
    out = project / "out" / name
    proc = finetune(*train_args(name), cwd=project, FINETUNE_CRASH_AT=f"train:step:stage={stage}:epoch={epoch}:batch=2")
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert rows(out / "history.csv") == done and not (out / "model.pt").exists()
    with (out / "state.pt").open("rb") as f:  # the state saved after the last completed epoch
        assert f.readline() == b"FINETUNE-TRAIN-STATE\n"

    output = finish(finetune(*train_args(name), cwd=project))
    assert "resuming from" in output
    assert not (out / "state.pt").exists()  # removed once the checkpoint is written
    ref, got = weights(reference), weights(out / "model.pt")
    assert all(torch.equal(v, ref[k]) for k, v in got.items())
    assert rows(out / "history.csv") == rows(project / "out" / "reference" / "history.csv") == 5


@pytest.mark.timeout(900)
def test_torchrun_two_processes(project):
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tasks.train",
         *train_args("ddp")[2:]], cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finish(proc)
    summary = json.loads((project / "out" / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs"] == 5
    with (project / "out" / "ddp" / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [float(h["replica_max_diff"]) for h in history] == [0.0] * 5
    assert weights(project / "out" / "ddp" / "model.pt")
