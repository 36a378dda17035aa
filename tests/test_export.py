"""ONNX export: metadata round-trips, ONNX Runtime alone predicts like PyTorch, broken parity fails."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper

from tasks import export, ingest, models, train
from tasks.data import split_arrays
from tasks.images import load_for_model
from tasks.io import write_json

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("export")
    src = make_dataset(root / "src", per_class=12)
    data = root / "data"
    ingest.run("folder", str(src), "binary", 0.5, 0.25, 0.1, [], 0, 2, data / "images", data / "manifest.csv")
    base, meta = models.create("bundled", "efficientnet_lite0", "imagenet")
    model = models.with_new_head(base, 2, seed=0).eval()
    pre = models.Preprocessing(size=SIZE, mean=tuple(meta["mean"]), std=tuple(meta["std"])).to_dict()
    ckpt = root / "model.pt"
    train.save_checkpoint(ckpt, model, ["bright", "dark"], meta, pre, {}, {})
    write_json(root / "verdict.json", {"passed": True, "reason": "all gates passed", "gates": []})
    write_json(root / "metrics.json", {"accuracy": 1.0, "macro_recall": 1.0, "macro_f1": 1.0, "n": 6})
    (root / "params.yaml").write_text("seed: 0\n")
    return root, data, ckpt


def do_export(root, data, ckpt, out_name="model.onnx", **kw):
    args = dict(opset=18, max_abs_diff=1e-3, min_top1_agreement=0.999)
    args.update(kw)
    return export.run(ckpt, data / "manifest.csv", data / "images", root / "verdict.json", root / "metrics.json",
                      root / "params.yaml", root / out_name, root / "export.json", **args)


@pytest.fixture(scope="module")
def exported(setup):
    root, data, ckpt = setup
    report = do_export(root, data, ckpt)
    return root / "model.onnx", report


def test_export_passes_parity_and_metadata_round_trips(setup, exported):
    path, report = exported
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-3 and report["top1_agreement"] == 1.0
    onnx.checker.check_model(str(path))
    meta = export.read_metadata(path)
    assert json.loads(meta["classes"]) == ["bright", "dark"]
    pre = json.loads(meta["preprocessing"])
    assert pre["size"] == SIZE and pre["resize"] == "squash"
    assert json.loads(meta["weights_origin"])["sha256"] == models.BUNDLED_SHA256["efficientnet_lite0"]
    assert "uint8" in meta["input_contract"] and len(meta["data_version"]) == 64


def test_fresh_session_given_only_the_file_predicts_like_pytorch(setup, exported):
    """A client needs only the file: classes, size and input contract all come from its metadata."""
    root, data, ckpt = setup
    path, _ = exported
    session = export.ort_session(path)
    meta = export.read_metadata(path)
    classes, size = json.loads(meta["classes"]), json.loads(meta["preprocessing"])["size"]
    manifest = pd.read_csv(data / "manifest.csv", keep_default_na=False)
    files = [data / "images" / p for p in manifest["path"]]
    batch = np.stack([load_for_model(f, size) for f in files])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    logits, probs = session.run(None, {"image": batch})
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    model, ck = train.load_checkpoint(ckpt)
    with torch.no_grad():
        ref = export.Deployable(model, ck["preprocessing"]["mean"], ck["preprocessing"]["std"])(torch.from_numpy(batch))[0]
    assert [classes[i] for i in logits.argmax(1)] == [ck["classes"][i] for i in ref.argmax(1)]
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-3)


def test_perturbed_weight_fails_parity(setup, exported, tmp_path):
    root, data, ckpt = setup
    path, _ = exported
    broken = onnx.load(str(path))
    init = max(broken.graph.initializer, key=lambda t: np.prod(t.dims) if len(t.dims) == 2 else 0)  # the classifier
    arr = numpy_helper.to_array(init).copy()
    arr += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    manifest = pd.read_csv(data / "manifest.csv", keep_default_na=False)
    images, _ = split_arrays(manifest, data / "images", "test", ["bright", "dark"], SIZE)
    model, ck = train.load_checkpoint(ckpt)
    with torch.no_grad():
        ref = export.Deployable(model, ck["preprocessing"]["mean"], ck["preprocessing"]["std"])(images)[0].numpy()
    good = export.parity(ref, export.run_ort(export.ort_session(path), images))
    bad = export.parity(ref, export.run_ort(export.ort_session(tmp_path / "broken.onnx"), images))
    assert good["max_abs_logit_diff"] < 1e-3 < bad["max_abs_logit_diff"]


def test_failed_parity_keeps_the_previous_model(setup, exported):
    root, data, ckpt = setup
    path, _ = exported
    before = path.read_bytes()
    with pytest.raises(export.ExportError, match="parity failed"):
        do_export(root, data, ckpt, max_abs_diff=1e-15)
    assert path.read_bytes() == before
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_failed_gate_exports_nothing(setup, tmp_path):
    root, data, ckpt = setup
    write_json(tmp_path / "verdict.json", {"passed": False, "reason": "gate failed: accuracy 0.5 < 0.9"})
    with pytest.raises(export.ExportError, match="gate did not pass"):
        export.run(ckpt, data / "manifest.csv", data / "images", tmp_path / "verdict.json", root / "metrics.json",
                   root / "params.yaml", tmp_path / "model.onnx", tmp_path / "export.json", 18, 1e-3, 0.999)
    assert not (tmp_path / "model.onnx").exists()
