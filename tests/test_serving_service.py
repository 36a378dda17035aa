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
    images = asyncio.run(svc.preprocess(model, [("white.png", png(250)), ("black.png", png(5))]))
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    _, probs = asyncio.run(svc.predict(model, images))
    out = svc.postprocess(model, ["white.png", "black.png"], probs, 2)
    assert [o["label"] for o in out] == ["bright", "dark"]
    assert [t["label"] for t in out[1]["top_k"]] == ["dark", "bright"] and out[1]["probability"] > 0.99
    with pytest.raises(V2Error, match=r"upload notes.txt: cannot decode \(cannot identify image file\)") as err:
        asyncio.run(svc.preprocess(model, [("notes.txt", b"hello")]))
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


# ---- issue 32: decoding uploads with bounded memory; last_swap after a repair --------------------------

def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def smooth(size: tuple[int, int], mode: str, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (12, 16, 4), dtype=np.uint8), "RGBA")
    image = image.resize(size, Image.Resampling.BICUBIC)
    return image.convert("RGB").quantize(64) if mode == "P" else image.convert(mode)


@pytest.mark.parametrize("fmt, mode, kwargs", [("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "L", {}),
                                               ("JPEG", "RGB", {}), ("JPEG", "RGB", {"progressive": True}),
                                               ("WEBP", "RGB", {}), ("TIFF", "I;16", {}), ("BMP", "RGB", {})])
def test_a_large_upload_is_decoded_reduced_close_to_the_training_path(fmt, mode, kwargs):
    from deploy import decode
    from tasks.images import load_for_model

    image = smooth((2000, 1500), mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 200)  # mode I;16
    data = encoded(image, fmt, **kwargs)
    upload = decode.inspect(data, "big", 64, 50_000_000)
    assert not upload.exact and upload.reduce != (1, 1) or upload.image.size[0] < 2000  # box-reduced or JPEG-scaled
    reduced = decode.decode(upload, 64, 50_000_000).astype(int)
    training = load_for_model(io.BytesIO(data), 64).astype(int)
    assert reduced.shape == (3, 64, 64) and np.abs(reduced - training).mean() < 1.0  # out of 0..255
    small = encoded(smooth((200, 150), mode if mode != "I;16" else "L"), fmt, **kwargs)  # under 4x the input size:
    upload = decode.inspect(small, "small", 64, 50_000_000)                                # the training path itself
    assert upload.exact and np.array_equal(decode.decode(upload, 64, 50_000_000),
                                           load_for_model(io.BytesIO(small), 64))


def test_exif_orientation_survives_the_reduced_decode():
    from deploy import decode
    from tasks.images import load_for_model

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = encoded(smooth((1600, 1000), "RGB"), "JPEG", exif=exif, quality=95)
    upload = decode.inspect(data, "rotated", 32, 50_000_000)
    assert not upload.exact
    reduced, training = decode.decode(upload, 32, 50_000_000).astype(int), load_for_model(io.BytesIO(data), 32)
    upright, turned = np.abs(reduced - training).mean(), np.abs(reduced - np.rot90(training, 1, axes=(1, 2))).mean()
    assert upright < 4.0 and turned > 3 * upright, (upright, turned)  # a 1/8 DCT scale, then 32 px: close, upright


def test_what_an_upload_costs_to_decode_bounds_what_it_holds():
    """The estimate is what the budget counts: it must cover the decode's real peak (ru_maxrss of a fresh
    process, per format), else the budget would not bound memory."""
    import subprocess
    import sys

    script = """
import io, resource, sys
import numpy as np
from PIL import Image
from deploy import decode
kind = sys.argv[1]
image = Image.new("RGBA", (4000, 4000), (200, 10, 10, 128)) if kind == "png" else \\
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).resize((4000, 4000))
buf = io.BytesIO()
image.save(buf, "PNG" if kind == "png" else "JPEG", progressive=kind == "progressive", subsampling=0)
del image
data = buf.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
upload = decode.inspect(data, kind, 224, 50_000_000)
decode.decode(upload, 224, 50_000_000)
print(upload.cost, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""
    for kind in ("png", "progressive"):
        out = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parents[1], check=False)
        assert out.returncode == 0, out.stderr
        cost, peak = map(int, out.stdout.split())
        assert peak <= cost < 4 * 4000 * 4000 * 4, (kind, cost, peak)  # covered, and far below the old path's 5x


def test_the_decode_budget_holds_at_most_its_capacity_first_come_first_served():
    from deploy.decode import DecodeBudget, DecodeRefused

    budget, order, inside = DecodeBudget(100, wait_s=30), [], []

    async def decode_one(name: str, cost: int, started: asyncio.Event | None = None):
        async with budget.hold(cost, name):
            inside.append(cost)
            assert sum(inside) <= budget.capacity
            order.append(name)
            if started is not None:
                started.set()
            await asyncio.sleep(0)
            inside.remove(cost)

    async def scenario():
        first = asyncio.Event()
        tasks = [asyncio.create_task(decode_one("a", 80, first))]
        await first.wait()  # 'a' holds 80: 'b' (60) must wait, and 'c' (10, would fit) waits behind it
        tasks += [asyncio.create_task(decode_one("b", 60)), asyncio.create_task(decode_one("c", 10))]
        await asyncio.gather(*tasks)
        with pytest.raises(DecodeRefused, match="needs 0 MiB .* over the server's limit"):
            async with budget.hold(101, "huge"):
                pass
        short = DecodeBudget(10, wait_s=0.01)
        async with short.hold(10, "x"):
            with pytest.raises(TimeoutError):
                async with short.hold(5, "y"):
                    pass
        async with short.hold(10, "z"):  # the one that gave up left nothing behind
            pass
        return short.used

    assert asyncio.run(scenario()) == 0
    assert order == ["a", "b", "c"] and budget.used == 0 and budget.peak <= 100


def test_an_upload_over_the_decode_budget_is_a_413_naming_the_limit(reg):
    svc = Service(Source.parse("champion", reg), "clf", Runner(), decode_memory=8 << 20)
    big = encoded(Image.new("RGBA", (3000, 3000), (1, 2, 3, 4)), "PNG")  # 36 MB of pixels
    with pytest.raises(V2Error, match="upload big.png: decoding it needs .* MiB of memory, over the server's limit "
                                      "of 8 MiB") as err:
        asyncio.run(svc.preprocess(svc.current, [("big.png", big)]))
    assert err.value.status == 413


def test_last_swap_shows_the_repair_once_the_source_names_the_served_model_again(reg, tmp_path):
    svc = Service(Source.parse("champion", reg), "clf", Runner())
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    registry.register(reg, {"model.onnx": broken}, {})
    registry.promote(reg, "3")
    assert asyncio.run(svc.refresh())["error"] and svc.last_swap["ok"] is False
    registry.promote(reg, "1")  # the operator repairs the alias: it names the served version again
    assert asyncio.run(svc.refresh()) == {"changed": False, "version": "v0001"}
    assert svc.last_swap["ok"] is True and "error" not in svc.last_swap and svc.last_swap["to"] == "v0001"


def test_a_version_of_thousands_of_digits_is_unknown_not_an_error(reg):
    svc = service(Source.parse("champion", reg))
    with pytest.raises(V2Error, match="has no version") as err:
        svc.model("clf", "9" * 5000)
    assert err.value.status == 404
