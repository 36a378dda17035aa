"""The `finetune` command as users run it: helpful --help, one-line errors on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FINETUNE = str(Path(sys.executable).parent / "finetune")


def finetune(*args, cwd=REPO):
    env = dict(os.environ, FINETUNE_DEBUG="0")
    return subprocess.run([FINETUNE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


HELP = {  # command -> what its help must mention (its own options and arguments)
    (): ["run", "validate", "stage", "registry", "promote", "rollback", "models", "params", "serve", "predict",
         "export-triton"],
    ("run",): ["--set", "--params", "--workdir"],
    ("validate",): ["PATH", "--out", "--params", "--label-issues", "--reviewed"],
    ("stage",): ["ingest", "validate", "fetch-model", "label-issues", "train", "evaluate", "gate", "export", "promote"],
    ("stage", "label-issues"): ["--manifest", "--base", "--reviewed", "--out-dir", "--flagged"],
    ("stage", "ingest"): ["--images", "--manifest", "--params"],
    ("stage", "train"): ["--manifest", "--checkpoint", "--state", "--no-resume", "torchrun"],
    ("stage", "gate"): ["--metrics", "--predictions", "--out-dir"],
    ("stage", "export"): ["--onnx-path", "--int8-dir", "--model-card"],
    ("stage", "promote"): ["--onnx-path", "--verdict", "--report", "--images", "--infra-images"],
    ("promote",): ["VERSION", "--registry"],
    ("rollback",): ["--registry"],
    ("registry",): ["list", "add"],
    ("registry", "list"): ["--registry"],
    ("registry", "add"): ["ONNX_PATH", "--model-card", "--note"],
    ("params",): ["defaults"],
    ("serve",): ["--model", "--registry", "--host", "--port", "--token-file", "--batching", "--max-body-bytes",
                 "--drift-window", "--drift-every", "--drift-consecutive", "--drift-retrain", "--drift-save-dir"],
    ("drift",): ["PATHS", "--model", "--alpha", "--out", "--registry"],
    ("predict",): ["MODEL", "PATHS", "--out", "--root", "--registry"],
    ("export-triton",): ["MODEL", "--out", "--name", "--max-batch-size"],
}


@pytest.mark.parametrize("cmd", list(HELP), ids=[" ".join(c) or "finetune" for c in HELP])
def test_help_names_each_commands_own_options(cmd):
    proc = finetune(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert out.lower().startswith("usage") or "Usage" in out
    for needle in HELP[cmd]:
        assert needle.lower() in out.lower(), f"`finetune {' '.join(cmd)} --help` does not mention {needle}"


def test_stage_commands_are_the_modules_dvc_runs(tmp_path):
    """`finetune stage X` and `python -m tasks.X` (what dvc.yaml calls) are one code path: same errors, same exit."""
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: folder\n  path: {tmp_path / 'absent'}\n")
    args = ["--params", str(params), "--images", str(tmp_path / "d"), "--manifest", str(tmp_path / "m.csv")]
    via_cli = finetune("stage", "ingest", *args, cwd=tmp_path)
    via_module = subprocess.run([sys.executable, "-m", "tasks.ingest", *args], cwd=tmp_path, capture_output=True,
                                text=True, env=dict(os.environ, FINETUNE_DEBUG="0"), timeout=300)
    assert via_cli.returncode == via_module.returncode == 1
    assert via_cli.stderr.splitlines()[-1] == via_module.stderr.splitlines()[-1] == \
        f"error: data folder not found: {tmp_path / 'absent'}"


def test_params_defaults_prints_the_documented_params_file():
    from tasks.params import render_defaults

    proc = finetune("params", "defaults")
    assert proc.returncode == 0 and proc.stdout == render_defaults()


def test_unknown_params_key(tmp_path):
    one_line_error(finetune("run", "--set", "train.batch_sise=8"), "unknown key 'train.batch_sise'")


def test_non_numeric_learning_rate(tmp_path):
    one_line_error(finetune("run", "--set", "train.stages.0.lr=fast"), "train.stages.0.lr", "'fast'")


def test_missing_data_folder(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: folder\n  path: {tmp_path / 'no-such-folder'}\n")
    proc = finetune("stage", "ingest", "--params", str(params), "--images", str(tmp_path / "d"),
                    "--manifest", str(tmp_path / "m.csv"), cwd=tmp_path)
    one_line_error(proc, "data folder not found", "no-such-folder")
    assert not (tmp_path / "m.csv").exists()


def test_validate_command_exit_codes(tiny_folder, tmp_path):
    ok = finetune("validate", str(tiny_folder), "--out", str(tmp_path / "ok"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "PASSED" in ok.stdout and (tmp_path / "ok" / "validation.json").exists()
    (tiny_folder / "dark" / "broken.png").write_bytes(b"not a png")
    bad = finetune("validate", str(tiny_folder), "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 1 and "broken.png" in bad.stderr and "Traceback" not in bad.stderr
    missing = finetune("validate", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "nowhere" in missing.stderr + missing.stdout


def test_registry_commands_promote_rollback_and_clear_errors(tmp_path):
    from tasks import registry

    reg = tmp_path / "reg"
    one_line_error(finetune("rollback", "--registry", str(reg), cwd=tmp_path), "no champion", "nothing to roll back")
    one_line_error(finetune("promote", "--registry", str(reg), cwd=tmp_path), "no versions to promote")
    for name in ("a", "b"):
        src = tmp_path / f"{name}.onnx"
        src.write_bytes(name.encode() * 10)
        registry.register(reg, {"model.onnx": src}, {"metrics": {"accuracy": 0.9, "macro_f1": 0.8}})
    one_line_error(finetune("promote", "7", "--registry", str(reg), cwd=tmp_path), "no version v0007")
    ok = finetune("promote", "1", "--registry", str(reg), cwd=tmp_path)
    assert ok.returncode == 0 and "champion: v0001" in ok.stdout
    ok = finetune("promote", "--registry", str(reg), cwd=tmp_path)  # the newest
    assert ok.returncode == 0 and "champion: v0002 (was v0001)" in ok.stdout
    listing = finetune("registry", "list", "--registry", str(reg), cwd=tmp_path)
    assert listing.returncode == 0 and "*  v0002" in listing.stdout and "0.9000" in listing.stdout
    ok = finetune("rollback", "--registry", str(reg), cwd=tmp_path)
    assert ok.returncode == 0 and "champion: v0001 (rolled back from v0002)" in ok.stdout
    one_line_error(finetune("rollback", "--registry", str(reg), cwd=tmp_path), "no previous champion")
    (reg / "champion.json").write_text("[1, 2")
    damaged = finetune("registry", "list", "--registry", str(reg), cwd=tmp_path)
    one_line_error(damaged, "champion.json is not valid JSON", "finetune promote VERSION")
    assert "v0001" in damaged.stdout and "v0002" in damaged.stdout  # the versions to repair it with are listed
    one_line_error(finetune("registry", "add", str(tmp_path / "missing.onnx"), "--registry", str(reg), cwd=tmp_path),
                   "missing.onnx: no such ONNX file")
    # without --registry: registry.root from the params file, relative to its folder
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "params.yaml").write_text("registry:\n  root: ../reg\n")
    one_line_error(finetune("rollback", "--params", str(tmp_path / "proj" / "params.yaml"), cwd=tmp_path),
                   "champion.json is not valid JSON")
