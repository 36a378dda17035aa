"""The promote stage's infra check: the candidate is served by the real server in a subprocess and must give the
evaluation's labels for real test images before it is registered; one that cannot be served is never promoted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tasks import registry
from tasks.files import sha256_file
from tasks.images import load_for_model
from tasks.promote import PromotionRefused, run
from tasks.promote.serving_check import ServingCheckFailed, pick_warmup
from tests.conftest import REPO, brightness_onnx, make_dataset

CLASSES = ["bright", "dark"]


@pytest.fixture
def stage(tmp_path):
    """A test split, the evaluation's predictions (the brightness rule), a verdict that passed, a registry whose
    champion v0001 is another model."""
    images = make_dataset(tmp_path / "images", classes=("dim", "lit"), per_class=5, size=40)
    rows = []
    for p in sorted(images.rglob("*.png")):
        bright = load_for_model(p, 32).mean() > 128
        rows.append({"path": p.relative_to(images).as_posix(), "actual": p.parent.name,
                     "predicted": "bright" if bright else "dark", "p_bright": 0.9 if bright else 0.2,
                     "p_dark": 0.1 if bright else 0.8})
    pd.DataFrame(rows).to_csv(tmp_path / "predictions.csv", index=False)
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 1.0, "n": len(rows)}))
    reg = tmp_path / "registry"
    registry.register(reg, {"model.onnx": brightness_onnx(tmp_path / "champion.onnx", CLASSES, threshold=127.0)}, {})
    registry.promote(reg, "1")
    candidate = {"checkpoint_sha256": "c" * 64, "predictions_sha256": sha256_file(tmp_path / "predictions.csv")}
    (tmp_path / "verdict.json").write_text(json.dumps({
        "passed": True, "reason": "all gates passed", "candidate": candidate,
        "champion": {"status": "compared", "version": "v0001"}}))
    return {"tmp": tmp_path, "images": images, "registry": reg, "candidate": candidate}


def candidate_onnx(s: dict, path: Path, classes=CLASSES, **kwargs) -> Path:
    """The brightness model exported as the candidate the verdict judged (its metadata names the checkpoint)."""
    return brightness_onnx(path, classes, extra={"candidate": json.dumps(s["candidate"])}, **kwargs)


def promote(s: dict, onnx: Path, **kwargs) -> dict:
    t = s["tmp"]
    return run(onnx, t / "int8", t / "card.md", t / "verdict.json", t / "metrics.json", t / "predictions.csv",
               s["registry"], t / "promote.json", images_dir=s["images"], **kwargs)


def test_a_candidate_that_serves_the_evaluations_labels_is_promoted(stage):
    report = promote(stage, candidate_onnx(stage, stage["tmp"] / "model.onnx"), infra_images=6)
    assert report["promoted"] and report["champion"] == "v0002" and report["previous_champion"] == "v0001"
    infra = report["infra_check"]
    assert infra["passed"] and infra["server_exit_code"] == 0 and len(infra["checked"]) == 6
    assert {c["expected"] for c in infra["checked"]} == {"bright", "dark"}  # both classes are checked
    assert all(c["expected"] == c["upload"] == c["infer"] for c in infra["checked"])
    assert json.loads((stage["tmp"] / "promote.json").read_text())["infra_check"]["passed"]


def test_a_corrupted_candidate_is_never_promoted_and_the_champion_stays(stage):
    onnx = candidate_onnx(stage, stage["tmp"] / "model.onnx")
    data = onnx.read_bytes()
    onnx.write_bytes(data[: len(data) // 2])  # a truncated file: what a failed copy leaves
    with pytest.raises(Exception, match=r"not a loadable ONNX model"):
        promote(stage, onnx)
    assert registry.read_champion(stage["registry"])["version"] == "v0001"
    assert registry.list_versions(stage["registry"]) == ["v0001"]


def test_a_candidate_that_loads_but_cannot_be_served_is_refused_by_the_infra_check(stage):
    """Its file and metadata read fine, but the server's warm-up batch gives NaN: the server refuses to start."""
    onnx = candidate_onnx(stage, stage["tmp"] / "model.onnx", threshold=float("nan"))
    with pytest.raises(PromotionRefused, match=r"cannot be served \(the server exited with code 1 before it was ready: "
                                               r".*warm-up outputs are not finite probabilities\); nothing is "
                                               r"registered and the champion stays v0001"):
        promote(stage, onnx)
    assert registry.read_champion(stage["registry"])["version"] == "v0001"
    assert registry.list_versions(stage["registry"]) == ["v0001"]
    report = json.loads((stage["tmp"] / "promote.json").read_text())
    assert report["promoted"] is False and report["registered"] is False and report["champion"] == "v0001"
    assert "warm-up outputs are not finite" in report["infra_check"]["reason"]
    assert report["infra_check"]["server_log_tail"]  # the server's own last words are kept


def test_a_candidate_whose_served_labels_differ_from_the_evaluation_is_refused(stage):
    always_bright = candidate_onnx(stage, stage["tmp"] / "model.onnx", threshold=1.0)
    with pytest.raises(PromotionRefused, match=r"got other labels from the server than the evaluation predicted, e\.g\. "
                                               r".*: evaluation 'dark', upload endpoint 'bright', v2 infer 'bright'"):
        promote(stage, always_bright)
    assert registry.read_champion(stage["registry"])["version"] == "v0001"
    assert registry.list_versions(stage["registry"]) == ["v0001"]


def test_warmup_images_are_confident_and_cover_each_predicted_class(stage):
    picked = pick_warmup(stage["tmp"] / "predictions.csv", stage["images"], 3)
    assert len(picked) == 3 and {label for _, label in picked} == {"bright", "dark"}
    assert all(p.is_file() for p, _ in picked)
    with pytest.raises(ServingCheckFailed, match="test images named in .* are missing"):
        pick_warmup(stage["tmp"] / "predictions.csv", stage["tmp"] / "elsewhere", 3)


def test_the_stage_command_takes_the_images_and_infra_options():
    out = subprocess.run([sys.executable, "-m", "tasks.promote", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120).stdout
    assert "--images" in out and "--infra-images" in out and "--infra-timeout" in out
