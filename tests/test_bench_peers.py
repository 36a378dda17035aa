"""bench/bench_peers.py's own path (ours + the plain loop) on a tiny generated folder: both runs start from the same
module (the plain loop rebuilds it and must reproduce the project's logits), are scored by the project's metrics,
and peers.json carries the ratios to ours, the command and the machine. fastai/Lightning need bench/.venv-peers
and are not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def tiny_folder(root: Path) -> Path:
    """32 px grey images, two classes (class 'b' has a dark band), 8 train / 4 val / 4 test per class."""
    rng = np.random.default_rng(0)
    rows = []
    for label in ("a", "b"):
        for i in range(16):
            x = (120 + 20 * rng.standard_normal((32, 32))).clip(0, 255)
            if label == "b":
                x[12:16, :] -= 80
            path = f"{label}/{i:02d}.png"
            (root / "images" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.clip(0, 255).astype(np.uint8), "L").save(root / "images" / path)
            rows.append({"path": path, "label": label, "split": "train" if i < 8 else "val" if i < 12 else "test"})
    pd.DataFrame(rows).to_csv(root / "validated.csv", index=False)
    return root


@pytest.mark.timeout(600)
def test_ours_and_plain_loop_on_a_tiny_folder(tmp_path, monkeypatch):
    from tasks import fetch_model

    data = tiny_folder(tmp_path)
    fetch_model.run("bundled", "efficientnet_lite0", "imagenet", None, tmp_path / "base")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "peers.json"
    argv = ["--runs", "ours", "plain", "--size", "32", "--frozen-epochs", "1", "--unfrozen-epochs", "0",
            "--threads", "1", "--manifest", str(data / "validated.csv"), "--images", str(data / "images"),
            "--base", str(tmp_path / "base"), "--work", str(tmp_path / "work"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench_peers.py", *argv])
    module.main(argv)
    result = json.loads(out.read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "plain"} and all(r["status"] == "ok" for r in rows.values())
    assert result["setup"]["counts"] == {"train": 16, "val": 8, "test": 8}
    assert rows["plain"]["setup"]["reference_max_abs_diff"] <= 1e-4  # the same starting module
    for r in rows.values():
        assert r["test"]["n"] == 8 and 0 <= r["test"]["accuracy"] <= 1 and r["images_per_s"] > 0
    assert rows["ours"]["vs_ours"]["images_per_s"] == 1.0
    assert rows["plain"]["vs_ours"]["wall"] == pytest.approx(rows["plain"]["wall_s"] / rows["ours"]["wall_s"], rel=1e-2)
    assert result["command"].startswith("bench/bench_peers.py --runs ours plain")
    assert result["machine"]["threads"] == 1 and "loadavg_before" in result["machine"]
