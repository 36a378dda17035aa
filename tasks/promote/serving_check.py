"""The infra check before promotion (what TFX calls InfraValidator): can the candidate actually be served?

The promote stage starts the real serving code (`python -m deploy.server`, a subprocess: stages never
import deploy/) on the candidate ONNX file, on a free loopback port, waits until it says it is ready,
sends it real test images both ways a client would (image files to the upload endpoint, and uint8
tensors as KServe v2 binary tensors), and requires the labels the evaluation predicted for those
images. Then it stops the server and checks that it shut down cleanly. A model that does not load,
fails the server's warm-up, answers errors or other labels is never promoted; the report says why.

Also what tests and benchmarks use to run a real server process (`ServerProcess`). Torch-free, and
its HTTP client is the standard library's.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.manifest import read_table
from tasks.preprocess import Preprocessing

log = logging.getLogger(__name__)
HEADER_LEN = "Inference-Header-Content-Length"
MODEL_NAME = "candidate"
MIN_MARGIN = 0.01  # warm-up images: top probability at least this far above the second


class ServingCheckFailed(RuntimeError):
    """The server could not be started or did not answer as it must; the message says what happened."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def error(self) -> str:
        try:
            return str(self.json().get("error"))
        except (ValueError, AttributeError):
            return self.body[:200].decode("utf-8", "replace")


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 30.0, host: str = "127.0.0.1") -> Reply:
    """One HTTP/1.1 request to the server on loopback (standard library only)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with one 'files' part per file; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{safe}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def binary_infer_body(images: np.ndarray, output: str = "probabilities") -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request carrying a uint8 NCHW batch as a binary tensor, asking for `output` in binary."""
    head = json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": images.nbytes}}],
                       "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()
    return head + np.ascontiguousarray(images).tobytes(), {HEADER_LEN: str(len(head)),
                                                           "Content-Type": "application/octet-stream"}


def binary_output(reply: Reply, name: str = "probabilities") -> np.ndarray:
    """The named FP32 output of a binary infer response."""
    n = int(reply.headers.get(HEADER_LEN.lower(), len(reply.body)))
    head, offset = json.loads(reply.body[:n]), n
    for out in head["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out["name"] == name:
            if size is None:
                return np.asarray(out["data"], np.float32).reshape(out["shape"])
            return np.frombuffer(reply.body[offset:offset + size], np.float32).reshape(out["shape"])
        offset += size or 0
    raise ServingCheckFailed(f"the infer response has no output '{name}'")


class ServerProcess:
    """`python -m deploy.server` on a free loopback port, as a context manager: the socket is bound and
    listening here and handed to the child (`--fd`), so there is no race for the port; `wait_ready` polls
    /v2/health/ready while watching the process; leaving the block stops it with SIGTERM."""

    def __init__(self, model: str | Path, *args: str, name: str = MODEL_NAME, env: dict | None = None,
                 cwd: str | Path | None = None):
        self.model, self.args, self.name = str(model), list(args), name
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = tempfile.NamedTemporaryFile(prefix="serving-check-", suffix=".log", delete=False)

    def __enter__(self) -> "ServerProcess":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "deploy.server", "--fd", str(sock.fileno()), "--model", self.model,
               "--name", self.name, *self.args]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd)
        finally:
            sock.close()  # the child holds the socket now; if it dies, connections are refused, not left hanging
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> Reply:
        return http_request(self.port, method, path, body, headers, timeout)

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Until /v2/health/ready answers 200 (seconds it took); ServingCheckFailed if the process exits first
        or the time runs out. Between polls it waits on the process itself, so an exit is seen at once."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServingCheckFailed(f"the server exited with code {code} before it was ready: {self.reason()}")
            try:
                if self.request("GET", "/v2/health/ready", timeout=5).status == 200:
                    return time.monotonic() - started
            except OSError:
                pass  # not accepting yet (the model is loading)
            if time.monotonic() > deadline:
                raise ServingCheckFailed(f"the server was not ready within {timeout_s:.0f} s: {self.reason()}")
            try:
                self.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (in-flight requests finish), then SIGKILL after `timeout_s`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def reason(self) -> str:
        """The server's own last words: its `error:` line, else the last log line."""
        lines = [line for line in self.output().splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        return errors[-1] if errors else (lines[-1][-500:] if lines else "no output")

    def cleanup(self) -> None:
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


def pick_warmup(predictions_csv: str | Path, images_dir: str | Path, n: int = 8) -> list[tuple[Path, str]]:
    """Up to `n` test images with the evaluation's label for each: the most confident predictions, taken
    in turn from each predicted class (so every class the model predicts is checked when it can be)."""
    table = read_table(predictions_csv)
    prob_cols = [c for c in table.columns if c.startswith("p_")]
    if table.empty or "predicted" not in table.columns or not prob_cols:
        raise ServingCheckFailed(f"{predictions_csv}: no per-image predictions (path, predicted, p_<class>) to "
                                 "check the served model against")
    probs = np.sort(table[prob_cols].astype(float).to_numpy(), axis=1)
    table = table.assign(margin=probs[:, -1] - (probs[:, -2] if probs.shape[1] > 1 else 0.0))
    clear = table[table["margin"] >= MIN_MARGIN]  # near-ties could flip between PyTorch and ONNX Runtime (parity
    table = clear if not clear.empty else table   # allows 1e-3 on logits): not a serving failure, so left out
    queues = [g.sort_values("margin", ascending=False, kind="stable") for _, g in table.groupby("predicted", sort=True)]
    picked: list[tuple[Path, str]] = []
    for rank in range(max(len(q) for q in queues)):
        for q in queues:
            if rank < len(q) and len(picked) < n:
                row = q.iloc[rank]
                picked.append((Path(images_dir) / row["path"], str(row["predicted"])))
    missing = [str(p) for p, _ in picked if not p.is_file()]
    if missing:
        raise ServingCheckFailed(f"test images named in {predictions_csv} are missing: {missing[:3]}")
    return picked


def check_candidate(onnx_path: str | Path, warmup: list[tuple[Path, str]], timeout_s: float = 180.0) -> dict:
    """Serve `onnx_path` with the real server in a subprocess and require the expected labels for the warm-up
    images, through the upload endpoint and through a KServe v2 binary infer. Returns the report; `passed`
    False with a `reason` when it cannot be served (never raises for a bad model)."""
    report: dict = {"passed": False, "model": str(onnx_path), "images": len(warmup)}
    started = time.monotonic()
    server = ServerProcess(onnx_path, "--poll-s", "0", "--no-access-log", "--log-level", "warning",
                           "--max-files", str(max(1, len(warmup))))
    try:
        with server:
            report["ready_s"] = round(server.wait_ready(timeout_s), 2)
            results = _exercise(server, warmup)
            report["server_exit_code"] = server.stop()
        if report["server_exit_code"] != 0:
            raise ServingCheckFailed(f"the server did not shut down cleanly (exit code {report['server_exit_code']}): "
                                     f"{server.reason()}")
    except (ServingCheckFailed, OSError, ValueError, KeyError) as exc:
        report["reason"] = str(exc) if isinstance(exc, ServingCheckFailed) else f"{type(exc).__name__}: {exc}"
        report["server_log_tail"] = server.output().splitlines()[-20:]
        report["seconds"] = round(time.monotonic() - started, 2)
        server.cleanup()
        return report
    server.cleanup()
    report.update(results)
    wrong = [r for r in results["checked"] if not (r["expected"] == r["upload"] == r["infer"])]
    report["seconds"] = round(time.monotonic() - started, 2)
    if wrong:
        first = wrong[0]
        report["reason"] = (f"{len(wrong)} of {len(warmup)} test images got other labels from the server than the "
                            f"evaluation predicted, e.g. {first['path']}: evaluation '{first['expected']}', upload "
                            f"endpoint '{first['upload']}', v2 infer '{first['infer']}'")
        return report
    report["passed"] = True
    report["reason"] = (f"served by the real server (ready in {report['ready_s']} s); {len(warmup)} test images got "
                        "the evaluation's labels through the upload endpoint and a KServe v2 binary infer")
    return report


def _exercise(server: ServerProcess, warmup: list[tuple[Path, str]]) -> dict:
    """The warm-up requests: both endpoints, every image; labels per image."""
    info = server.request("GET", "/api/model")
    if info.status != 200:
        raise ServingCheckFailed(f"GET /api/model answered {info.status}: {info.error()}")
    model = info.json()
    meta = server.request("GET", f"/v2/models/{server.name}")
    if meta.status != 200:
        raise ServingCheckFailed(f"GET /v2/models/{server.name} answered {meta.status}: {meta.error()}")
    classes, pre = model["classes"], Preprocessing.from_dict(model["preprocessing"])
    files = [(p.name, p.read_bytes()) for p, _ in warmup]
    body, content_type = multipart(files, {"top_k": "1"})
    t0 = time.perf_counter()
    upload = server.request("POST", "/api/predict", body, {"Content-Type": content_type})
    upload_ms = (time.perf_counter() - t0) * 1000
    if upload.status != 200:
        raise ServingCheckFailed(f"POST /api/predict answered {upload.status}: {upload.error()}")
    upload_labels = [p["label"] for p in upload.json()["predictions"]]
    images = np.stack([pre.load(p) for p, _ in warmup])
    body, headers = binary_infer_body(images)
    t0 = time.perf_counter()
    infer = server.request("POST", f"/v2/models/{server.name}/infer", body, headers)
    infer_ms = (time.perf_counter() - t0) * 1000
    if infer.status != 200:
        raise ServingCheckFailed(f"POST /v2/models/{server.name}/infer answered {infer.status}: {infer.error()}")
    infer_labels = [classes[i] for i in binary_output(infer).argmax(axis=1)]
    checked = [{"path": str(p), "expected": want, "upload": up, "infer": inf}
               for (p, want), up, inf in zip(warmup, upload_labels, infer_labels)]
    return {"version": model["version"], "sha256": model["sha256"], "classes": classes, "checked": checked,
            "upload_ms": round(upload_ms, 1), "infer_ms": round(infer_ms, 1)}
