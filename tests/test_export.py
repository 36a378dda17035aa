"""ONNX export: metadata round-trips, ONNX Runtime alone predicts like PyTorch, broken parity fails;
the INT8 model is kept or dropped by its accuracy bound and works from the file alone; the model card."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper

from tasks import backbones, ingest
from tasks.backbones.timm_models import BUNDLED_SHA256
from tasks.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tasks.export import card, int8, onnx_graph
from tasks.export.int8 import INT8_FILE, ExportError, int8_decision
from tasks.export.stage import parity_logits
from tasks.export.stage import run as export_run
from tasks.files import sha256_file, write_json
from tasks.images import load_for_model
from tasks.inference import OnnxClassifier, read_metadata, session
from tasks.manifest import read_manifest
from tasks.metrics import classification_metrics
from tasks.params import TrainParams
from tasks.preprocess import Preprocessing
from tasks.tensors import DecodedOnDemand, split_arrays

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("export")
    src = make_dataset(root / "src", per_class=12)
    data = root / "data"
    ingest.run("folder", str(src), "binary", 0.5, 0.25, 0.1, [], 0, 2, data / "images", data / "manifest.csv")
    base, meta = backbones.create("bundled", "efficientnet_lite0", "imagenet")
    model = backbones.with_new_head(base, 2, seed=0).eval()
    weights_pre = Preprocessing.from_dict(meta["preprocessing"])
    pre = Preprocessing(size=SIZE, mean=weights_pre.mean, std=weights_pre.std)
    ckpt = root / "model.pt"
    config = {"train": TrainParams().model_dump(mode="json"), "seed": 0}  # what the train stage stores
    best = {"score": 0.9, "stage": "unfrozen", "epoch": 3, "global_epoch": 5, "metric": "macro_f1"}
    save_checkpoint(ckpt, model, Checkpoint(["bright", "dark"], pre, meta, config, best))
    write_json(root / "verdict.json", {"passed": True, "reason": "all gates passed",
                                       "candidate": {"checkpoint_sha256": sha256_file(ckpt)}, "gates": [
        {"metric": "accuracy", "value": 1.0, "bound": 0.85, "passed": True, "reason": "accuracy 1.0000 >= 0.8500"}]})
    write_json(root / "metrics.json", {"accuracy": 1.0, "macro_recall": 1.0, "macro_f1": 1.0, "n": 6,
                                       "ci": {"accuracy": [0.61, 1.0]}})
    return root, data, ckpt


def do_export(root, data, ckpt, out_name="model.onnx", **kw):
    args = dict(opset=18, max_abs_diff=1e-3, min_top1_agreement=0.999)
    args.update(kw)
    return export_run(ckpt, data / "manifest.csv", data / "images", root / "verdict.json", root / "metrics.json",
                      root / out_name, root / "export.json", **args)


@pytest.fixture(scope="module")
def exported(setup):
    """The export with INT8 on and a bound any INT8 model meets, so it is kept."""
    root, data, ckpt = setup
    report = do_export(root, data, ckpt, int8=True, int8_max_accuracy_drop=1.0, int8_calibration_images=5,
                       data_description="folder (raw)")
    return root / "model.onnx", report


def test_export_passes_parity_and_metadata_round_trips(setup, exported):
    path, report = exported
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-3 and report["top1_agreement"] == 1.0
    onnx.checker.check_model(str(path))
    meta = read_metadata(path)
    assert json.loads(meta["classes"]) == ["bright", "dark"]
    pre = json.loads(meta["preprocessing"])
    assert pre["size"] == SIZE and pre["resize"] == "squash"
    assert json.loads(meta["weights_origin"])["sha256"] == BUNDLED_SHA256["efficientnet_lite0"]
    assert "uint8" in meta["input_contract"] and len(meta["data_version"]) == 64


def test_fresh_session_given_only_the_file_predicts_like_pytorch(setup, exported):
    """A client needs only the file: classes, size and input contract all come from its metadata."""
    root, data, ckpt = setup
    path, _ = exported
    sess = session(path)
    meta = read_metadata(path)
    classes, size = json.loads(meta["classes"]), json.loads(meta["preprocessing"])["size"]
    manifest = pd.read_csv(data / "manifest.csv", keep_default_na=False)
    files = [data / "images" / p for p in manifest["path"]]
    batch = np.stack([load_for_model(f, size) for f in files])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    logits, probs = sess.run(["logits", "probabilities"], {"image": batch})
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    model, ck = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = onnx_graph.Deployable(model, ck.preprocessing)(torch.from_numpy(batch))[0]
    assert [classes[i] for i in logits.argmax(1)] == [ck.classes[i] for i in ref.argmax(1)]
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
    model, ck = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = onnx_graph.Deployable(model, ck.preprocessing)(images)[0].numpy()
    good = onnx_graph.parity(ref, int8.run_logits(path, images))
    bad = onnx_graph.parity(ref, int8.run_logits(tmp_path / "broken.onnx", images))
    assert good["max_abs_logit_diff"] < 1e-3 < bad["max_abs_logit_diff"]


def test_streamed_parity_and_int8_scoring_equal_the_whole_split_computation(setup, exported, tmp_path):
    """The export decodes the test split batch by batch (`DecodedOnDemand`), never all of it; every number and
    file must be those of the whole-split computation it replaced (decode the split, then PyTorch and ONNX
    Runtime over the tensor in the same batches): compared exactly, not within a tolerance."""
    root, data, ckpt = setup
    path, report = exported
    classes = ["bright", "dark"]
    manifest = read_manifest(data / "manifest.csv")
    whole, labels = split_arrays(manifest, data / "images", "test", classes, SIZE)
    streamed = DecodedOnDemand([data / "images" / p for p in manifest.loc[manifest["split"] == "test", "path"]],
                               SIZE, workers=2)
    model, ck = load_checkpoint(ckpt)
    module = onnx_graph.Deployable(model, ck.preprocessing).eval()

    def whole_split(batch_size):  # the export's parity computation before it streamed
        with torch.no_grad():
            ref = torch.cat([module(whole[i : i + batch_size])[0] for i in range(0, len(whole), batch_size)])
        return ref.numpy(), OnnxClassifier(path, batch_size=batch_size).run(whole.numpy())[0]

    # batches of 4 over the 6 test images: two batches, the second one short
    assert len(whole) == 6 and len(labels) == 6
    ref, ort = whole_split(4)
    s_ref, s_ort = parity_logits(module, path, streamed, len(classes), batch_size=4)
    assert s_ref.shape == (6, 2) and np.array_equal(s_ref, ref) and np.array_equal(s_ort, ort)
    assert 0 < np.abs(s_ref - s_ort).max() < 1e-3  # a real comparison: the two runtimes differ in the last bits

    # the stage's report (batches of 32): parity and ONNX accuracy equal to the whole-split numbers
    ref, ort = whole_split(32)
    onnx_metrics = classification_metrics(labels.numpy(), ort.argmax(1), classes)
    assert {k: report[k] for k in ("max_abs_logit_diff", "top1_agreement", "n")} == onnx_graph.parity(ref, ort)
    assert [report[f"onnx_{k}"] for k in ("accuracy", "macro_recall", "macro_f1")] == [
        onnx_metrics[k] for k in ("accuracy", "macro_recall", "macro_f1")]

    # INT8 scoring: the kept file on the decoded tensor gives the report's numbers
    int8_path = root / "int8" / INT8_FILE
    scores = int8.score_onnx(int8_path, whole, labels, classes, ort)
    assert scores == int8.score_onnx(int8_path, streamed, labels, classes, ort)
    assert {k: report["int8"][k] for k in scores} == scores and scores["n"] == 6

    # INT8 calibration reads the sampled rows batch by batch: the same batches, and the same quantized graph as
    # calibrating on the decoded rows
    rows = manifest[manifest["split"] == "val"]
    rows = rows.iloc[int8.evenly_spaced(len(rows), 5)]
    decoded, _ = split_arrays(rows, data / "images", "val", classes, SIZE)
    on_demand = DecodedOnDemand([data / "images" / p for p in rows["path"]], SIZE, workers=2)
    assert len(decoded) == report["int8"]["calibration_images"] >= 2
    a, b = int8.UInt8Batches(decoded, batch_size=1), int8.UInt8Batches(on_demand, batch_size=1)
    pairs = [(a.get_next(), b.get_next()) for _ in range(len(decoded) + 1)]
    assert pairs[-1] == (None, None) and all(np.array_equal(x["image"], y["image"]) for x, y in pairs[:-1])
    int8.quantize_int8(path, tmp_path / "whole.int8.onnx", decoded)
    assert onnx.load(str(tmp_path / "whole.int8.onnx")).graph == onnx.load(str(int8_path)).graph


def test_failed_parity_keeps_the_previous_model(setup, exported):
    root, data, ckpt = setup
    path, _ = exported
    before = path.read_bytes()
    with pytest.raises(ExportError, match="parity failed"):
        do_export(root, data, ckpt, max_abs_diff=1e-15)
    assert path.read_bytes() == before
    assert (root / "int8" / INT8_FILE).is_file()  # the INT8 model of the previous export stays too
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_verdict_about_another_checkpoint_exports_nothing(setup, tmp_path):
    root, data, ckpt = setup
    write_json(tmp_path / "verdict.json", {"passed": True, "reason": "all gates passed",
                                           "candidate": {"checkpoint_sha256": "0" * 64}})
    with pytest.raises(ExportError, match="stale verdict"):
        export_run(ckpt, data / "manifest.csv", data / "images", tmp_path / "verdict.json", root / "metrics.json",
                   tmp_path / "model.onnx", tmp_path / "export.json", 18, 1e-3, 0.999)
    assert not (tmp_path / "model.onnx").exists()


def test_failed_gate_exports_nothing(setup, tmp_path):
    root, data, ckpt = setup
    write_json(tmp_path / "verdict.json", {"passed": False, "reason": "gate failed: accuracy 0.5 < 0.9"})
    with pytest.raises(ExportError, match="gate did not pass"):
        export_run(ckpt, data / "manifest.csv", data / "images", tmp_path / "verdict.json", root / "metrics.json",
                   tmp_path / "model.onnx", tmp_path / "export.json", 18, 1e-3, 0.999)
    assert not (tmp_path / "model.onnx").exists()

# ---- INT8 and the model card ----------------------------------------------------------------


@pytest.mark.parametrize("fp32, int8, bound, kept", [
    (0.90, 0.90, 0.0, True), (0.90, 0.92, 0.0, True), (0.90, 0.89, 0.0, False),
    (0.90, 0.89, 0.01, True), (0.90, 0.885, 0.01, False), (0.90, 0.10, 1.0, True),
])
def test_int8_is_kept_only_within_the_accuracy_bound(fp32, int8, bound, kept):
    assert int8_decision(fp32, int8, bound) == (kept, pytest.approx(fp32 - int8))


def test_int8_kept_with_metadata_and_quantization_entry(setup, exported):
    root = setup[0]
    path, report = exported
    int8_path = root / "int8" / INT8_FILE
    entry = report["int8"]
    assert entry["status"] == "kept" and entry["path"] == str(int8_path) and entry["sha256"] == sha256_file(int8_path)
    assert entry["calibration_split"] == "val" and 1 <= entry["calibration_images"] <= 5
    assert entry["accuracy_drop"] == pytest.approx(report["onnx_accuracy"] - entry["accuracy"])
    onnx.checker.check_model(str(int8_path))
    fp32_meta, int8_meta = read_metadata(path), read_metadata(int8_path)
    own = ("quantization", "drift_reference")  # the INT8 model's own: its recipe, its outputs' drift reference
    assert {k: v for k, v in int8_meta.items() if k not in own} == {k: v for k, v in fp32_meta.items() if k not in own}
    q = json.loads(int8_meta["quantization"])
    assert q["format"] == "QDQ" and q["fp32_sha256"] == sha256_file(path) and q["calibration_split"] == "val"
    assert q["test"]["accuracy"] == entry["accuracy"] and q["max_accuracy_drop"] == 1.0
    quantized, total = map(int, q["quantized_ops"]["Conv"].split("/"))
    assert quantized == total - 1  # every Conv but the stem runs in INT8
    model = onnx.load(str(int8_path))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10


def test_fresh_session_given_only_the_int8_file_predicts_valid_probabilities(setup, exported):
    root, data, _ = setup
    int8_path = root / "int8" / INT8_FILE
    sess = session(int8_path)
    meta = read_metadata(int8_path)
    classes, size = json.loads(meta["classes"]), json.loads(meta["preprocessing"])["size"]
    manifest = pd.read_csv(data / "manifest.csv", keep_default_na=False)
    batch = np.stack([load_for_model(data / "images" / p, size) for p in manifest["path"]])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    logits, probs = sess.run(["logits", "probabilities"], {"image": batch})
    assert probs.shape == (len(batch), len(classes)) and np.isfinite(logits).all()
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    fp32_logits = session(root / "model.onnx").run(["logits"], {"image": batch})[0]
    assert np.abs(logits - fp32_logits).max() < 1.0  # quantized, not broken


def test_the_model_outputs_its_pooled_features_third_and_a_drift_reference_of_its_own_lies_beside_it(setup, exported):
    """`embedding` comes after `logits` and `probabilities` (consumers reading by position are unchanged) and holds
    the checkpoint's pooled features; the reference beside the model is the PCA of the training embeddings and the
    validation split's outputs through the file itself; the INT8 model has its own reference beside it."""
    from tasks import drift
    from tasks.tensors import normalise

    root, data, ckpt = setup
    path, report = exported
    assert [o.name for o in session(path).get_outputs()] == ["logits", "probabilities", "embedding"]
    model, ck = load_checkpoint(ckpt)
    manifest = read_manifest(data / "manifest.csv")
    val = manifest[manifest["split"] == "val"]
    batch = DecodedOnDemand([data / "images" / p for p in val["path"]], SIZE)[0:len(val)]
    logits, probs, emb = OnnxClassifier(path).run_with_embedding(batch.numpy())
    with torch.no_grad():
        x = normalise(batch, ck.preprocessing.mean, ck.preprocessing.std)
        pooled = model.eval().forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert emb.shape == (len(val), 1280) and np.abs(emb - pooled).max() < 1e-3

    meta = read_metadata(path)
    entry = json.loads(meta[drift.METADATA_KEY])
    assert entry["file"] == drift.REFERENCE_FILE and entry["sha256"] == sha256_file(root / drift.REFERENCE_FILE)
    assert entry["reference_split"] == "val" and entry["n_reference"] == len(val) and entry["fit_split"] == "train"
    assert report["drift_reference"]["sha256"] == entry["sha256"]
    ref = drift.reference_of(path, meta)
    assert len(ref.basis) == min(32, entry["n_fit"] - 1) == entry["components"]
    assert np.allclose(ref.embedding, np.sort(ref.project(emb), 0), atol=1e-4)  # the validation split's outputs
    assert np.allclose(ref.softmax[:, 0], np.sort(probs[:, 0]), atol=1e-6)
    assert not drift.compare(ref, emb, probs, alpha=0.01).reject  # the reference is no drift from itself

    int8_path = root / "int8" / INT8_FILE
    int8_entry = json.loads(read_metadata(int8_path)[drift.METADATA_KEY])
    assert int8_entry["file"] == drift.INT8_REFERENCE_FILE and int8_entry["precision"] == "int8"
    int8_ref = drift.reference_of(int8_path, read_metadata(int8_path))
    assert np.array_equal(int8_ref.basis, ref.basis) and not np.array_equal(int8_ref.embedding, ref.embedding)
    assert report["int8"]["drift_reference"]["sha256"] == sha256_file(root / "int8" / drift.INT8_REFERENCE_FILE)


def test_int8_outside_the_bound_is_dropped_and_a_stale_one_removed(setup, exported, tmp_path):
    root, data, ckpt = setup
    stale = tmp_path / "int8" / INT8_FILE
    stale.parent.mkdir()
    stale.write_bytes(b"an INT8 model of an older export")
    (stale.parent / "drift_reference.int8.npz").write_bytes(b"its drift reference")  # goes with it
    # a bound no model can meet (accuracy cannot drop by less than -1) forces the drop
    report = export_run(ckpt, data / "manifest.csv", data / "images", root / "verdict.json", root / "metrics.json",
                        tmp_path / "model.onnx", tmp_path / "export.json", 18, 1e-3, 0.999,
                        int8=True, int8_max_accuracy_drop=-1.5, int8_calibration_images=3)
    assert report["passed"] and report["int8"]["status"] == "dropped"
    assert json.loads((tmp_path / "export.json").read_text())["int8"]["status"] == "dropped"  # recorded on disk
    assert "accuracy" in report["int8"] and "path" not in report["int8"]
    assert (tmp_path / "int8").is_dir() and not list((tmp_path / "int8").iterdir())  # nothing, not even a temp file
    assert "**Dropped**" in (tmp_path / "model_card.md").read_text()


def test_model_card_has_the_key_sections(setup, exported):
    root, _, _ = setup
    path, report = exported
    text = (root / "model_card.md").read_text()
    for section in ("## Intended use", "## Data", "## Training recipe", "## Metrics (test split)", "## Gate verdict",
                    "## Export verification", "## INT8 model", "## Input contract", "## Known limits"):
        assert section in text, section
    meta = read_metadata(path)
    assert meta["data_version"] in text and report["sha256"] in text and "`bright`, `dark`" in text
    assert "| frozen | 2 | head |" in text  # the recipe comes from the checkpoint's config
    assert "61.00% – 100.00%" in text  # the CI from the metrics
    assert "Kept: INT8 test accuracy" in text and "uint8 RGB NCHW" in text
    assert "| test | " in text and "all gates passed" in text


def test_model_card_without_int8_says_so(setup):
    _, _, ckpt = setup
    _, info = load_checkpoint(ckpt)
    text = card.render(
        {"input_contract": "x", "data_version": "d", "git_commit": "c", "params_sha256": "p"}, info,
        {"accuracy": 0.9, "n": 6}, {"passed": True, "reason": "ok"},
        {"max_abs_logit_diff": 0.0, "max_abs_diff_bound": 1e-3, "top1_agreement": 1.0, "min_top1_agreement": 0.999,
         "onnx_accuracy": 0.9, "onnx_macro_recall": 0.9, "onnx_macro_f1": 0.9, "n": 6, "sha256": "s", "bytes": 1,
         "opset": 18},
        {"enabled": False, "status": "disabled"}, {"train": {}, "val": {}, "test": {"bright": 3, "dark": 3}},
        "elpv, task binary")
    assert "Not produced (`export.int8: false`)" in text and "CC BY-NC-SA 4.0" in text


def test_training_input_path_onnx_and_inference_module_agree(setup, exported):
    """The same files through the training input path (decode + normalise in PyTorch), the exported ONNX
    graph and the inference module give the same input tensors and the same labels."""
    from tasks.train.augment import prepare

    root, data, ckpt = setup
    path, _ = exported
    model, ck = load_checkpoint(ckpt)
    manifest = read_manifest(data / "manifest.csv")
    files = [data / "images" / p for p in manifest["path"]]
    train_x, _ = split_arrays(manifest.assign(split="all"), data / "images", "all", ck.classes, ck.preprocessing.size)
    clf = OnnxClassifier(path)
    assert clf.classes == ck.classes and clf.preprocessing == ck.preprocessing
    served = np.stack([clf.load(f) for f in files])
    assert np.array_equal(served, train_x.numpy())  # identical uint8 inputs, byte for byte
    pre = ck.preprocessing
    with torch.no_grad():
        torch_logits = model(prepare(train_x, 0, pre.mean, pre.std, torch.device("cpu"))).numpy()
    onnx_logits, onnx_probs = clf.run(served)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    streamed = list(clf.predict_files(files, workers=2))
    assert [p.path for p in streamed] == [str(f) for f in files] and all(p.error is None for p in streamed)
    labels = [ck.classes[i] for i in torch_logits.argmax(1)]
    assert [clf.classes[int(p.probabilities.argmax())] for p in streamed] == labels
    np.testing.assert_allclose(np.stack([p.probabilities for p in streamed]), onnx_probs, atol=1e-6)


def test_inference_reports_unreadable_files_and_wrong_inputs(setup, exported, tmp_path):
    from tasks.inference import ModelError

    root, data, _ = setup
    path, _ = exported
    clf = OnnxClassifier(path, batch_size=2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    good = sorted((data / "images").rglob("*.png"))[:3]
    out = list(clf.predict_files([good[0], bad, *good[1:]]))
    assert [p.error is None for p in out] == [True, False, True, True]
    assert "broken.png" in out[1].error and "cannot decode" in out[1].error
    with pytest.raises(ModelError, match="uint8 of shape"):
        clf.run(np.zeros((1, 3, SIZE + 1, SIZE + 1), np.uint8))
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxClassifier(bad)


def test_the_opset_asked_for_is_the_files_or_refused_naming_the_key(setup, exported, tmp_path):
    """Issue 32: export.opset=17 gave an opset-18 file (and an onnxscript traceback) while the report and the
    model card said 17. Now the default (torchscript) exporter writes 17, the file says so and the report states
    the file's opset; the dynamo exporter, which cannot write 17, is refused up front naming both keys."""
    from tasks.params import ParamsError, load_params
    from tests.test_params import REPO

    with pytest.raises(ParamsError, match=r"export.opset: 17 cannot be written by export.exporter: dynamo"):
        load_params(REPO / "params.yaml", ["export.opset=17", "export.exporter=dynamo"])
    assert load_params(REPO / "params.yaml", ["export.opset=17"]).export.opset == 17
    root, data, ckpt = setup
    report = do_export(root, data, ckpt, out_name="opset17.onnx", opset=17)
    assert report["opset"] == onnx_graph.onnx_opset(root / "opset17.onnx") == 17 and report["exporter"] == "torchscript"
    assert "opset 17" in (root / "model_card.md").read_text()  # the card states the file's opset
    with pytest.raises(ExportError, match="export.opset: 17 cannot be written by the dynamo exporter"):
        do_export(root, data, ckpt, out_name="dynamo17.onnx", opset=17, exporter="dynamo")
    assert not (root / "dynamo17.onnx").exists()
    path, report = exported
    assert report["opset"] == onnx_graph.onnx_opset(path) == 18


def test_both_exporters_give_the_same_model_and_an_op_the_classic_one_lacks_falls_back_to_dynamo(tmp_path, caplog):
    """The classic (torchscript) exporter and the dynamo one write graphs that compute the same logits; a model
    using an op the classic exporter does not know is exported by dynamo, and the log says so."""
    import onnxruntime as ort

    class Tiny(torch.nn.Module):
        def __init__(self, rotate: bool = False):
            super().__init__()
            self.conv, self.rotate = torch.nn.Conv2d(3, 2, 3), rotate

        def forward(self, image):
            x = image.float()
            x = torch.rot90(x, 1, dims=(2, 3)) if self.rotate else x  # aten::rot90: unknown to the classic one
            logits = self.conv(x).mean((2, 3))
            return logits, logits.softmax(-1)

    torch.manual_seed(0)
    model = Tiny().eval()
    x = np.random.default_rng(0).integers(0, 255, (3, 3, 8, 8), dtype=np.uint8)
    outputs = {}
    for exporter in ("torchscript", "dynamo"):
        assert onnx_graph.export_onnx(model, 8, tmp_path / f"{exporter}.onnx", 19, exporter) == exporter
        assert onnx_graph.onnx_opset(tmp_path / f"{exporter}.onnx") == 19  # a later opset is honoured
        outputs[exporter] = ort.InferenceSession(str(tmp_path / f"{exporter}.onnx")).run(None, {"image": x})[0]
    np.testing.assert_allclose(outputs["torchscript"], outputs["dynamo"], atol=1e-5)
    with caplog.at_level("WARNING", logger="tasks.export"):
        used = onnx_graph.export_onnx(Tiny(rotate=True).eval(), 8, tmp_path / "rot.onnx", 18)
    assert used == "dynamo" and "using the dynamo exporter" in caplog.text
    with pytest.raises(ExportError, match="set export.exporter: dynamo with export.opset 18 or more"):
        onnx_graph.export_onnx(Tiny(rotate=True).eval(), 8, tmp_path / "rot17.onnx", 17)


def test_under_test_time_augmentation_the_embedding_is_the_mean_over_the_views_and_onnx_agrees(setup, tmp_path):
    from tasks.tta import with_tta

    model, ck = load_checkpoint(setup[2])
    module = onnx_graph.Deployable(with_tta(model.eval(), "hflip"), ck.preprocessing, embedding=True).eval()
    onnx_graph.export_onnx(module, SIZE, tmp_path / "tta.onnx", 18)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 3, SIZE, SIZE), dtype=np.uint8))
    with torch.no_grad():
        logits, probs, emb = (t.numpy() for t in module(x))
        plain = onnx_graph.Deployable(model, ck.preprocessing, embedding=True).eval()
        one, mirrored = plain(x)[2].numpy(), plain(torch.flip(x, dims=[3]))[2].numpy()
        expected_logits = with_tta(model, "hflip")(onnx_graph.normalise(x, ck.preprocessing.mean, ck.preprocessing.std))
    assert np.abs(emb - (one + mirrored) / 2).max() < 1e-4
    assert np.abs(logits - expected_logits.numpy()).max() < 1e-4
    ort = session(tmp_path / "tta.onnx").run(None, {"image": x.numpy()})
    assert [np.abs(a - b).max() < 1e-3 for a, b in zip(ort, (logits, probs, emb))] == [True] * 3
