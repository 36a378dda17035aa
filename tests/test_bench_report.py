"""bench/report.py renders docs/benchmarks.md from the benchmark JSONs: numbers with their command and machine,
'not measured' (with the command to measure it) for every JSON that is missing, the GPU section included."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MACHINE = {"cpu": "Test CPU 9000", "cores": 2, "threads": 1, "loadavg_before": [0.5, 0.5, 0.5],
           "loadavg_after": [1.5, 1.0, 0.7]}


def peers_json() -> dict:
    ok = {"status": "ok", "wall_s": 120.0, "images_per_s": 42.5, "recipe": "r", "epochs": [],
          "test": {"accuracy": 0.8125, "balanced_accuracy": 0.8, "macro_recall": 0.8, "macro_f1": 0.7777, "n": 32,
                   "ci": {"accuracy": [0.7, 0.9]}}}
    return {"command": "bench/bench_peers.py --size 96", "date": "2026-11-29 10:00 UTC", "commit": "abc123",
            "machine": MACHINE, "versions": {"torch": "2.14.1", "fastai": "2.8.12"},
            "setup": {"counts": {"train": 64, "val": 32, "test": 32}, "size": 96, "batch_size": 16,
                      "frozen_epochs": 1, "unfrozen_epochs": 2, "threads": 1, "augment": "dihedral"},
            "rows": [{**ok, "run": "ours", "label": "ours (pipeline)",
                      "vs_ours": {"images_per_s": 1.0, "wall": 1.0, "accuracy_pt": 0.0, "macro_f1_pt": 0.0}},
                     {**ok, "run": "plain", "label": "plain loop", "images_per_s": 21.25, "wall_s": 240.0,
                      "vs_ours": {"images_per_s": 0.5, "wall": 2.0, "accuracy_pt": -3.0, "macro_f1_pt": -1.0}},
                     {"run": "fastai", "label": "fastai fine_tune", "status": "not installed: make bench-peers-env"}]}


def test_missing_json_says_not_measured_with_its_command(report, tmp_path):
    text = report.render(tmp_path)
    for name, command in [("peers.json", "bench/bench_peers.py"), ("elpv.json", "bench/bench_elpv.py"),
                          ("onnx.json", "bench/bench_onnx.py"), ("bench_train.json", "bench/bench_train.py"),
                          ("serving.json", "bench/bench_serving.py")]:
        assert f"not measured: `.venv/bin/python {command}` writes `bench/results/{name}`" in text
    gpu = text.split("## GPU", 1)[1]
    assert "not measured (no GPU lent)" in gpu


def test_numbers_come_with_their_command_date_commit_and_machine(report, tmp_path):
    (tmp_path / "peers.json").write_text(json.dumps(peers_json()))
    text = report.render(tmp_path)
    section = text.split("## Ours vs peers", 1)[1].split("\n## ", 1)[0]
    assert "Command: `.venv/bin/python bench/bench_peers.py --size 96`" in section
    assert "2026-11-29 10:00 UTC" in section and "abc123" in section
    assert "Test CPU 9000, 2 cores, 1 threads, load 0.5 before / 1.5 after" in section
    assert "| plain loop | 240.0 | 21.2 | 81.25% (70.0-90.0) | 80.00% | 0.7777 | 2.00x | -3.00 pt |" in section
    assert "| fastai fine_tune | not installed: make bench-peers-env |" in section
    assert "not measured" not in section
    # the other sections are still missing
    assert "not measured: `.venv/bin/python bench/bench_elpv.py`" in text


def test_old_json_without_command_uses_the_default_and_the_file_time(report, tmp_path):
    (tmp_path / "recipes.json").write_text(json.dumps({"params": "params.yaml", "rows": [
        {"recipe": "default", "stages": "frozen:headx2 + unfrozen:3x8", "accuracy": 0.9, "accuracy_ci": [0.88, 0.92],
         "macro_recall": 0.85, "macro_f1": 0.86, "train_s": 700.0}]}))
    section = report.render(tmp_path).split("## Staged vs single-stage recipes", 1)[1].split("\n## ", 1)[0]
    assert "bench/bench_recipes.py (not recorded in the JSON: the script's default)" in section
    assert "(file time)" in section and "| default | frozen:headx2 + unfrozen:3x8 | 90.00% (88.0-92.0) |" in section


def test_gpu_json_fills_the_gpu_section_and_write_is_atomic(report, tmp_path):
    (tmp_path / "gpu_check.json").write_text(json.dumps({"info": {"gpu": "NVIDIA H200"}, "results": [
        {"check": "fp32", "images_per_s": 1234.5}]}))
    out = tmp_path / "docs" / "benchmarks.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    gpu = out.read_text().split("## GPU", 1)[1]
    assert "not measured" not in gpu and "1234.5" in gpu and "NVIDIA H200" in gpu
    assert [p.name for p in out.parent.iterdir()] == ["benchmarks.md"]  # no temp file left behind


def test_unreadable_json_is_named_not_a_crash(report, tmp_path):
    (tmp_path / "onnx.json").write_text("{not json")
    assert "`bench/results/onnx.json` could not be rendered" in report.render(tmp_path)


def test_tta_section_shows_each_mode_with_its_cost(report, tmp_path):
    rows = [{"split": "test", "tta": mode, "variants": k, "n": 654, "accuracy": acc, "accuracy_ci": [acc - 0.02, acc + 0.02],
             "macro_recall": 0.8, "macro_f1": 0.8, "seconds": 1.0, "ms_per_image": ms}
            for mode, k, acc, ms in (("none", 1, 0.867, 21.5), ("dihedral", 8, 0.8853, 160.25))]
    (tmp_path / "tta.json").write_text(json.dumps({"command": ".venv/bin/python bench/bench_tta.py", "machine": MACHINE,
                                                   "date": "2026-11-29 14:00 UTC", "commit": "abc", "rows": rows,
                                                   "checkpoint": "models/model.pt", "image_size": 224}))
    text = report.render(tmp_path)
    section = text.split("## Test-time augmentation")[1].split("\n## ")[0]
    assert "Command: `.venv/bin/python bench/bench_tta.py`" in section
    assert "| test | dihedral | 8 | 88.53% (86.5-90.5) |" in section and "| 160.2 |" in section
    assert "| test | none | 1 | 86.70% (84.7-88.7) |" in section


def test_data_stages_section_shows_each_stage_per_size(report, tmp_path):
    results = [{"images": n, "stages": {"ingest": {"wall_s": w, "images_per_s": n / w, "peak_rss_mb": rss},
                                        "validate": {"wall_s": 2.0, "images_per_s": n / 2, "peak_rss_mb": 300.5}}}
               for n, w, rss in ((2000, 4.0, 250.0), (100_000, 50.0, 420.0))]
    (tmp_path / "scale_data.json").write_text(json.dumps({"results": results, "machine": MACHINE}))
    text = report.render(tmp_path)
    section = text.split("## Ingest and validation memory vs data size")[1].split("\n## ")[0]
    assert "| 100,000 | ingest | 50.0 | 2000.0 | 420.0 |" in section and "| 2,000 | validate | 2.0 | 1000.0 | 300.5 |" in section
    assert "## Training memory vs data size\n\nnot measured" in text  # the training numbers are a separate file


def test_serving_section_shows_the_int8_rows_when_measured(report):
    level = {"requests_per_s": 247.0, "p50_ms": 32.1, "p99_ms": 44.3, "errors": 0}
    d = {"server": {"server defaults": {"binary": {"8": {**level, "requests_per_s": 156.8, "p50_ms": 50.9,
                                                          "p99_ms": 64.2}}}},
         "ort_reference": {"images_per_s": 180.8}, "targets": {"p99_met": False, "int8_p99_met": True},
         "int8": {"ort_reference": {"images_per_s": 331.4}, "server": {"server defaults": {"binary": {"8": level}}}}}
    lines = report.serving(d)
    assert "| server defaults | 8 | 156.8 | 50.9 | 64.2 | 0 |" in lines
    assert "| INT8 model (`--precision int8`), server defaults | 8 | 247.0 | 32.1 | 44.3 | 0 |" in lines
    assert "(INT8: 331.4)" in lines[-1] and '"int8_p99_met": true' in lines[-1]
    del d["int8"]
    assert not any("INT8" in line for line in report.serving(d))


def test_stamp_names_head_dirty_or_no_commit_and_the_utc_date(tmp_path):
    """The stamp each bench script writes (bench/common.py `stamp`): HEAD, '+dirty' once a tracked file changes,
    None outside git."""
    import subprocess

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert common.stamp(tmp_path)["commit"] is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    stamped = common.stamp(tmp_path)
    assert stamped["commit"] == head and stamped["date"].endswith(" UTC")
    (tmp_path / "f.txt").write_text("b")
    assert common.stamp(tmp_path)["commit"] == head + "+dirty"


def test_elpv_scores_errors_per_defect_probability_and_the_report_shows_them(report, monkeypatch):
    """bench_elpv splits test accuracy by the experts' defect probability (how many errors sit on cells they were
    unsure of); docs/benchmarks.md shows that table."""
    import pandas as pd

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports its neighbour `common`
    spec = importlib.util.spec_from_file_location("bench_elpv", ROOT / "bench" / "bench_elpv.py")
    elpv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(elpv)
    classes = ["defective", "functional"]
    cells = [("a.png", "functional", "functional", "0.0", "mono"), ("b.png", "functional", "defective", "0.0", "poly"),
             ("c.png", "functional", "functional", "0.3333333333", "mono"),
             ("d.png", "defective", "functional", "0.6666666667", "poly"),
             ("e.png", "defective", "defective", "1.0", "mono"), ("f.png", "defective", "defective", "1.0", "poly")]
    preds = pd.DataFrame([{"path": c[0], "actual": c[1], "predicted": c[2],
                           "p_defective": 0.9 if c[2] == "defective" else 0.1,
                           "p_functional": 0.1 if c[2] == "defective" else 0.9} for c in cells])
    manifest = pd.DataFrame([{"path": c[0], "probability": c[3], "type": c[4]} for c in cells])
    per = elpv.score(preds, manifest, classes)["per_probability"]
    assert list(per) == ["0.0000", "0.3333", "0.6667", "1.0000"]
    assert {k: (v["n"], v["errors"], v["accuracy"]) for k, v in per.items()} == {
        "0.0000": (2, 1, 0.5), "0.3333": (1, 0, 1.0), "0.6667": (1, 1, 0.0), "1.0000": (2, 0, 1.0)}
    row = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_recall": 0.5, "macro_f1": 0.5, "n": 6, "ci": {}}
    d = {"results": {"binary": {"metrics": {**row, "per_type": {}, "per_class_recall": {"defective": 0.5},
                                            "per_probability": per},
                                "size": {"parameters": 10, "onnx_bytes": None}, "train_wall_s": 1.0,
                                "image_size": 224}}}
    lines = report.elpv(d)
    assert "| binary | 0.6667 | 1 | 1 | 0.00% (0.0-0.0) |" in lines
    assert "| binary | 0.0000 | 2 | 1 | 50.00% " in "\n".join(lines)
