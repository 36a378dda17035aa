"""bench/bench_selection.py: each rule keeps the weights it would choose on one half of validation and is scored on
the other; the recording wrapper sees every epoch's validation probabilities as the trainer scored them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_selection", ROOT / "bench" / "bench_selection.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def onehot(pred, n=2):
    return np.eye(n)[pred] * 0.8 + 0.1


def test_selection_picks_on_one_half_and_is_scored_on_the_other(bench, tmp_path):
    labels = np.array([0] * 20 + [1] * 20)
    right = onehot(labels)  # every image right
    half_right = onehot(np.where(np.arange(40) % 2 == 0, labels, 1 - labels))  # every other image wrong
    probs = np.stack([half_right, right, half_right])  # the middle epoch is the best; the last one is not
    np.savez(tmp_path / "epochs.npz", probs=probs, swa=right, labels=labels, train_s=1.0)
    got = bench.judge(tmp_path / "epochs.npz", halvings=10, seed=0)["rules"]
    for rule in ("best macro_f1", "best accuracy", "lowest loss"):
        assert got[rule]["accuracy"] == pytest.approx(1.0), rule  # found on either half, holds on the other
    assert got["last"]["accuracy"] == pytest.approx(0.5)  # equal halves: the mean is the whole split's score
    assert got["swa3"]["accuracy"] == pytest.approx(1.0)


def test_recording_sees_each_epoch_as_the_trainer_scored_it(bench):
    from tasks import backbones
    from tasks.params import DIHEDRAL_AUGMENT, StageParams, TrainParams
    from tasks.train import stage
    from tasks.train.loop import Data, Split

    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 2
    x = (torch.rand((24, 3, 64, 64), generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
    model, _ = backbones.create("bundled", "efficientnet_lite0", "imagenet")
    model = backbones.with_new_head(model, 2, seed=0)
    p = TrainParams(batch_size=8, image_size=64, cpu_image_size=64, augment=DIHEDRAL_AUGMENT, stages=[
        StageParams(name="frozen", epochs=1, trainable="head", lr=3e-2),
        StageParams(name="unfrozen", epochs=3, trainable=2, lr=1e-3, backbone_lr_mult=0.1)])
    store: dict = {}
    data = Data(["a", "b"], Split(x[:16], y[:16]), Split(x[16:], y[16:]))
    with bench.recording(store):
        kept, best, history = stage.fit(model, data, p, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 0,
                                        torch.device("cpu"))
    assert stage.fit is not None and stage.fit.__module__ == "tasks.train.loop"  # unwrapped again
    assert len(store["probs"]) == len(history) == 4 and store["swa"].shape == (8, 2)
    for probs, h in zip(store["probs"], history):
        assert float((probs.argmax(1) == store["labels"]).mean()) == pytest.approx(h["val_accuracy"])
    assert best["global_epoch"] == 4  # the default keeps the last epoch, and the wrapper did not change that


def test_report_renders_the_selection_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    summary = {"last": {"accuracy": 0.8403, "accuracy_sd": 0.0089, "macro_f1": 0.8113, "macro_f1_sd": 0.0115}}
    (tmp_path / "selection.json").write_text(json.dumps({
        "command": "python bench/bench_selection.py", "date": "2026-12-04 05:00 UTC", "commit": "abc",
        "machine": {"cpu": "Test CPU", "cores": 2}, "halvings": 200, "seeds": {"42": {}, "7": {}}, "summary": summary}))
    text = report.render(tmp_path)
    section = text.split("## Which epoch's weights to keep")[1].split("\n## ")[0]
    assert "(42, 7)" in section and "| last | 84.03% (0.89) | 81.13% (1.15) |" in section
