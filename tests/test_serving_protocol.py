"""The KServe v2 wire format without HTTP: JSON and binary tensors in, outputs (JSON, binary, classification)
out, and a 4xx error naming the problem for every malformed request."""

from __future__ import annotations

import gzip
import json
import re
import zlib

import numpy as np
import pytest

from deploy.protocol import (
    HEADER_LEN,
    TensorSpec,
    V2Error,
    classify,
    decode_inputs,
    decompress,
    encode_response,
    requested_outputs,
    split_body,
)

INPUTS = {"image": TensorSpec("image", "UINT8", (-1, 3, 2, 2))}
OUTPUTS = {"logits": TensorSpec("logits", "FP32", (-1, 2)), "probabilities": TensorSpec("probabilities", "FP32", (-1, 2))}


def binary_request(arr: np.ndarray, extra: dict | None = None) -> tuple[bytes, str]:
    head = json.dumps({"inputs": [{"name": "image", "shape": list(arr.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": arr.nbytes}}], **(extra or {})}).encode()
    return head + arr.tobytes(), str(len(head))


def decode(body: bytes, header: str | None = None) -> dict[str, np.ndarray]:
    request, tail = split_body(body, header)
    return decode_inputs(request, tail, INPUTS, "m")


def test_json_tensors_nested_or_flat_and_binary_tensors_decode_to_the_same_array():
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)
    nested = json.dumps({"inputs": [{"name": "image", "shape": [2, 3, 2, 2], "datatype": "UINT8",
                                     "data": x.tolist()}]}).encode()
    flat = json.dumps({"inputs": [{"name": "image", "shape": [2, 3, 2, 2], "datatype": "UINT8",
                                   "data": x.ravel().tolist()}]}).encode()
    for got in (decode(nested)["image"], decode(flat)["image"], decode(*binary_request(x))["image"]):
        assert got.dtype == np.uint8 and np.array_equal(got, x)


@pytest.mark.parametrize("tensor, message", [
    ({"name": "img", "shape": [1, 3, 2, 2], "datatype": "UINT8", "data": [0] * 12}, "has no input 'img'"),
    ({"name": "image", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [0] * 12}, "datatype FP32, expected UINT8"),
    ({"name": "image", "shape": [1, 3, 4, 4], "datatype": "UINT8", "data": [0] * 48}, "shape [1, 3, 4, 4], expected [-1, 3, 2, 2]"),
    ({"name": "image", "shape": [3, 2, 2], "datatype": "UINT8", "data": [0] * 12}, "shape [3, 2, 2]"),
    ({"name": "image", "shape": [1, 3, 2, True], "datatype": "UINT8", "data": [0] * 12}, "shape"),
    ({"name": "image", "shape": [1, 3, 2, 2], "datatype": "UINT8", "data": [0] * 11}, "11 values for shape"),
    ({"name": "image", "shape": [1, 3, 2, 2], "datatype": "UINT8", "data": [300] * 12}, "data is not UINT8"),
    ({"name": "image", "shape": [1, 3, 2, 2], "datatype": "UINT8", "data": [[1, 2], [3]]}, "data is not UINT8"),
    ({"name": "image", "shape": [1, 3, 2, 2], "datatype": "UINT8"}, "neither 'data' nor parameters.binary_data_size"),
])
def test_each_bad_tensor_is_a_400_naming_the_problem(tensor, message):
    with pytest.raises(V2Error, match=re.escape(message)) as err:
        decode(json.dumps({"inputs": [tensor]}).encode())
    assert err.value.status == 400


@pytest.mark.parametrize("body, header, message", [
    (b"{not json", None, "not valid JSON"),
    (b"\x00\x01binary", None, "not valid JSON.*without the Inference-Header-Content-Length"),
    (b"[]", None, "JSON object with a non-empty 'inputs' list"),
    (b'{"inputs": []}', None, "non-empty 'inputs' list"),
    (b'{"inputs": [1]}', None, "must be a JSON object"),
    (b'{"inputs": []}', "x", "must be an integer"),
    (b'{"inputs": []}', "999", "outside the 14-byte body"),
])
def test_bad_bodies_are_400s(body, header, message):
    with pytest.raises(V2Error, match=message) as err:
        decode(body, header)
    assert err.value.status == 400


def test_binary_sizes_must_match_the_shape_and_leave_no_bytes_over():
    x = np.zeros((1, 3, 2, 2), np.uint8)
    body, header = binary_request(x)
    with pytest.raises(V2Error, match="binary_data_size 12 does not match .* 11 bytes of binary data left"):
        decode(body[:-1], header)
    with pytest.raises(V2Error, match="2 bytes of binary data after the JSON part belong to no input"):
        decode(body + b"xx", header)
    twice = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 2, 2], "datatype": "UINT8", "data": [0] * 12}] * 2})
    with pytest.raises(V2Error, match="given twice"):
        decode(twice.encode())


def test_compressed_bodies_are_inflated_with_a_cap():
    body = b'{"inputs": []}' * 10
    assert decompress(gzip.compress(body), "gzip", 10_000) == body
    assert decompress(zlib.compress(body), "deflate", 10_000) == body
    with pytest.raises(V2Error, match="over 20 bytes once decompressed") as err:
        decompress(gzip.compress(body), "gzip", 20)
    assert err.value.status == 413
    with pytest.raises(V2Error, match="unsupported Content-Encoding 'br'") as err:
        decompress(body, "br", 10_000)
    assert err.value.status == 415
    with pytest.raises(V2Error, match="cannot decompress"):
        decompress(b"not gzip", "gzip", 10_000)


def outputs_of(request: dict) -> tuple[bytes, dict]:
    results = {"logits": np.array([[1.0, -1.0]], np.float32), "probabilities": np.array([[0.88, 0.12]], np.float32)}
    return encode_response(request, requested_outputs(request, OUTPUTS), results, OUTPUTS, ["ok", "bad"], "m", "v0002")


def test_outputs_json_by_default_binary_when_asked_and_the_id_echoed():
    body, headers = outputs_of({"id": "r1", "inputs": []})
    out = json.loads(body)
    assert headers["content-type"] == "application/json" and out["id"] == "r1" and out["model_version"] == "v0002"
    assert [o["name"] for o in out["outputs"]] == ["logits", "probabilities"]
    assert out["outputs"][1]["data"] == pytest.approx([0.88, 0.12]) and out["outputs"][1]["shape"] == [1, 2]

    body, headers = outputs_of({"inputs": [], "parameters": {"binary_data_output": True},
                                "outputs": [{"name": "probabilities"}, {"name": "logits", "parameters": {"binary_data": False}}]})
    n = int(headers[HEADER_LEN.lower()])
    head = json.loads(body[:n])
    assert headers["content-type"] == "application/octet-stream"
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8} and "data" not in head["outputs"][0]
    assert head["outputs"][1]["data"] == [1.0, -1.0]
    assert np.array_equal(np.frombuffer(body[n:], "<f4"), np.array([0.88, 0.12], np.float32))


def test_classification_extension_gives_top_k_value_index_label_strings():
    body, _ = outputs_of({"inputs": [], "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]})
    out = json.loads(body)["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2]
    assert out["data"] == ["0.88:0:ok", "0.12:1:bad"]
    assert classify(np.array([[0.1, 0.7, 0.2]]), 1, ["a", "b", "c"]).tolist() == [["0.7:1:b"]]
    with pytest.raises(V2Error, match="classification must be a positive integer"):
        requested_outputs({"outputs": [{"name": "logits", "parameters": {"classification": 0}}]}, OUTPUTS)
    with pytest.raises(V2Error, match=r"unknown output\(s\) \['nope'\]"):
        requested_outputs({"outputs": [{"name": "nope"}]}, OUTPUTS)
