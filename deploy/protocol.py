"""The Open Inference Protocol (KServe v2) wire format: JSON tensors and the binary tensor data extension.

Pure functions over bytes and numpy arrays (no HTTP, no model): the server's routes call them, the tests
call them directly. What the spec and tritonclient 2.73 do (docs/serving.md has the details):

- A request body is a JSON object, optionally followed by binary tensor data. The header
  `Inference-Header-Content-Length` gives the JSON part's length whenever binary data follows; each input
  with `parameters.binary_data_size` takes its bytes from the tail in the order the inputs are listed
  (little-endian, row-major). Tensor `data` in JSON may be nested or flat.
- A response output is binary when the output asks for it (`parameters.binary_data`), else when the
  request asks for all outputs binary (`parameters.binary_data_output`; tritonclient sets it when it names
  no outputs). `parameters.classification: k` turns an output into the top-k `"value:index:label"`
  strings (Triton's classification extension, datatype BYTES).
- Errors are `{"error": "..."}` with a 4xx status (`V2Error`).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import numpy as np

HEADER_LEN = "Inference-Header-Content-Length"
V2_TO_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
ORT_TO_V2 = {f"tensor({t})": v for t, v in (
    ("bool", "BOOL"), ("uint8", "UINT8"), ("uint16", "UINT16"), ("uint32", "UINT32"), ("uint64", "UINT64"),
    ("int8", "INT8"), ("int16", "INT16"), ("int32", "INT32"), ("int64", "INT64"), ("float16", "FP16"),
    ("float", "FP32"), ("double", "FP64"), ("string", "BYTES"))}


FITS = object()  # _first_misfit: every value fits


class V2Error(Exception):
    """A request the server refuses; rendered as `{"error": message}` with `status` (4xx, or 5xx for ours)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the protocol describes it: -1 for a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def spec_of(node) -> TensorSpec:
    """An ONNX Runtime `NodeArg` -> TensorSpec (symbolic dimensions such as 'batch' become -1)."""
    if node.type not in ORT_TO_V2:
        raise ValueError(f"tensor '{node.name}' has type {node.type}, which the protocol cannot carry")
    return TensorSpec(node.name, ORT_TO_V2[node.type], tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape))


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo `Content-Encoding: gzip|deflate` (tritonclient's request compression), capped at `limit` bytes."""
    if encoding in (None, "", "identity"):
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.strip().lower())
    if wbits is None:
        raise V2Error(415, f"unsupported Content-Encoding '{encoding}': use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2Error(400, f"cannot decompress the {encoding} request body ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise V2Error(413, f"request body is over {limit} bytes once decompressed")
    return out


def split_body(body: bytes, header_len: str | None) -> tuple[dict, memoryview]:
    """The JSON part as a dict and the binary tail (empty without `Inference-Header-Content-Length`)."""
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise V2Error(400, f"{HEADER_LEN} must be an integer, got '{header_len}'") from None
        if not 0 <= n <= len(body):
            raise V2Error(400, f"{HEADER_LEN} {n} is outside the {len(body)}-byte body")
        head, tail = body[:n], memoryview(body)[n:]
    else:
        head, tail = body, memoryview(b"")
    try:
        request = json.loads(head)
    except RecursionError:
        raise V2Error(400, "the request's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        hint = f" (binary data without the {HEADER_LEN} header?)" if header_len is None else ""
        raise V2Error(400, f"the request is not valid JSON: {exc}{hint}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise V2Error(400, "the request must be a JSON object with a non-empty 'inputs' list")
    return request, tail


def decode_inputs(request: dict, tail: memoryview, inputs: dict[str, TensorSpec], model: str
                  ) -> dict[str, np.ndarray]:
    """Check every input against the model's spec (name, datatype exactly, rank, fixed dimensions) and
    return them as numpy arrays (binary ones are views on the body: no copy)."""
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict):
            raise V2Error(400, "each entry of 'inputs' must be a JSON object")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or name not in inputs:
            raise V2Error(400, f"model '{model}' has no input '{name}' (inputs: {sorted(inputs)})")
        if name in feeds:
            raise V2Error(400, f"input '{name}' is given twice")
        spec = inputs[name]
        if datatype != spec.datatype:
            raise V2Error(400, f"input '{name}': datatype {datatype}, expected {spec.datatype}")
        if (not isinstance(shape, list) or len(shape) != len(spec.shape)
                or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 or (w != -1 and s != w)
                       for s, w in zip(shape, spec.shape))):
            raise V2Error(400, f"input '{name}': shape {shape}, expected {list(spec.shape)} (-1: any size)")
        dtype = np.dtype(V2_TO_NUMPY[datatype])
        count = math.prod(shape)  # exact: numpy's product would wrap around for dimensions such as 2**62
        params = parameters_of(tensor, f"input '{name}'")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(tail):
                raise V2Error(400, f"input '{name}': binary_data_size {size} does not match shape {shape} of "
                                   f"{datatype} ({count * dtype.itemsize} bytes) or the {len(tail) - offset} "
                                   "bytes of binary data left")
            array = np.frombuffer(tail[offset:offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
            offset += size
        elif "data" in tensor:
            array = json_tensor(name, tensor["data"], datatype, shape)
        else:
            raise V2Error(400, f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        feeds[name] = array
    if offset != len(tail):
        raise V2Error(400, f"{len(tail) - offset} bytes of binary data after the JSON part belong to no input")
    missing = sorted(set(inputs) - set(feeds))
    if missing:
        raise V2Error(400, f"missing input(s) {missing} for model '{model}'")
    return feeds


def parameters_of(entry: dict, what: str) -> dict:
    """An entry's `parameters`: a JSON object, or nothing."""
    params = entry.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise V2Error(400, f"{what}: 'parameters' must be a JSON object, got {type(params).__name__}")
    return params


def json_tensor(name: str, data, datatype: str, shape: list[int]) -> np.ndarray:
    """JSON `data` (nested or flat) as an array of `datatype` and `shape`, its values checked, never converted: a
    float for an integer tensor, a value out of the type's range, text or a boolean for a number is a 400."""
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise V2Error(400, f"input '{name}': data is not {datatype} ({str(exc).splitlines()[0][:200]})") from None
    count = math.prod(shape)
    if raw.size != count:
        raise V2Error(400, f"input '{name}': {raw.size} values for shape {shape} ({count} expected)")
    dtype = np.dtype(V2_TO_NUMPY[datatype])
    bad = _first_misfit(raw, dtype, data) if raw.size else FITS
    if bad is not FITS:
        takes = {"b": "true or false", "f": "numbers"}.get(dtype.kind) or \
            f"integers from {np.iinfo(dtype).min} to {np.iinfo(dtype).max}"
        shown = bad.item() if isinstance(bad, np.generic) else bad
        raise V2Error(400, f"input '{name}': data is not {datatype} ({datatype} takes {takes}, got {shown!r:.60})")
    return raw.astype(dtype).reshape(shape)


def _first_misfit(raw: np.ndarray, dtype: np.dtype, data):
    """The first value of the request's `data` that `dtype` cannot hold as it is (FITS: all fit). numpy's inferred
    type says whether all fit (a float anywhere makes the array float); only a refusal looks at the values one by
    one, to name the culprit. (numpy counts booleans among integers as 0 and 1: those pass.)"""
    kind = raw.dtype.kind
    if dtype.kind in "iu" and kind in "iu":
        info = np.iinfo(dtype)
        outside = np.flatnonzero((raw < info.min) | (raw > info.max))
        return raw.flat[outside[0]] if outside.size else FITS
    if (dtype.kind == "b" and kind == "b") or (dtype.kind == "f" and kind in "iuf"):
        return FITS
    if dtype.kind == "b":
        fits = lambda v: isinstance(v, bool)
    elif dtype.kind == "f":
        fits = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    else:
        info = np.iinfo(dtype)
        fits = lambda v: isinstance(v, int) and not isinstance(v, bool) and info.min <= v <= info.max
    values = np.asarray(data, dtype=object).reshape(-1)
    return next((v for v in values if not fits(v)), values[0])


def requested_outputs(request: dict, outputs: dict[str, TensorSpec]) -> list[dict]:
    """The outputs to return (all, when the request names none), each as {"name", "parameters"}."""
    wanted = request.get("outputs")
    if wanted is None:
        return [{"name": name, "parameters": {}} for name in outputs]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise V2Error(400, "'outputs' must be a list of JSON objects")
    unknown = [o.get("name") for o in wanted if not isinstance(o.get("name"), str) or o["name"] not in outputs]
    if unknown:
        raise V2Error(400, f"unknown output(s) {str(unknown)[:200]} (outputs: {sorted(outputs)})")
    for o in wanted:
        k = parameters_of(o, f"output '{o['name']}'").get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise V2Error(400, f"output '{o['name']}': classification must be a positive integer, got {k!r}")
    return [{"name": o["name"], "parameters": o.get("parameters") or {}} for o in wanted]


def classify(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-k per row as Triton's `"value:index:label"` strings, shape (batch, k)."""
    flat = values.reshape(values.shape[0], -1)
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return np.array([[f"{float(flat[b, i]):.6g}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in row]
                     for b, row in enumerate(top)], dtype=object).reshape(flat.shape[0], -1)


def encode_response(request: dict, wanted: list[dict], results: dict[str, np.ndarray],
                    outputs: dict[str, TensorSpec], labels: list[str], model: str, version: str
                    ) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs follow the JSON part, in `outputs` order)."""
    params = request.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    entries, chunks = [], []
    for o in wanted:
        p = o["parameters"]
        array, datatype = results[o["name"]], outputs[o["name"]].datatype
        if p.get("classification"):
            array, datatype = classify(array, int(p["classification"]), labels), "BYTES"
        entry: dict = {"name": o["name"], "datatype": datatype, "shape": list(array.shape)}
        if p.get("binary_data", all_binary):
            if datatype == "BYTES":  # each element: its length as uint32 little-endian, then the bytes
                raw = b"".join(len(b).to_bytes(4, "little") + b for b in (str(s).encode() for s in array.flat))
            else:
                raw = np.ascontiguousarray(array, dtype=np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [str(s) for s in array.flat] if datatype == "BYTES" else array.ravel().tolist()
        entries.append(entry)
    body: dict = {"model_name": model, "model_version": version, "outputs": entries}
    if "id" in request:
        body["id"] = request["id"]
    head = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LEN.lower(): str(len(head))}
