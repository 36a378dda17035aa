"""The model server as clients meet it: a real `python -m deploy.server` process on loopback, driven by
tritonclient.http (JSON and binary tensors), httpx (uploads, errors) and `finetune predict`; bad input,
auth, metrics, logs, and hot swaps under load."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tasks import registry
from tasks.preprocess import Preprocessing
from tasks.promote.serving_check import ServerProcess
from tests.conftest import REPO, brightness_onnx, make_dataset

CLASSES = ["bright", "dark"]
NAME = "clf"
FINETUNE = str(Path(sys.executable).parent / "finetune")


def wait_until(condition, server: ServerProcess, timeout_s: float = 60.0, what: str = "condition"):
    """Poll `condition` until it is truthy; between polls wait on the server process (an exit fails at once)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert server.proc.poll() is None, f"the server exited: {server.reason()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        try:
            server.proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass


def make_registry(root: Path, tmp: Path) -> Path:
    """v0001 (bright above mean 128) is champion; v0002 (bright above 60) is registered."""
    for i, threshold in enumerate((128.0, 60.0)):
        registry.register(root, {"model.onnx": brightness_onnx(tmp / f"m{i}.onnx", CLASSES, threshold=threshold)}, {})
    registry.promote(root, "1")
    return root


def start(reg: Path, *args: str) -> ServerProcess:
    server = ServerProcess("champion", "--registry", str(reg), *args, name=NAME).__enter__()
    try:
        server.wait_ready(120)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    reg = make_registry(tmp / "registry", tmp)
    images = make_dataset(tmp / "images", classes=("dim", "lit"), per_class=5, size=48)
    server = start(reg, "--poll-s", "0", "--max-body-bytes", str(1 << 20), "--max-files", "4",
                   "--max-pixels", "1000000")
    yield {"server": server, "registry": reg, "images": images, "tmp": tmp}
    server.stop()
    server.cleanup()


@pytest.fixture
def client(world):
    return triton.InferenceServerClient(url=f"127.0.0.1:{world['server'].port}")


def image_files(world) -> list[Path]:
    return sorted(world["images"].rglob("*.png"))


def uint8_batch(paths: list[Path], size: int = 32) -> np.ndarray:
    return np.stack([Preprocessing(size=size).load(p) for p in paths])


def labels_of(probabilities: np.ndarray) -> list[str]:
    return [CLASSES[i] for i in probabilities.argmax(axis=1)]


def infer(client, x: np.ndarray, binary: bool, **kwargs) -> triton.InferResult:
    tensor = triton.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    return client.infer(NAME, [tensor], outputs=outputs, **kwargs)


def still_serving(world) -> None:
    """After a refused request the server answers a good one."""
    server = world["server"]
    assert server.proc.poll() is None, server.reason()
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert labels_of(infer(c, np.full((1, 3, 32, 32), 250, np.uint8), True).as_numpy("probabilities")) == ["bright"]


# ---- the protocol through tritonclient ------------------------------------------------------------

def test_tritonclient_sees_a_kserve_v2_server(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1") and client.is_model_ready(NAME, "v0001")
    assert not client.is_model_ready("other") and not client.is_model_ready(NAME, "2")
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata(NAME)
    assert meta["versions"] == ["v0001"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
                               {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]


def test_json_and_binary_tensors_give_the_labels_finetune_predict_gives(world, client, tmp_path):
    paths = image_files(world)
    x = uint8_batch(paths)
    binary = infer(client, x, True, request_id="b1")
    json_ = infer(client, x, False)
    assert binary.get_response()["id"] == "b1" and binary.get_response()["model_version"] == "v0001"
    assert "binary_data_size" in binary.get_output("probabilities")["parameters"]
    assert "data" in json_.get_output("probabilities")
    np.testing.assert_allclose(binary.as_numpy("probabilities"), json_.as_numpy("probabilities"), atol=1e-6)
    out = tmp_path / "predictions.csv"
    proc = subprocess.run([FINETUNE, "predict", "champion", str(world["images"]), "--registry", str(world["registry"]),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with out.open() as f:
        predicted = {row["path"]: row["label"] for row in csv.DictReader(f)}
    assert [predicted[str(p)] for p in paths] == labels_of(binary.as_numpy("probabilities"))
    assert set(predicted.values()) == {"bright", "dark"}  # both classes occur: the comparison can fail


def test_classification_and_gzip_requests(client):
    x = np.stack([np.full((3, 32, 32), 250, np.uint8), np.full((3, 32, 32), 5, np.uint8)])
    tensor = triton.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    result = client.infer(NAME, [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=1)],
                          request_compression_algorithm="gzip")
    top = result.as_numpy("probabilities")
    assert [row[0].decode().split(":")[2] for row in top] == ["bright", "dark"]


def test_the_upload_endpoint_returns_top_k_for_each_file(world):
    paths = image_files(world)[:2] + image_files(world)[-2:]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(world["server"].url + "/api/predict", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v0001" and [p["filename"] for p in body["predictions"]] == [p.name for p in paths]
    c = triton.InferenceServerClient(url=f"127.0.0.1:{world['server'].port}")
    expected = labels_of(infer(c, uint8_batch(paths), True).as_numpy("probabilities"))
    assert [p["label"] for p in body["predictions"]] == expected and len(set(expected)) == 2
    assert all(len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
               for p in body["predictions"])
    r = httpx.post(world["server"].url + "/api/predict?top_k=1", files=files[:1])
    assert len(r.json()["predictions"][0]["top_k"]) == 1


# ---- bad input: a 4xx JSON error naming the problem, and the server keeps serving ------------------

def png_bytes(size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 200, 200)).save(buf, "PNG")
    return buf.getvalue()


def v2_body(shape, datatype="UINT8", fill=0) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                   "data": [fill] * int(np.prod(shape))}]}).encode()


def upload(name: str, data: bytes, field: str = "files") -> dict:
    return {"files": [(field, (name, data, "image/png"))]}


BAD = {  # name -> (method, path, httpx kwargs (built when the case runs), status, words the error must contain)
    "corrupt upload": ("POST", "/api/predict", lambda: upload("cut.png", png_bytes()[:60]), 400,
                       "upload cut.png: cannot decode"),
    "not an image": ("POST", "/api/predict", lambda: upload("notes.txt", b"hello world"), 400,
                     "upload notes.txt: cannot decode"),
    "too many pixels": ("POST", "/api/predict", lambda: upload("big.png", png_bytes((1100, 1000))), 400,
                        "1100x1000 exceeds the pixel limit 1000000"),
    "oversized body": ("POST", "/v2/models/clf/infer", lambda: {"content": b"{" + b" " * (1 << 20) + b"}"}, 413,
                       "over the limit of 1048576 bytes"),
    "gzip bomb": ("POST", "/v2/models/clf/infer", lambda: {"content": gzip.compress(b" " * (8 << 20)),
                                                            "headers": {"Content-Encoding": "gzip"}},
                  413, "once decompressed"),
    "wrong shape": ("POST", "/v2/models/clf/infer", lambda: {"content": v2_body([1, 3, 16, 16])}, 400,
                    "shape [1, 3, 16, 16], expected [-1, 3, 32, 32]"),
    "wrong datatype": ("POST", "/v2/models/clf/infer", lambda: {"content": v2_body([1, 3, 32, 32], "FP32")}, 400,
                       "datatype FP32, expected UINT8"),
    "unknown model": ("POST", "/v2/models/resnet/infer", lambda: {"content": v2_body([1, 3, 32, 32])}, 404,
                      "unknown model 'resnet'"),
    "unknown version": ("GET", "/v2/models/clf/versions/7", dict, 404, "has no version '7'"),
    "not JSON": ("POST", "/v2/models/clf/infer", lambda: {"content": b"\x89PNG..."}, 400, "not valid JSON"),
    "too many files": ("POST", "/api/predict", lambda: {"files": [("files", (f"{i}.png", png_bytes(), "image/png"))
                                                                  for i in range(5)]}, 400, "Too many files"),
    "no files": ("POST", "/api/predict", lambda: upload("a.png", png_bytes(), field="other"), 400, "no images"),
    "JSON to the upload endpoint": ("POST", "/api/predict", lambda: {"json": {"files": []}}, 415,
                                    "multipart/form-data"),
    "bad top_k": ("POST", "/api/predict?top_k=many", lambda: upload("a.png", png_bytes()), 400, "top_k"),
    "zero top_k": ("POST", "/api/predict?top_k=0", lambda: upload("a.png", png_bytes()), 400,
                   "top_k must be at least 1"),
    "a float for a UINT8 input": ("POST", "/v2/models/clf/infer", lambda: {"content": v2_body([1, 3, 32, 32],
                                  fill=1.7)}, 400, "data is not UINT8 (UINT8 takes integers from 0 to 255, got 1.7)"),
    "unknown route": ("GET", "/v3/models", dict, 404, "no route GET /v3/models"),
    "wrong method": ("GET", "/v2/models/clf/infer", dict, 405, "method GET is not allowed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(world, case):
    method, path, kwargs, status, words = BAD[case]
    r = httpx.request(method, world["server"].url + path, timeout=60, **kwargs())
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"], r.json()
    still_serving(world)


def test_tritonclient_reports_the_servers_errors(world, client):
    with pytest.raises(InferenceServerException, match="datatype FP32, expected UINT8") as err:
        bad = triton.InferInput("image", [1, 3, 32, 32], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        client.infer(NAME, [bad])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    still_serving(world)


# ---- operations: metrics, logs, OpenAPI, auth ----------------------------------------------------

def test_metrics_logs_and_openapi(world):
    server = world["server"]
    httpx.get(server.url + "/v2/models/nope")
    httpx.post(server.url + "/api/predict", files=[("files", ("a.png", png_bytes(), "image/png"))])
    text = httpx.get(server.url + "/metrics").text
    assert 'serving_requests_total{method="POST",route="/api/predict",status="200"}' in text
    assert 'serving_requests_total{method="GET",route="/v2/models/{name}",status="404"}' in text
    assert 'serving_request_duration_seconds_bucket{le="0.05",route="/api/predict"}' in text
    assert "serving_batch_size_bucket" in text and "serving_images_total" in text
    assert 'serving_model_info{model="clf",sha256="' in text and 'version="v0001"} 1.0' in text
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "request"]
    assert any(a["route"] == "/api/predict" and a["status"] == 200 and a["ms"] > 0 for a in access)
    assert all({"ts", "level", "method", "path", "status", "client"} <= set(a) for a in access)
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v2/models/{name}/infer", "/api/predict", "/v2/health/ready", "/metrics"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]


def test_bearer_token_guards_infer_predict_and_admin(world, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server = start(world["registry"], "--poll-s", "0", "--token-file", str(token_file))
    try:
        body = v2_body([1, 3, 32, 32], fill=250)
        for path in ("/v2/models/clf/infer", "/admin/reload"):
            r = httpx.post(server.url + path, content=body)
            assert r.status_code == 401 and "needs a bearer token" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(server.url + "/api/predict", files=[("files", ("a.png", png_bytes(), "image/png"))],
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "not valid" in r.json()["error"]
        ok = httpx.post(server.url + "/v2/models/clf/infer", content=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["name"] == "logits"
        for open_path in ("/v2/health/ready", "/v2/models/clf", "/metrics", "/", "/api/model"):
            assert httpx.get(server.url + open_path).status_code == 200, open_path
        assert httpx.get(server.url + "/api/model").json()["auth"] is True
        c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        x = np.full((1, 3, 32, 32), 250, np.uint8)
        assert labels_of(infer(c, x, True, headers={"Authorization": "Bearer s3cret"}).as_numpy("probabilities")) \
            == ["bright"]
    finally:
        assert server.stop() == 0  # a clean, graceful shutdown
        server.cleanup()


def test_a_model_that_cannot_be_served_stops_the_server_with_the_reason(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"garbage")
    with ServerProcess(broken) as server:
        with pytest.raises(Exception, match="exited with code 1 before it was ready: .*not a loadable ONNX model"):
            server.wait_ready(60)
    server.cleanup()


def test_precision_int8_serves_the_int8_model_and_follows_a_champion_without_one(tmp_path):
    reg = tmp_path / "registry"
    int8 = brightness_onnx(tmp_path / "int8.onnx", CLASSES, threshold=60.0, extra={"quantization": "{}"})
    registry.register(reg, {"model.onnx": brightness_onnx(tmp_path / "a.onnx", CLASSES), registry.INT8_FILE: int8}, {})
    registry.register(reg, {"model.onnx": brightness_onnx(tmp_path / "b.onnx", CLASSES, threshold=127.0)}, {})
    registry.promote(reg, "1")
    server = start(reg, "--precision", "int8", "--poll-s", "0")
    try:
        c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        grey = np.full((1, 3, 32, 32), 100, np.uint8)  # bright to the INT8 file (60), dark to the fp32 ones (128)
        meta = httpx.get(server.url + "/v2/models/clf").json()
        assert meta["versions"] == ["v0001"] and meta["parameters"]["precision"] == "int8"
        assert labels_of(infer(c, grey, True).as_numpy("probabilities")) == ["bright"]
        registry.promote(reg, "2")
        assert httpx.post(server.url + "/admin/reload").json()["version"] == "v0002"
        info = httpx.get(server.url + "/api/model").json()
        assert info["version"] == "v0002" and info["precision"] == "fp32"
        assert labels_of(infer(c, grey, True).as_numpy("probabilities")) == ["dark"]
        assert server.stop() == 0
        assert "v0002 has no INT8 model" in server.output()  # the fallback is logged
    finally:
        server.stop()
        server.cleanup()
    with ServerProcess(int8, "--precision", "int8") as refused:
        with pytest.raises(Exception, match=r"exited with code 1 before it was ready: .*precision int8 picks a "
                                            r"registry version's model"):
            refused.wait_ready(60)
    refused.cleanup()


# ---- hot swap ----------------------------------------------------------------------------------

def hammer(server: ServerProcess, stop: threading.Event, results: list, limit: int = 20_000) -> None:
    """One client sending binary infers until told to stop (at most `limit`): (status, version, label) per request."""
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    x = np.full((1, 3, 32, 32), 100, np.uint8)
    for _ in range(limit):
        if stop.is_set():
            break
        try:
            r = infer(c, x, True)
            results.append((200, r.get_response()["model_version"], labels_of(r.as_numpy("probabilities"))[0]))
        except InferenceServerException as exc:
            results.append((exc.status(), str(exc), None))
        except Exception as exc:  # connection errors: a dropped request
            results.append(("dropped", repr(exc), None))


def test_promote_rollback_and_a_broken_candidate_under_load_drop_no_request(tmp_path):
    reg = make_registry(tmp_path / "registry", tmp_path)
    server = start(reg, "--poll-s", "0.1")
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=hammer, args=(server, stop, results)) for _ in range(4)]
    for t in clients:
        t.start()

    def served() -> str:
        return httpx.get(server.url + "/v2/models/clf").json()["versions"][0]

    try:
        wait_until(lambda: len(results) >= 20, server, what="load")
        registry.promote(reg, "2")                       # the watcher sees champion.json change
        wait_until(lambda: served() == "v0002", server, what="the promotion")
        n = len(results)
        wait_until(lambda: len(results) >= n + 20, server, what="requests on v0002")
        registry.rollback(reg)
        wait_until(lambda: served() == "v0001", server, what="the rollback")
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not a model")
        registry.register(reg, {"model.onnx": broken}, {})
        registry.promote(reg, "3")
        r = httpx.post(server.url + "/admin/reload", timeout=60)  # or wait for the watcher: the same check
        assert r.status_code == 409 and "not a loadable ONNX model" in r.json()["error"], r.text
        n = len(results)
        wait_until(lambda: len(results) >= n + 20, server, what="requests after the refused swap")
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    try:
        assert served() == "v0001"
        info = httpx.get(server.url + "/api/model").json()
        assert info["last_swap"]["ok"] is False and "v0003" in info["last_swap"]["error"]
        metrics = httpx.get(server.url + "/metrics").text
        assert 'serving_model_swaps_total{result="ok"} 2.0' in metrics
        assert 'serving_model_swaps_total{result="failed"} ' in metrics
    finally:
        assert server.stop() == 0
        server.cleanup()
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    by_version = {(v, label) for _, v, label in results}
    # grey 100 is 'dark' for v0001 (threshold 128) and 'bright' for v0002 (threshold 60): each answer is whole
    assert by_version == {("v0001", "dark"), ("v0002", "bright")}, by_version


# ---- a real network -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_real_efficientnet_lite0_gives_the_same_labels_everywhere(tmp_path):
    """Exported from the bundled ImageNet weights (a seeded 2-class head): tritonclient JSON and binary,
    the upload endpoint and `finetune predict` agree image by image."""
    from tasks import backbones
    from tasks.export.onnx_graph import Deployable, add_metadata, export_onnx

    base, meta = backbones.create("bundled", "efficientnet_lite0", "imagenet")
    pre = Preprocessing(size=96, mean=Preprocessing.from_dict(meta["preprocessing"]).mean,
                        std=Preprocessing.from_dict(meta["preprocessing"]).std)
    onnx = tmp_path / "lite0.onnx"
    export_onnx(Deployable(backbones.with_new_head(base, 2, seed=0).eval(), pre).eval(), pre.size, onnx, 18)
    add_metadata(onnx, {"classes": json.dumps(["ok", "defect"]), "preprocessing": pre.to_json()})
    images = make_dataset(tmp_path / "images", classes=("a", "b", "c"), per_class=6, size=120, seed=3)
    paths = sorted(images.rglob("*.png"))
    with ServerProcess(onnx, name=NAME) as server:
        server.wait_ready(180)
        c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        x = np.stack([pre.load(p) for p in paths])
        binary = infer(c, x, True).as_numpy("probabilities")
        json_ = infer(c, x, False).as_numpy("probabilities")
        r = httpx.post(server.url + "/api/predict", files=[("files", (p.name, p.read_bytes(), "image/png"))
                                                           for p in paths[:4]], timeout=120)
        assert r.status_code == 200, r.text
        upload = [p["label"] for p in r.json()["predictions"]]
        assert server.stop() == 0
    server.cleanup()
    out = tmp_path / "p.jsonl"
    proc = subprocess.run([FINETUNE, "predict", str(onnx), str(images), "--out", str(out), "--batch-size", "5"],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    names = ["ok", "defect"]
    assert [names[i] for i in binary.argmax(1)] == [names[i] for i in json_.argmax(1)] == [rows[str(p)]["label"] for p in paths]
    assert upload == [rows[str(p)]["label"] for p in paths[:4]]
    np.testing.assert_allclose(binary, [[rows[str(p)]["probabilities"][n] for n in names] for p in paths], atol=1e-4)


# ---- issue 32: as an attacker and an operator would try it -------------------------------------------

def server_exit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m deploy.server ARGS` that must exit by itself (a refusal): its exit code and output."""
    return subprocess.run([sys.executable, "-m", "deploy.server", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_an_empty_token_file_stops_the_server_instead_of_turning_auth_off(world, tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    with ServerProcess("champion", "--registry", str(world["registry"]), "--token-file", str(token_file)) as server:
        with pytest.raises(Exception, match=f"exited with code 1 before it was ready: token file {token_file} is "
                                            "empty"):
            server.wait_ready(60)
    server.cleanup()
    refused = server_exit("--registry", str(world["registry"]), "--port", "0", env={"FINETUNE_SERVE_TOKEN": " \n"})
    assert refused.returncode == 1 and "FINETUNE_SERVE_TOKEN holds only whitespace" in refused.stderr


def test_every_interface_without_a_token_is_refused_unless_allowed_and_then_loudly(world, tmp_path):
    refused = server_exit("--registry", str(world["registry"]), "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 1, refused.stderr
    assert "error: refusing to serve on 0.0.0.0 without a token" in refused.stderr and "--allow-unauthenticated" \
        in refused.stderr
    # allowed: a warning first (the empty registry then stops it before it serves anything)
    allowed = server_exit("--registry", str(tmp_path / "empty"), "--host", "0.0.0.0", "--port", "0",
                          "--allow-unauthenticated")
    assert "WITHOUT AUTHENTICATION" in allowed.stderr and "has no champion yet" in allowed.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")  # with a token the same address is fine (stopped by the empty registry too)
    with_token = server_exit("--registry", str(tmp_path / "empty"), "--host", "0.0.0.0", "--port", "0",
                             "--token-file", str(token_file))
    assert "refusing" not in with_token.stderr and "has no champion yet" in with_token.stderr


def test_requests_that_answered_500_with_tracebacks_are_one_line_4xx(world):
    server = world["server"]
    logged = len(server.output())
    infer = "/v2/models/clf/infer"
    ones = ",".join(["1"] * 3 * 32 * 32)
    cases = [
        ("POST", infer, json.dumps({"inputs": [{"name": "image", "shape": [2 ** 62, 3, 64, 64], "datatype": "UINT8",
                                                "data": []}]}), 400),
        ("POST", infer, "[" * 100_000 + "]" * 100_000, 400),
        ("POST", infer, '{"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": ['
         + ones + ']}], "outputs": [{"name": "logits", "parameters": [1]}]}', 400),
        ("GET", "/v2/models/clf/versions/" + "9" * 5000, None, 404),
        ("POST", "/v2/models/clf/versions/" + "9" * 5000 + "/infer", "{}", 404),
    ]
    for method, path, body, status in cases:
        r = httpx.request(method, server.url + path, content=body, timeout=60)
        assert r.status_code == status, (path[:60], r.text[:300])
        assert r.headers["content-type"] == "application/json" and b"\n" not in r.content and list(r.json()) == ["error"]
    still_serving(world)
    assert "Traceback" not in server.output()[logged:]


def raw_exchange(port: int, data: bytes, timeout_s: float = 60.0) -> tuple[bytes, bool]:
    """Send `data` on a raw socket, then read until the server closes: (what it answered, whether it closed)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server closed while we were still sending (the header limit)
            pass
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return answer, True
            if not chunk:
                return answer, True
            answer += chunk


def test_slow_and_huge_headers_are_cut_off(world):
    """Slowloris (40 connections sending half a request) and huge headers: 408 / 431 and the connection closed,
    each waited for on its socket (no sleeps); the server keeps serving."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    server = start(world["registry"], "--poll-s", "0", "--header-timeout-s", "1", "--max-header-bytes", "8192")
    try:
        slow = []
        for _ in range(40):  # each sends the start of a request at once, then nothing more
            slow.append(socket.create_connection(("127.0.0.1", server.port), timeout=60))
            slow[-1].sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")

        def closed_with(sock) -> bytes:
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            sock.close()
            return answer

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(closed_with, slow))
        assert all(a.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in a for a in answers), \
            [a for a in answers if not a.startswith(b"HTTP/1.1 408 ")][:1]
        answer, closed = raw_exchange(server.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20))
        assert closed and answer.startswith(b"HTTP/1.1 431 ") and b"over 8192 bytes" in answer
        r = httpx.get(server.url + "/v2", headers={"X-Big": "a" * 9000})
        assert r.status_code == 431 and r.json() == {"error": "the request's headers are over 8192 bytes"}
        assert httpx.get(server.url + "/v2", headers={"X-Fine": "a" * 7000}).status_code == 200
        assert "Traceback" not in server.output()
    finally:
        assert server.stop() == 0
        server.cleanup()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in KiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def test_huge_image_uploads_stay_within_the_decode_budget_and_memory_comes_back(world, tmp_path):
    """The issue's attack at a smaller size: a 5000x5000 RGBA PNG (a few hundred KB, 95 MiB of pixels), four at
    once. Before: each decode held ~5 copies (~480 MB), concurrently. Now the peak rises by less than the
    --decode-memory-mb budget, an image over the budget gets 413, and RSS falls back after the requests."""
    from concurrent.futures import ThreadPoolExecutor

    big = io.BytesIO()
    Image.new("RGBA", (5000, 5000), (220, 220, 220, 255)).save(big, "PNG")
    server = start(world["registry"], "--poll-s", "0", "--decode-memory-mb", "160")
    try:
        assert httpx.post(server.url + "/api/predict", **upload("w.png", png_bytes())).status_code == 200
        before = rss_kib(server.proc.pid)

        def send(_):
            return httpx.post(server.url + "/api/predict", **upload("big.png", big.getvalue()), timeout=300)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(send, range(4)))
        assert [r.status_code for r in replies] == [200] * 4, replies[0].text
        assert {r.json()["predictions"][0]["label"] for r in replies} == {"bright"}
        after = rss_kib(server.proc.pid)
        assert after["VmHWM"] - before["VmHWM"] < 160 * 1024, (before, after)  # < the budget (old path: ~1.9 GB)
        assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, (before, after)   # given back
        huge = io.BytesIO()
        Image.new("RGBA", (7000, 7000), (220, 220, 220, 255)).save(huge, "PNG")
        r = httpx.post(server.url + "/api/predict", **upload("huge.png", huge.getvalue()), timeout=300)
        assert r.status_code == 413 and "over the server's limit of 160 MiB (--decode-memory-mb)" in r.json()["error"]
    finally:
        assert server.stop() == 0
        server.cleanup()
