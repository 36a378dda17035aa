"""Batch prediction (`finetune predict`): files, folders and manifests in; CSV, JSON or JSON Lines out;
streaming; unreadable files reported, not fatal; clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from deploy.predict import PredictError, iter_images, predict
from tasks import registry
from tasks.images import load_for_model
from tasks.inference import OnnxClassifier
from tests.conftest import brightness_onnx, make_dataset

CLASSES = ["bright", "dark"]
FINETUNE = str(Path(sys.executable).parent / "finetune")


@pytest.fixture
def setup(tmp_path):
    images = make_dataset(tmp_path / "images", classes=("dim", "lit"), per_class=4, size=40)
    onnx = brightness_onnx(tmp_path / "model.onnx", CLASSES)
    expected = {str(p): ("bright" if load_for_model(p, 32).mean() > 128 else "dark")
                for p in sorted(images.rglob("*.png"))}
    assert set(expected.values()) == {"bright", "dark"}
    return {"tmp": tmp_path, "images": images, "onnx": onnx, "expected": expected}


def test_a_folder_to_csv_with_the_models_labels(setup):
    out = setup["tmp"] / "out/predictions.csv"
    summary = predict(str(setup["onnx"]), [setup["images"]], out, progress=False)
    assert (summary.images, summary.errors, summary.version) == (8, 0, None)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "probability", "p_bright", "p_dark", "error"]
    assert {r["path"]: r["label"] for r in rows} == setup["expected"]
    assert [r["path"] for r in rows] == sorted(setup["expected"])  # folders are walked in sorted order
    assert all(abs(float(r["p_bright"]) + float(r["p_dark"]) - 1) < 1e-4 for r in rows)


def test_files_and_manifests_to_json_and_jsonl_and_a_bad_file_is_a_row_with_its_error(setup):
    tmp, images = setup["tmp"], setup["images"]
    (tmp / "broken.png").write_bytes(b"not a png")
    rel = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))[:3]
    pd.DataFrame({"path": rel, "label": "x"}).to_csv(tmp / "manifest.csv", index=False)
    one = sorted(images.rglob("*.png"))[-1]
    out = tmp / "p.json"
    summary = predict(str(setup["onnx"]), [one, tmp / "manifest.csv", tmp / "broken.png"], out, root=images,
                      progress=False)
    rows = json.loads(out.read_text())
    assert summary.images == 5 and summary.errors == 1 and len(rows) == 5
    assert [r["path"] for r in rows] == [str(one), *(str(images / r) for r in rel), str(tmp / "broken.png")]
    assert all(r["label"] == setup["expected"][r["path"]] for r in rows[:4])
    assert rows[4]["label"] is None and "cannot decode" in rows[4]["error"]
    out = tmp / "p.jsonl"
    predict(str(setup["onnx"]), [one], out, progress=False)
    row = json.loads(out.read_text())
    assert row["label"] == setup["expected"][str(one)] and set(row["probabilities"]) == set(CLASSES)


def test_a_registry_version_or_the_champion(setup):
    reg = setup["tmp"] / "registry"
    registry.register(reg, {"model.onnx": setup["onnx"]}, {})
    registry.promote(reg, "1")
    summary = predict("champion", [setup["images"]], setup["tmp"] / "c.csv", registry=reg, progress=False)
    assert summary.version == "v0001" and summary.images == 8
    assert predict("v1", [setup["images"]], setup["tmp"] / "v.csv", registry=reg, progress=False).version == "v0001"
    assert (setup["tmp"] / "c.csv").read_text() == (setup["tmp"] / "v.csv").read_text()


def test_streaming_reads_at_most_two_batches_ahead(setup):
    """The chain walk -> decode -> predict is lazy: the first predictions come out after two batches were read,
    whatever the number of images (so memory stays flat)."""
    images = make_dataset(setup["tmp"] / "many", classes=("a",), per_class=60, size=16)
    pulled = []

    def counting():
        for p in iter_images([images]):
            pulled.append(p)
            yield p

    model = OnnxClassifier(setup["onnx"], batch_size=8)
    stream = model.predict_files(counting(), workers=2)
    first = next(stream)
    assert first.error is None and len(pulled) <= 2 * 8 + 1
    assert sum(1 for _ in stream) == 59 and len(pulled) == 60


def test_the_command_line(setup):
    tmp = setup["tmp"]
    proc = subprocess.run([FINETUNE, "predict", str(setup["onnx"]), str(setup["images"]), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert {r["path"]: r["label"] for r in rows} == setup["expected"]
    assert "8 predictions (model" in proc.stderr
    (tmp / "broken.png").write_bytes(b"")
    proc = subprocess.run([FINETUNE, "predict", str(setup["onnx"]), str(tmp / "broken.png"), "--out",
                           str(tmp / "x.csv")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error: 1 of 1 files could not be read" in proc.stderr
    assert "cannot decode" in (tmp / "x.csv").read_text()


@pytest.mark.parametrize("args, message", [
    (["model.onnx", "missing-folder"], "no such file or folder: missing-folder"),
    (["missing.onnx", "."], "missing.onnx: no such ONNX file"),
    (["model.onnx", ".", "--out", "p.txt"], "use a .csv, .json or .jsonl file name"),
    (["7", "."], "has no version v0007"),
])
def test_clear_one_line_errors(setup, args, message):
    proc = subprocess.run([FINETUNE, "predict", *args, "--registry", "reg"], capture_output=True, text=True,
                          timeout=300, cwd=setup["tmp"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    with pytest.raises(PredictError, match="no inputs"):
        predict(str(setup["onnx"]), [], None)
