"""Drift monitoring's statistics and their use: the KS numbers against scipy, known shifted vs unshifted samples,
false-alarm control over repeated tests, the window and alarm rule, the image statistics detector (a blur the model's
outputs do not see), the reference file and its checks (an older file without image statistics still monitors), and
the served model's monitor (service level, no HTTP; a toy ONNX model with this pipeline's three outputs)."""

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


def monitored_model(folder, n_fit: int = 200, n_ref: int = 120, with_image: bool = True):
    """A toy model with its drift reference beside it, named in its metadata (what the export stage writes);
    `with_image` False: a reference written before the image statistics (no `image` arrays in the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    plain = stats_onnx(folder / "plain.onnx")
    clf = OnnxClassifier(plain)
    fit = clf.run_with_embedding(images(n_fit, seed=1))[2]
    ref_images = images(n_ref, seed=2)
    _, probs, emb = clf.run_with_embedding(ref_images)
    ref = drift.Reference.build(fit, emb, probs, 32, {"fit_split": "train", "n_fit": n_fit,
                                                      "reference_split": "val", "precision": "fp32"},
                                drift.image_statistics(ref_images) if with_image else None)
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
    emb, probs, imgs, stats = window.snapshot()
    assert emb[:, 0].tolist() == [4, 5, 6, 7, 8] and [int(i[0]) for i in imgs] == [4, 5, 6, 7, 8] and len(window) == 5
    assert stats is None  # nothing measured (no image detector asked for)
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
    assert state["detectors"] == ["embedding", "softmax"] and state["reference"]["image_statistics"] is None


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


# ---- the image statistics detector --------------------------------------------------------------------------


def textures(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Grey textures like camera images: smoothed noise of a random grain (sigma 0.7-2 px), contrast and level,
    uint8 (n, 3, size, size)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        field = gaussian_filter(rng.normal(size=(size, size)), rng.uniform(0.7, 2.0))
        level, contrast = rng.uniform(90, 170), rng.uniform(20, 45)
        out[i] = np.clip(np.rint(level + contrast * field / field.std()), 0, 255).astype(np.uint8)
    return out


def blurred(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of each image (over height and width), rounded back to uint8."""
    from scipy.ndimage import gaussian_filter

    return np.clip(np.rint(gaussian_filter(x.astype(np.float32), (0, 0, sigma, sigma))), 0, 255).astype(np.uint8)


def test_image_statistics_are_brightness_contrast_and_a_sharpness_that_blur_lowers_and_noise_raises():
    flat = np.full((2, 3, 32, 32), 77, np.uint8)
    assert np.allclose(drift.image_statistics(flat), [[77, 0, 0]] * 2)  # a flat image: no contrast, no detail
    x = textures(12, seed=0)
    stats = drift.image_statistics(x)
    assert stats.shape == (12, 3) and stats.dtype == np.float32
    # an image's numbers do not depend on the batch it came in (the server measures one at a time)
    assert np.array_equal(stats, np.concatenate([drift.image_statistics(x[i:i + 1]) for i in range(12)]))
    grey = x[:, 1, ::2].astype(np.float32)  # the middle channel, every 64 // 32 = 2nd row
    assert np.allclose(stats[:, 0], grey.mean((1, 2)), atol=1e-3)
    assert np.allclose(stats[:, 1], grey.std((1, 2)), rtol=1e-3)
    assert (drift.image_statistics(blurred(x, 1.0))[:, 2] < 0.9 * stats[:, 2]).all()
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert (drift.image_statistics(noisy)[:, 2] > stats[:, 2]).all()
    darker = np.rint(x * 0.8).astype(np.uint8)  # brightness and contrast move, sharpness hardly
    d = drift.image_statistics(darker)
    assert (d[:, 0] < 0.81 * stats[:, 0]).all() and np.allclose(d[:, 2], stats[:, 2], rtol=0.05)
    big = np.repeat(np.repeat(x, 4, 2), 4, 3)  # 256 px: every 4th row and column
    assert drift.image_statistics(big).shape == (12, 3)
    with pytest.raises(drift.DriftError, match="uint8"):
        drift.image_statistics(x.astype(np.float32))


@pytest.fixture(scope="module")
def image_reference() -> drift.Reference:
    """Outputs that a blur does not move (the synthetic embeddings and probabilities) and the image statistics of
    300 textures: only the image detector can see a blur."""
    fit = synthetic(1000, seed=1)[0]
    return drift.Reference.build(fit, *synthetic(300, seed=2), 32, {"reference_split": "val"},
                                 drift.image_statistics(textures(300, seed=3)))


def test_a_blurred_stream_raises_the_alarm_through_the_image_detector_and_a_clean_one_does_not(image_reference):
    """The server's path: rows come with their images, the test measures them; alarm within 100 blurred images."""
    stream = drift.Stream(image_reference, window=100, every=20, alpha=0.002, consecutive=2)
    emb, probs = synthetic(700, seed=40)
    clean, blur = textures(400, seed=41), blurred(textures(300, seed=42), 1.0)
    for i in range(0, 400, 5):
        if stream.add(emb[i:i + 5], probs[i:i + 5], clean[i:i + 5]):
            stream.test()
    assert stream.tests == 16 and stream.alarms == 0 and not stream.detected
    assert stream.last.pvalues["image"] > 0.002 and set(stream.last.pvalues) == {"embedding", "softmax", "image",
                                                                                 "combined"}
    assert all(row[2] is None for row in stream.window._rows)  # measured images are not held (keep_images is off)
    found = None
    for n in range(5, 305, 5):  # n blurred images sent
        i = 400 + n - 5
        if stream.add(emb[i:i + 5], probs[i:i + 5], blur[n - 5:n]) and stream.test().alarm:
            found = n
            break
    assert found is not None and found <= 100, found
    p = stream.last.pvalues
    assert p["image"] < 0.002 / 3 and p["embedding"] > 0.01 and p["softmax"] > 0.01
    assert p["combined"] == pytest.approx(min(1.0, 3 * min(p["embedding"], p["softmax"], p["image"])))
    assert stream.state()["detectors"] == ["embedding", "softmax", "image"]
    # the statistics the stream measured are image_statistics of the same images
    assert np.array_equal(stream.window.snapshot()[3][-5:], drift.image_statistics(blur[found - 5:found]))


def test_clean_windows_rarely_reject_with_three_detectors(image_reference):
    emb, probs = synthetic(40_000, seed=50)
    stats = drift.image_statistics(textures(4000, seed=51))
    rejected = sum(drift.compare(image_reference, emb[i * 100:(i + 1) * 100], probs[i * 100:(i + 1) * 100], 0.05,
                                 stats[(i % 40) * 100:(i % 40 + 1) * 100]).reject for i in range(400))
    assert rejected / 400 <= 0.05 + 0.03


def test_a_reference_without_image_statistics_still_loads_and_monitors_with_two_detectors(tmp_path, image_reference):
    """A file written before the image detector (or with other statistics than these) monitors as before."""
    old = drift.Reference(image_reference.mean, image_reference.basis, image_reference.embedding,
                          image_reference.softmax, {"reference_split": "val"})
    path = tmp_path / drift.REFERENCE_FILE
    sha = drift.save_reference(path, old)
    with np.load(path) as z:
        assert "image" not in z.files
    ref = drift.reference_of(tmp_path / "model.onnx", {drift.METADATA_KEY: json.dumps({"file": path.name,
                                                                                       "sha256": sha})})
    assert ref.image is None and ref.detectors == ("embedding", "softmax")
    emb, probs = synthetic(100, seed=60, shift=1.0)
    result = drift.compare(ref, emb, probs, 0.01, drift.image_statistics(textures(100, seed=61)))  # ignored
    assert set(result.pvalues) == {"embedding", "softmax", "combined"} and result.reject
    assert result.pvalues["combined"] == pytest.approx(min(1.0, 2 * result.pvalues["embedding"]))
    stream = drift.Stream(ref, window=20, every=10)
    assert not stream.window.measure_images
    stream.add(emb[:20], probs[:20], textures(20, seed=62))
    assert stream.test().result.pvalues.keys() == {"embedding", "softmax", "combined"}
    assert all(row[2] is None for row in stream.window._rows)  # not held: nothing to measure
    # with the image sample: round trip; another set of statistics than these is not misread as these
    sha = drift.save_reference(path, image_reference)
    back = drift.load_reference(path)
    assert np.array_equal(back.image, image_reference.image) and back.detectors == drift.DETECTORS
    with np.load(path) as z:
        arrays = dict(z)
    arrays["image_statistics"] = np.array(json.dumps(["brightness", "contrast", "entropy"]))
    np.savez(tmp_path / "other.npz", **arrays)
    assert drift.load_reference(tmp_path / "other.npz").image is None
    # the INT8 reference: the same images, so the same image sample
    assert np.array_equal(image_reference.with_sample(*synthetic(50, seed=63), precision="int8").image,
                          image_reference.image)


def test_the_export_stage_records_the_image_statistics_of_the_decoded_validation_images(tmp_path):
    """`tasks.export.reference.record`: the reference's image sample is `image_statistics` of what the server's
    decode path makes of the validation files."""
    import pandas as pd
    from PIL import Image

    from tasks.export.reference import record

    (tmp_path / "images").mkdir()
    rows = []
    for i, x in enumerate(np.concatenate([images(30, seed=70), images(12, seed=71)])):
        Image.fromarray(x[0]).save(tmp_path / "images" / f"{i:03d}.png")
        rows.append({"path": f"{i:03d}.png", "split": "train" if i < 30 else "val"})
    model = stats_onnx(tmp_path / "model.onnx")
    ref, _, report = record(model, tmp_path / drift.REFERENCE_FILE, pd.DataFrame(rows), tmp_path / "images", SIZE,
                            1, 10**7, 4, 100, 100)
    assert report["image_statistics"] == list(drift.IMAGE_STATISTICS) and report["n_reference"] == 12
    clf = OnnxClassifier(model)
    decoded = np.stack([clf.load(tmp_path / "images" / f"{i:03d}.png") for i in range(30, 42)])
    loaded = drift.reference_of(model, clf.metadata)
    assert np.array_equal(loaded.image, np.sort(drift.image_statistics(decoded), 0))


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
    assert state["last_alarm"]["pvalues"]["embedding"] < 0.01 and "image" in state["last_alarm"]["pvalues"]
    assert state["detectors"] == ["embedding", "softmax", "image"]
    text = metrics.render("")[0].decode()
    assert "drift_detected 1.0" in text and "drift_alarms_total 1.0" in text
    assert 'drift_pvalue{detector="embedding"}' in text and 'drift_pvalue{detector="image"}' in text
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
    for name, batch in (("clean", images(60, seed=30)), ("noisy", images(60, seed=31, noise=70.0)),
                        ("blurred", blurred(images(60, seed=32), 1.0))):
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
    assert report["pvalues"]["image"] >= 0.01 and ", image " in clean.stdout
    noisy = subprocess.run([finetune, "drift", str(tmp_path / "noisy"), "--registry", str(root)], capture_output=True,
                           text=True, timeout=300)
    assert noisy.returncode == 1 and "DRIFT" in noisy.stdout, noisy.stdout + noisy.stderr
    blur = subprocess.run([finetune, "drift", str(tmp_path / "blurred"), "--registry", str(root), "--out",
                           str(tmp_path / "blurred.json")], capture_output=True, text=True, timeout=300)
    assert blur.returncode == 1 and json.loads((tmp_path / "blurred.json").read_text())["pvalues"]["image"] < 1e-6
    plain = subprocess.run([finetune, "drift", str(tmp_path / "clean"), "--model",
                            str(stats_onnx(tmp_path / "p.onnx"))], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and "names no drift reference" in plain.stderr, plain.stderr
