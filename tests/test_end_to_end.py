"""The whole pipeline for real on tiny generated data: `dvc repro` in a temporary git repo, and
the Prefect flow (real temporary Prefect server) in another, with the same params and seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.params import write_overrides
from tests.conftest import REPO, copy_project, make_dataset

pytestmark = pytest.mark.slow

TINY = [
    "data.source=folder", "data.path=raw", "data.split.stratify_by=[]", "data.split.test=0.25", "data.split.val=0.25",
    "data.workers=2", "validate.min_images_per_class=1", "train.image_size=64", "train.cpu_image_size=64",
    "train.batch_size=8", "train.stages.0.epochs=2", "train.stages.0.lr=0.03", "train.stages.1.epochs=1",
    "train.stages.1.lr=0.0003", "gates.min.accuracy=0.5", "gates.min.macro_recall=0.5", "gates.min.macro_f1=0.5",
    "gates.per_class_recall_floor=0.3", "gates.champion.max_drop=0.5",  # 12 test images: one image is 0.08
    "export.int8=false",  # INT8 export and its bound: tests/test_export.py; ~5 s of every export run here
]


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], DVC_NO_ANALYTICS="1")


def sh(*cmd, cwd, check=True, extra_env: dict[str, str] | None = None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dvc(*args, cwd, check=True):
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def new_project(root: Path, tiny: bool = True) -> Path:
    """A fresh git + DVC repository holding this project's pipeline and (`tiny`) a tiny image folder with params
    for it; tiny=False: params.yaml exactly as shipped, no data."""
    root.mkdir(parents=True)
    for name in ("tasks", "flows", "deploy", "finetune"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    if tiny:
        make_dataset(root / "raw", per_class=24, size=64, mislabeled=3)
        write_overrides(root / "params.yaml", TINY)
    sh("git", "init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    return root


def read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


@pytest.fixture(scope="module")
def repro_project(trained_tiny, tmp_path_factory):
    """A copy of the session's tiny project, trained end to end by `dvc repro` (this module changes it)."""
    return copy_project(trained_tiny, tmp_path_factory.mktemp("e2e") / "repro")


def test_dvc_repro_produces_a_gated_verified_model(repro_project):
    root = repro_project
    assert (root / "models/model.onnx").stat().st_size > 1_000_000
    metrics = read(root, "reports/eval/metrics.json")
    assert metrics["n"] == 12 and metrics["accuracy"] >= 0.5
    assert read(root, "reports/gate/verdict.json")["passed"] is True
    export = read(root, "reports/export.json")
    assert export["passed"] and export["top1_agreement"] == 1.0
    assert read(root, "reports/validation/validation.json")["success"] is True
    infra = read(root, "reports/promote.json")["infra_check"]  # the real server served the candidate first
    assert infra["passed"] and infra["checked"] and all(c["expected"] == c["infer"] for c in infra["checked"])
    assert (root / "reports/validation/docs").is_dir()
    history = (root / "reports/train/history.csv").read_text().splitlines()
    assert history[0].startswith("stage,") and len(history) == 1 + 3  # header + one row per epoch


def stages_run(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_second_repro_is_a_no_op(repro_project):
    """(Its speed is measured in bench/bench_repro.py, not asserted here.)"""
    out = dvc("repro", cwd=repro_project).stdout
    assert "Running stage" not in out
    assert "up to date" in dvc("status", cwd=repro_project).stdout


UPSTREAM_OF_GATE = {"ingest", "validate", "fetch_model", "label_issues", "train", "evaluate"}


@pytest.mark.parametrize("path, comment, must_run, must_not_run", [
    # a stage's own module; same outputs: nothing downstream of ingest reruns
    ("tasks/ingest.py", "# a reworded comment", {"ingest"}, UPSTREAM_OF_GATE - {"ingest"} | {"gate", "export", "promote"}),
    # a shared module two stages run: both rerun (after our own promotion the gate judges "already the champion",
    # so export may follow), nothing upstream of the gate
    ("tasks/registry.py", "# a reworded comment", {"gate", "promote"}, UPSTREAM_OF_GATE),
    # a template the export stage reads, not a module
    ("tasks/export/model_card.md.j2", "{# a reworded comment #}", {"export"}, UPSTREAM_OF_GATE | {"gate"}),
    # the server the promote stage's infra check runs (a process, not an import): the check runs again
    ("deploy/server.py", "# a reworded comment", {"promote"}, UPSTREAM_OF_GATE | {"gate", "export"}),
])
def test_a_comment_reruns_only_the_stages_that_run_that_code(repro_project, path, comment, must_run, must_not_run):
    """A stage depends on exactly the code it runs: rewording the ingest module reruns ingest (its outputs are
    the same, so training does not rerun); a shared module reruns the stages that run it, not training; the model
    card template reruns export; the server code reruns the promote stage's infra check."""
    root = repro_project
    with (root / path).open("a") as f:
        f.write("\n" + comment + "\n")
    ran = stages_run(dvc("repro", cwd=root).stdout)
    assert must_run <= ran and not ran & must_not_run, ran
    assert "up to date" in dvc("status", cwd=root).stdout


def test_gate_threshold_change_reruns_only_gate_export_and_promote(repro_project):
    root = repro_project
    write_overrides(root / "params.yaml", ["gates.min.accuracy=0.55"])
    out = dvc("repro", cwd=root).stdout
    assert stages_run(out) == {"gate", "export", "promote"}, out


def test_changed_image_reruns_validate_and_everything_downstream(repro_project):
    root = repro_project
    img = sorted((root / "raw" / "dark").iterdir())[0]
    from PIL import Image

    Image.open(img).rotate(90).save(img)
    status = dvc("status", cwd=root).stdout
    assert "ingest:" in status and "modified:" in status and "raw" in status  # says why
    out = dvc("repro", cwd=root).stdout
    ran = stages_run(out)
    assert {"ingest", "validate", "label_issues", "train", "evaluate", "gate", "export", "promote"} <= ran, out
    assert "fetch_model" not in ran


def test_push_and_pull_with_a_local_remote(repro_project, tmp_path):
    """`dvc push` to a directory remote, lose every output and the cache, `dvc pull` brings them back
    (data/label_reviewed.csv is the user's file, kept in git, not an output)."""
    root = repro_project
    dvc("remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=root)
    dvc("push", cwd=root)
    onnx_bytes = (root / "models/model.onnx").read_bytes()
    outs = set()  # what DVC caches (reports marked cache: false live in git, like label_reviewed.csv)
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if opts.get("cache", True):
                outs.add(path)
    assert "data/label_reviewed.csv" not in outs and {"models/model.onnx", "data/images"} <= outs
    for rel in sorted(outs) + [".dvc/cache"]:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    dvc("pull", cwd=root)
    assert (root / "models/model.onnx").read_bytes() == onnx_bytes
    assert len(list((root / "data/images").rglob("*.png"))) == 48
    assert "up to date" in dvc("status", cwd=root).stdout


def finetune_cli(*args, cwd):
    return sh(str(Path(sys.executable).parent / "finetune"), *args, cwd=cwd, check=False)


def test_gates_keep_a_bad_candidate_out_and_promote_a_better_one(trained_tiny, tmp_path):
    """On a copy of the session's trained project with an empty registry (its data, validation and weights are
    reused): run 1 becomes champion v0001; run 2 with a bound set too high fails with a readable reason and
    leaves model.onnx and the champion alone; run 3 (better) is kept out while significance is
    required (12 test images cannot show it at the level asked), then becomes v0002; `finetune rollback`
    restores v0001."""
    from tasks import registry
    from tasks.files import sha256_file

    root = copy_project(trained_tiny, tmp_path / "gates")
    reg = root / "registry"
    shutil.rmtree(reg)
    # run 1: weak by construction (one head-only epoch at a learning rate too small to move the head), with
    # absolute gates open so it still becomes the champion; head-only training and no INT8 keep the runs short
    weak = ["train.stages.0.epochs=1", "train.stages.0.lr=0.000001", "gates.min.accuracy=0", "gates.min.macro_recall=0",
            "gates.min.macro_f1=0", "gates.per_class_recall_floor=0"]
    write_overrides(root / "params.yaml", weak + ["gates.champion.max_drop=0.01", "train.stages.1.epochs=0",
                                                  "export.int8=false"])
    dvc("repro", cwd=root)
    first = read(root, "reports/eval/metrics.json")
    assert read(root, "reports/promote.json")["champion"] == "v0001"
    assert read(root, "reports/gate/verdict.json")["champion"]["status"] == "none"  # first run: absolute gates decide
    onnx_sha = sha256_file(root / "models/model.onnx")

    # run 2: a bound nobody can meet -> the gate fails, export and promote never run
    write_overrides(root / "params.yaml", ["gates.min.accuracy=0.999"])
    failed = dvc("repro", cwd=root, check=False)
    assert failed.returncode != 0
    assert f"error: gate failed: accuracy {first['accuracy']:.4f} < 0.9990" in failed.stdout + failed.stderr
    assert read(root, "reports/gate/verdict.json")["passed"] is False
    assert (root / "reports/gate/verdict.md").read_text().startswith("# Gate verdict: FAILED")
    assert sha256_file(root / "models/model.onnx") == onnx_sha
    assert registry.read_champion(reg)["version"] == "v0001" and registry.list_versions(reg) == ["v0001"]

    # run 3: the tiny projects' usual head-only recipe (two epochs at lr 0.03), which learns this data
    better = ["gates.min.accuracy=0", "train.stages.0.epochs=2", "train.stages.0.lr=0.03"]
    # McNemar on 12 test images can never reach p < 1e-6 (the smallest two-sided mid-p is about 2e-4)
    never_significant = ["gates.champion.require_significant=true", "gates.champion.test=mcnemar",
                         "gates.champion.metric=accuracy", "gates.champion.alpha=0.000001"]
    write_overrides(root / "params.yaml", better + never_significant)
    kept_out = dvc("repro", cwd=root, check=False)
    second = read(root, "reports/eval/metrics.json")
    assert second["macro_f1"] > first["macro_f1"], (first, second)
    assert kept_out.returncode != 0 and "not a significant improvement" in kept_out.stdout + kept_out.stderr
    assert registry.read_champion(reg)["version"] == "v0001"
    write_overrides(root / "params.yaml", ["gates.champion.require_significant=false", "gates.champion.test=bootstrap",
                                           "gates.champion.metric=macro_f1", "gates.champion.alpha=0.05"])
    dvc("repro", cwd=root)
    verdict = read(root, "reports/gate/verdict.json")
    assert verdict["passed"] and verdict["champion"]["version"] == "v0001" and verdict["champion"]["delta"] > 0
    assert read(root, "reports/promote.json")["champion"] == "v0002"
    assert sha256_file(root / "models/model.onnx") != onnx_sha
    assert registry.read_metadata(reg, "v0002")["metrics"]["macro_f1"] == second["macro_f1"]
    assert "up to date" in dvc("status", cwd=root).stdout  # the registry is not DVC's business

    rolled = finetune_cli("rollback", cwd=root)
    assert rolled.returncode == 0 and "champion: v0001 (rolled back from v0002)" in rolled.stdout
    assert registry.champion_model(reg).read_bytes() == (reg / "versions/v0001/model.onnx").read_bytes()
    assert sha256_file(reg / "versions/v0001/model.onnx") == onnx_sha
    listing = finetune_cli("registry", "list", cwd=root).stdout
    assert "*  v0001" in listing and "v0002" in listing
