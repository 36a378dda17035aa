"""Drift monitoring's statistics and their use: the KS numbers against scipy, known shifted vs unshifted samples,
false-alarm control over repeated tests, the window and alarm rule, the reference file and its checks, and the
served model's monitor (service level, no HTTP; a toy ONNX model with this pipeline's three outputs)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from scipy.stats import ks_2samp

from deploy.batching import Runner
from deploy.monitor import Monitor
from deploy.observability import Metrics
from deploy.service import Service, Source
from deploy.settings import DriftSettings
from tasks import drift, registry
from tasks.files import sha256_file
from tasks.inference import OnnxClassifier

CLASSES = ["bright", "dark"]
SIZE = 16


# ---- a toy model with the three outputs, and its reference ----------------------------------------------------


def stats_onnx(path, size: int = SIZE, threshold: float = 128.0, metadata: dict | None = None):
    """uint8 NCHW in; logits/probabilities ('bright' when the mean is above `threshold`) and a 6-number embedding:
    each channel's mean and mean square (scaled), which sees brightness and noise."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["u"]),
        helper.make_node("ReduceMean", ["u", "hw"], ["m"], keepdims=0),
        helper.make_node("Mul", ["u", "u"], ["u2"]),
        helper.make_node("ReduceMean", ["u2", "hw"], ["q"], keepdims=0),
        helper.make_node("Concat", ["m", "q"], ["embedding"], axis=1),
        helper.make_node("ReduceMean", ["x", "chw"], ["g"], keepdims=0),
        helper.make_node("Reshape", ["g", "col"], ["g2"]),
        helper.make_node("Sub", ["g2", "t"], ["d"]),
        helper.make_node("Mul", ["d", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
             helper.make_tensor("hw", TensorProto.INT64, [2], [2, 3]),
             helper.make_tensor("chw", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("col", TensorProto.INT64, [2], [-1, 1]),
             helper.make_tensor("t", TensorProto.FLOAT, [], [threshold]),
             helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [0.05, -0.05])]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", k])
           for n, k in (("logits", 2), ("probabilities", 2), ("embedding", 6))]
    graph = helper.make_graph(nodes, "stats", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                                              ["b", 3, size, size])], out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in {"classes": json.dumps(CLASSES), "preprocessing": json.dumps({"size": size}),
                       **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def images(n: int, seed: int, noise: float = 25.0, scale: float = 1.0, size: int = SIZE) -> np.ndarray:
    """Half dark (50), half bright (200) noisy grey squares, like tests/conftest.py's make_dataset; `scale` and `noise`
    plant a shift."""
    rng = np.random.default_rng(seed)
    levels = np.where(np.arange(n) % 2 == 0, 50.0, 200.0)[:, None, None, None] * scale
    return np.clip(rng.normal(levels, noise, (n, 1, size, size)), 0, 255).astype(np.uint8).repeat(3, axis=1)


def monitored_model(folder, n_fit: int = 200, n_ref: int = 120):
    """A toy model with its drift reference beside it, named in its metadata (what the export stage writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    plain = stats_onnx(folder / "plain.onnx")
    clf = OnnxClassifier(plain)
    fit = clf.run_with_embedding(images(n_fit, seed=1))[2]
    _, probs, emb = clf.run_with_embedding(images(n_ref, seed=2))
    ref = drift.Reference.build(fit, emb, probs, 32, {"fit_split": "train", "n_fit": n_fit,
                                                      "reference_split": "val", "precision": "fp32"})
    sha = drift.save_reference(folder / drift.REFERENCE_FILE, ref)
    entry = {"file": drift.REFERENCE_FILE, "sha256": sha}
    plain.unlink()
    return stats_onnx(folder / "model.onnx", metadata={drift.METADATA_KEY: json.dumps(entry)})


# ---- the statistics ---------------------------------------------------------------------------------------------


def test_ks_statistics_are_scipys_and_the_pvalue_is_close_to_the_exact_one():
    rng = np.random.default_rng(0)
    for n, m in ((263, 100), (12, 20), (500, 100)):
        ref = rng.normal(size=(n, 6))
        sample = rng.normal(np.linspace(0, 0.9, 6), 1.0, (m, 6))
        d = drift.ks_statistics(np.sort(ref, 0), sample)
        for j in range(6):
            exact = ks_2samp(ref[:, j], sample[:, j], method="exact")
            assert d[j] == pytest.approx(exact.statistic, abs=1e-12)
            if 1e-5 < exact.pvalue < 0.2:
                assert drift.ks_pvalue(d[j], n, m) == pytest.approx(exact.pvalue, rel=0.2), (n, m, j)


def test_pca_finds_the_directions_that_vary_and_no_more():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 40)) + 5.0  # three directions of variance in 40 dimensions
    mean, basis = drift.fit_pca(x, 32)
    assert basis.shape == (3, 40) and np.allclose(basis @ basis.T, np.eye(3), atol=1e-4)
    assert np.allclose(mean, x.mean(0), atol=1e-4)
    centred = x - x.mean(0)
    assert np.linalg.norm(centred - centred @ basis.T @ basis) < 1e-3 * np.linalg.norm(centred)  # nothing lost
    with pytest.raises(drift.DriftError, match="do not vary"):
        drift.fit_pca(np.ones((10, 4)), 2)


def synthetic(n: int, seed: int, shift: float = 0.0, confident: float = 0.0):
    """Embeddings with 4 directions of variance in 64 dimensions (+ `shift` along the first) and two-class
    probabilities (`confident` moves them towards 1)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(4, 64))
    z = rng.normal(size=(n, 4))
    z[:, 0] += shift
    p1 = np.clip(rng.beta(2, 2, n) + confident, 0, 1)
    return (z @ mixing).astype(np.float32), np.stack([p1, 1 - p1], 1).astype(np.float32)


@pytest.fixture(scope="module")
def reference() -> drift.Reference:
    fit = synthetic(1000, seed=1)[0]
    return drift.Reference.build(fit, *synthetic(300, seed=2), components=32)


def test_a_shifted_sample_is_detected_by_the_view_that_moved_and_an_unshifted_one_is_not(reference):
    same = drift.compare(reference, *synthetic(100, seed=3), alpha=0.01)
    assert not same.reject and same.pvalues["combined"] > 0.01 and same.n == 100
    moved = drift.compare(reference, *synthetic(100, seed=4, shift=1.0), alpha=0.01)
    assert moved.reject and moved.pvalues["embedding"] < 1e-6 and moved.pvalues["softmax"] > 1e-3
    confident = drift.compare(reference, *synthetic(100, seed=5, confident=0.3), alpha=0.01)
    assert confident.reject and confident.pvalues["softmax"] < 1e-6 and confident.pvalues["embedding"] > 1e-3
    # Bonferroni: the combined p-value is twice the smaller detector's (capped at 1)
    assert moved.pvalues["combined"] == pytest.approx(min(1.0, 2 * moved.pvalues["embedding"]))
    assert 0 <= moved.seconds < 1


def test_false_alarms_stay_under_alpha_per_test_and_the_alarm_rule_makes_them_rare_in_a_stream(reference):
    """Per test: at most alpha of independent clean windows reject (Bonferroni is conservative). In a stream of
    overlapping windows tested every 20 rows, k rejections in a row are needed for an alarm."""
    rejections = sum(drift.compare(reference, *synthetic(100, seed=1000 + i), alpha=0.05).reject for i in range(400))
    assert rejections / 400 <= 0.05 + 0.03  # binomial slack: sd of a 5% rate over 400 windows is 1.1 points
    stream = drift.Stream(reference, window=100, every=20, alpha=0.05, consecutive=3)
    emb, probs = synthetic(20_000, seed=7)
    rejected = alarms = 0
    for start in range(0, len(emb), 10):
        if stream.add(emb[start:start + 10], probs[start:start + 10]):
            outcome = stream.test()
            rejected += outcome.result.reject
            alarms += outcome.alarm
    assert stream.tests == (20_000 - 100) // 20 + 1 and alarms <= max(1, rejected // 3) and alarms == stream.alarms


def test_the_window_keeps_the_last_rows_in_order_and_the_alarm_needs_k_in_a_row_and_clears(reference):
    window = drift.Window(5, keep_images=True)
    window.append(np.arange(8.0)[:, None], np.arange(8.0)[:, None], np.arange(8)[:, None])
    window.append(np.array([[8.0]]), np.array([[8.0]]), np.array([[8]]))
    emb, probs, imgs = window.snapshot()
    assert emb[:, 0].tolist() == [4, 5, 6, 7, 8] and [int(i[0]) for i in imgs] == [4, 5, 6, 7, 8] and len(window) == 5
    stream = drift.Stream(reference, window=50, every=25, alpha=0.01, consecutive=2)
    clean, shifted = synthetic(400, seed=11), synthetic(400, seed=12, shift=1.5)
    due = [stream.add(clean[0][i:i + 25], clean[1][i:i + 25]) for i in range(0, 100, 25)]
    assert due == [False, True, True, True]  # first test once the window is full, then every 25 rows
    events = []
    for source in (shifted, clean):
        for i in range(0, 150, 25):
            if stream.add(source[0][i:i + 25], source[1][i:i + 25]):
                o = stream.test()
                events.append((o.result.reject, o.detected, o.alarm))
    alarms = [e for e in events if e[2]]
    assert len(alarms) == 1 and stream.alarms == 1 and events.index(alarms[0]) >= 1  # the second rejection in a row
    assert not events[-1][1] and not stream.detected  # cleared after two passes in a row
    state = stream.state()
    assert state["alarms"] == 1 and state["last_alarm"]["pvalues"]["embedding"] < 0.01
    assert state["reference"]["n"] == 300 and state["reference"]["components"] == 4


def test_the_reference_file_round_trips_and_a_foreign_or_missing_one_is_refused(tmp_path, reference):
    path = tmp_path / drift.REFERENCE_FILE
    sha = drift.save_reference(path, reference)
    back = drift.load_reference(path)
    assert np.array_equal(back.basis, reference.basis) and np.array_equal(back.embedding, reference.embedding)
    model = tmp_path / "model.onnx"
    meta = {drift.METADATA_KEY: json.dumps({"file": path.name, "sha256": sha})}
    assert len(drift.reference_of(model, meta).embedding) == 300
    with pytest.raises(drift.DriftError, match="sha256 differs"):
        drift.reference_of(model, {drift.METADATA_KEY: json.dumps({"file": path.name, "sha256": "0" * 64})})
    with pytest.raises(drift.DriftError, match="names no drift reference"):
        drift.reference_of(model, {})
    path.unlink()
    with pytest.raises(drift.DriftError, match="is not beside it"):
        drift.reference_of(model, meta)


# ---- the served model's monitor (service level) ---------------------------------------------------------------


def test_the_service_feeds_the_window_and_a_shifted_stream_raises_the_alarm_once(tmp_path):
    root = tmp_path / "registry"
    registry.register(root, {"model.onnx": monitored_model(tmp_path / "m"),
                             drift.REFERENCE_FILE: tmp_path / "m" / drift.REFERENCE_FILE}, {})
    registry.promote(root, "1")
    metrics = Metrics()
    monitor = Monitor(DriftSettings(window=40, every=10, alpha=0.01, consecutive=2, save_dir=tmp_path / "saved",
                                    save_max=30), metrics)
    svc = Service(Source.parse("champion", root), "clf", Runner(), monitor=monitor)
    model = svc.current
    assert model.reference is not None and monitor.monitors(model)

    async def send(batch: np.ndarray) -> None:
        for i in range(0, len(batch), 5):
            await svc.predict(model, batch[i:i + 5])
            monitor.drain(30)

    asyncio.run(send(images(80, seed=20)))  # clean
    state = monitor.state()
    assert state["enabled"] and state["tests"] == 5 and not state["detected"] and state["alarms"] == 0
    asyncio.run(send(images(60, seed=21, noise=70.0)))  # a noisier camera
    state = monitor.state()
    assert state["detected"] and state["alarms"] == 1
    assert state["last_alarm"]["pvalues"]["embedding"] < 0.01
    text = metrics.render("")[0].decode()
    assert "drift_detected 1.0" in text and "drift_alarms_total 1.0" in text
    assert 'drift_pvalue{detector="embedding"}' in text
    saved = [p for p in (tmp_path / "saved").rglob("*.png")]
    assert len(saved) == 30  # the window's 40 images, bounded by --drift-save-max
    window = json.loads(next((tmp_path / "saved").rglob("window.json")).read_text())
    assert window["model_version"] == "v0001" and len(window["images"]) == 30 and window["drift"]["reject"]
    monitor.close()


def test_a_model_without_a_reference_is_served_unmonitored_and_says_why(tmp_path):
    from tests.conftest import brightness_onnx

    plain = brightness_onnx(tmp_path / "plain.onnx", CLASSES)
    monitor = Monitor(DriftSettings())
    svc = Service(Source.parse(str(plain), tmp_path), "clf", Runner(), monitor=monitor)
    assert not monitor.monitors(svc.current)
    assert monitor.state() == {"enabled": False, "note": "not monitored: plain.onnx has no 'embedding' output "
                               "(exported before drift monitoring, or not by this pipeline)"}
    asyncio.run(svc.predict(svc.current, np.zeros((1, 3, 32, 32), np.uint8)))  # served as before
    broken = monitored_model(tmp_path / "b")
    (tmp_path / "b" / drift.REFERENCE_FILE).write_bytes(b"other")
    svc = Service(Source.parse(str(broken), tmp_path), "clf", Runner(), monitor=monitor)
    assert "sha256 differs" in monitor.state()["note"] and sha256_file(broken)
    monitor.close()


def test_finetune_drift_tests_a_folder_against_the_champions_reference(tmp_path):
    """Batch mode: the same decode path, model and test as the server; exit 1 on drift, 0 without."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = tmp_path / "registry"
    registry.register(root, {"model.onnx": monitored_model(tmp_path / "m"),
                             drift.REFERENCE_FILE: tmp_path / "m" / drift.REFERENCE_FILE}, {})
    registry.promote(root, "1")
    for name, batch in (("clean", images(60, seed=30)), ("noisy", images(60, seed=31, noise=70.0))):
        (tmp_path / name).mkdir()
        for i, x in enumerate(batch):
            Image.fromarray(x[0]).save(tmp_path / name / f"{i:03d}.png")
    (tmp_path / "clean" / "broken.png").write_bytes(b"not an image")
    finetune = str(Path(sys.executable).parent / "finetune")
    clean = subprocess.run([finetune, "drift", str(tmp_path / "clean"), "--registry", str(root), "--out",
                            str(tmp_path / "clean.json")], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert "60 images (1 unreadable) vs the reference of v0001 (120 val images" in clean.stdout
    assert "no drift detected" in clean.stdout
    report = json.loads((tmp_path / "clean.json").read_text())
    assert not report["drift"] and report["images"] == 60 and report["pvalues"]["combined"] >= 0.01
    noisy = subprocess.run([finetune, "drift", str(tmp_path / "noisy"), "--registry", str(root)], capture_output=True,
                           text=True, timeout=300)
    assert noisy.returncode == 1 and "DRIFT" in noisy.stdout, noisy.stdout + noisy.stderr
    plain = subprocess.run([finetune, "drift", str(tmp_path / "clean"), "--model",
                            str(stats_onnx(tmp_path / "p.onnx"))], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and "names no drift reference" in plain.stderr, plain.stderr
