"""The serving service without HTTP: which model a source names, the warm-up check, preprocess -> predict ->
postprocess, micro-batching, and the hot swap (promote, rollback, a broken candidate)."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.batching import Runner
from deploy.protocol import V2Error
from deploy.service import Service, Source, load
from tasks import registry
from tasks.inference import ModelError
from tests.conftest import brightness_onnx

CLASSES = ["bright", "dark"]


def png(level: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), level).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def reg(tmp_path) -> Path:
    """A registry with v0001 (threshold 128) as champion and v0002 (threshold 60) registered."""
    root = tmp_path / "registry"
    for i, threshold in enumerate((128.0, 60.0)):
        onnx = brightness_onnx(tmp_path / f"m{i}.onnx", CLASSES, threshold=threshold)
        registry.register(root, {"model.onnx": onnx}, {"note": f"threshold {threshold}"})
    registry.promote(root, "v1")
    return root


def service(source: Source, **runner) -> Service:
    return Service(source, "clf", Runner(**runner))


def test_a_source_is_the_champion_a_version_or_a_file(reg, tmp_path):
    assert Source.parse("champion", reg).locate()[1] == "v0001"
    assert Source.parse("2", reg).locate()[:2] == (reg / "versions/v0002/model.onnx", "v0002")
    assert Source.parse("v0002", reg).kind == "version"
    onnx = brightness_onnx(tmp_path / "file.onnx", CLASSES)
    assert Source.parse(str(onnx), reg).locate()[:2] == (onnx, None)
    with pytest.raises(ModelError, match="no such ONNX file"):
        Source.parse(str(tmp_path / "missing.onnx"), reg).locate()
    with pytest.raises(registry.RegistryError, match=r"has no version v0009 \(versions: v0001, v0002\)"):
        Source.parse("9", reg).locate()
    with pytest.raises(ModelError, match="has no champion yet"):
        Source.parse("champion", tmp_path / "empty").locate()


def test_a_loaded_model_describes_itself_and_a_broken_one_never_loads(reg, tmp_path):
    model = load(Source.parse("champion", reg), "clf")
    meta = model.metadata()
    assert meta["name"] == "clf" and meta["versions"] == ["v0001"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    assert model.matches("1") and model.matches("v0001") and model.matches(None) and not model.matches("2")
    assert model.info()["classes"] == CLASSES and model.info()["preprocessing"]["size"] == 32
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        load(Source.parse(str(broken), reg), "clf")
    nan = tmp_path / "nan.onnx"
    brightness_onnx(nan, CLASSES, threshold=float("nan"))  # loads, but its outputs are NaN
    with pytest.raises(ModelError, match="warm-up outputs are not finite probabilities"):
        load(Source.parse(str(nan), reg), "clf")


def test_preprocess_predict_postprocess_an_upload(reg):
    svc = service(Source.parse("champion", reg))
    model = svc.model("clf")
    images = svc.preprocess(model, [("white.png", png(250)), ("black.png", png(5))])
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    _, probs = asyncio.run(svc.predict(model, images))
    out = svc.postprocess(model, ["white.png", "black.png"], probs, 2)
    assert [o["label"] for o in out] == ["bright", "dark"]
    assert [t["label"] for t in out[1]["top_k"]] == ["dark", "bright"] and out[1]["probability"] > 0.99
    with pytest.raises(V2Error, match=r"upload notes.txt: cannot decode \(cannot identify image file\)") as err:
        svc.preprocess(model, [("notes.txt", b"hello")])
    assert err.value.status == 400
    with pytest.raises(V2Error, match="unknown model 'other'") as err:
        svc.model("other")
    assert err.value.status == 404
    with pytest.raises(V2Error, match="has no version '2': it serves version v0001"):
        svc.model("clf", "2")


class Gated:
    """Wraps a real model: its first call waits until the test opens the gate, so requests pile up meanwhile."""

    def __init__(self, model):
        self.model, self.gate, self.entered = model, threading.Event(), threading.Event()

    def run(self, images):
        self.entered.set()
        self.gate.wait(timeout=60)
        return self.model.run(images)


@pytest.mark.parametrize("batching, expected", [(True, [1, 7]), (False, [1] * 8)])
def test_micro_batching_merges_requests_that_wait_while_the_model_is_busy(reg, batching, expected):
    model = load(Source.parse("champion", reg), "clf")
    gated = Gated(model)
    sizes: list[int] = []
    runner = Runner(concurrency=1, batching=batching, max_batch=32, on_batch=sizes.append)
    images = [np.full((1, 3, 32, 32), level, np.uint8) for level in (250, 5, 250, 5, 250, 5, 250, 5)]

    async def scenario():
        await runner.start()
        first = asyncio.create_task(runner.run(gated, images[0]))
        await asyncio.to_thread(gated.entered.wait, 60)  # the model is busy with the first request
        rest = [asyncio.create_task(runner.run(gated, x)) for x in images[1:]]
        await asyncio.sleep(0)  # let them queue
        gated.gate.set()
        results = await asyncio.gather(first, *rest)
        await runner.stop()
        return results

    results = asyncio.run(scenario())
    assert sorted(sizes) == sorted(expected)
    labels = [CLASSES[int(probs[0].argmax())] for _, probs in results]
    assert labels == ["bright", "dark"] * 4  # each request gets its own rows back


def test_hot_swap_follows_promote_and_rollback_and_refuses_a_broken_candidate(reg, tmp_path):
    swaps = []
    svc = Service(Source.parse("champion", reg), "clf", Runner(), on_swap=lambda old, new, err: swaps.append(
        (old.version, new.version if new else None, err)))
    grey = np.full((1, 3, 32, 32), 100, np.uint8)  # 'dark' for v0001 (threshold 128), 'bright' for v0002 (60)

    def label() -> str:
        return CLASSES[int(asyncio.run(svc.predict(svc.current, grey))[1][0].argmax())]

    assert asyncio.run(svc.refresh()) == {"changed": False, "version": "v0001"}  # nothing changed: only a stat
    assert label() == "dark"
    old = svc.current
    registry.promote(reg, "2")
    outcome = asyncio.run(svc.refresh())
    assert outcome["changed"] and outcome["version"] == "v0002" and outcome["previous"] == "v0001"
    assert label() == "bright" and svc.model("clf").metadata()["versions"] == ["v0002"]
    assert old.run(grey)[1][0].argmax() == 1  # a request that captured the old model still finishes on it
    registry.rollback(reg)
    assert asyncio.run(svc.refresh())["version"] == "v0001" and label() == "dark"

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    registry.register(reg, {"model.onnx": broken}, {})
    registry.promote(reg, "3")
    outcome = asyncio.run(svc.refresh())
    assert not outcome["changed"] and "not a loadable ONNX model" in outcome["error"]
    assert svc.current.version == "v0001" and label() == "dark"  # still serving the last good model
    assert svc.last_swap["ok"] is False and svc.last_swap["from"] == "v0001"
    assert asyncio.run(svc.refresh()) == {"changed": False, "version": "v0001"}  # not retried until it changes again
    assert swaps == [("v0001", "v0002", None), ("v0002", "v0001", None), ("v0001", None, swaps[-1][2])]


def test_a_served_file_is_followed_too(tmp_path):
    path = brightness_onnx(tmp_path / "model.onnx", CLASSES)
    svc = service(Source.parse(str(path), tmp_path))
    first = svc.current.version
    assert len(first) == 12
    brightness_onnx(tmp_path / "new.onnx", CLASSES, threshold=60.0).replace(path)  # a new export renamed over it
    outcome = asyncio.run(svc.refresh())
    assert outcome["changed"] and svc.current.version != first


def test_precision_int8_picks_a_versions_int8_model_and_falls_back_to_fp32(tmp_path, caplog):
    root = tmp_path / "registry"
    fp32 = brightness_onnx(tmp_path / "fp32.onnx", CLASSES)
    int8 = brightness_onnx(tmp_path / "int8.onnx", CLASSES, threshold=60.0, extra={"quantization": "{}"})
    registry.register(root, {"model.onnx": fp32, registry.INT8_FILE: int8}, {})
    registry.register(root, {"model.onnx": brightness_onnx(tmp_path / "only.onnx", CLASSES, threshold=61.0)}, {})
    registry.promote(root, "1")
    assert Source.parse("champion", root, "int8").locate()[0] == root / "versions/v0001" / registry.INT8_FILE
    assert Source.parse("champion", root).locate()[0] == root / "versions/v0001/model.onnx"  # fp32 by default
    model = load(Source.parse("1", root, "int8"), "clf")
    assert model.precision == "int8" and model.metadata()["parameters"]["precision"] == "int8"
    assert model.info()["precision"] == "int8" and model.version == "v0001"
    assert load(Source.parse("1", root), "clf").precision == "fp32"
    with caplog.at_level("WARNING", logger="deploy.service"):
        fallback = load(Source.parse("2", root, "int8"), "clf")
    assert fallback.path == root / "versions/v0002/model.onnx" and fallback.precision == "fp32"
    assert "v0002 has no INT8 model" in caplog.text and "serving its fp32 model.onnx" in caplog.text
    with pytest.raises(ModelError, match=r"precision int8 picks a registry version's model .* is a file"):
        Source.parse(str(fp32), root, "int8")
    with pytest.raises(ModelError, match="precision must be one of fp32, int8, got 'fp16'"):
        Source.parse("champion", root, "fp16")
