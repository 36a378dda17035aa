"""The model server: the Open Inference Protocol (KServe v2) REST API on FastAPI + uvicorn, an upload
endpoint and a web page, for one exported classifier that follows the registry's champion.

    python -m deploy.server --model champion --registry registry --port 8000   (or `finetune serve`)

Routes (docs/serving.md has examples):

    GET  /v2/health/live, /v2/health/ready          200 when live / when a model is loaded
    GET  /v2                                        server metadata (extensions: binary_tensor_data, classification)
    GET  /v2/models/{name}[/versions/{v}]           model metadata: inputs/outputs, the version served
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer     JSON tensors or binary tensors (Inference-Header-Content-Length)
    POST /api/predict                               multipart image files -> top-k labels (same decode as training)
    GET  /api/model                                 version, classes, preprocessing, lineage, model card
    POST /admin/reload                              check the champion now (hot swap)
    GET  /metrics                                   Prometheus
    GET  /                                          the web page;  GET /openapi.json: the OpenAPI schema

Errors are `{"error": "..."}` with a 4xx status (5xx only for the server's own failures), and the server
keeps serving. With a token (FINETUNE_SERVE_TOKEN or --token-file), infer, predict and admin routes need
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException

from deploy import protocol
from deploy.batching import Runner
from deploy.observability import AccessLog, Metrics, configure_logging
from deploy.protocol import HEADER_LEN, V2Error
from deploy.service import Service, Source
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.inference import ModelError
from tasks.registry import RegistryError

log = logging.getLogger("deploy.server")
SERVER_NAME = "finetune-serving"
SERVER_VERSION = "0.1.0"
UI_PAGE = Path(__file__).parent / "ui" / "index.html"
TOKEN_ENV = "FINETUNE_SERVE_TOKEN"


@dataclass(frozen=True)
class Settings:
    """Everything `python -m deploy.server` / `finetune serve` can set (`--help` documents each)."""

    model: str = "champion"
    registry: Path = Path("registry")
    precision: str = "fp32"
    name: str = "classifier"
    host: str = "127.0.0.1"
    port: int = 8000
    fd: int | None = None
    token: str | None = None
    max_body_bytes: int = 64 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64
    top_k: int = 3
    batching: bool = False
    max_batch: int = 32
    batch_delay_ms: float = 0.0
    concurrency: int | None = None  # None: one model call per core (measured best on CPU: docs/serving.md)
    threads: int | None = None      # None: cores / concurrency
    poll_s: float = 1.0
    log_level: str = "info"
    log_format: str = "json"
    access_log: bool = True


class BodyLimit:
    """Pure ASGI: 413 `{"error"}` for a declared Content-Length over the limit, before reading anything, and
    for a streamed body once it grows past it. (Starlette's own limiter answers text/plain, bypassing the
    JSON error handlers.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": f"request body of {declared} bytes is over the limit of "
                                              f"{self.max_bytes} bytes"}, status_code=413)
            return await response(scope, receive, send)
        total = 0

        async def limited_receive():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:  # raised inside the route: the V2Error handler answers
                    raise V2Error(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def check_token(request: Request, token: str | None) -> None:
    """Bearer-token auth for infer, predict and admin routes (nothing to check without a token)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise V2Error(401, "this route needs a bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise V2Error(401, "the bearer token is not valid")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


INFER_BODY = {  # OpenAPI: the body is read by hand (tritonclient sends no Content-Type), so describe it here
    "required": True,
    "description": "A KServe v2 inference request. With binary tensors, the JSON part is followed by the raw "
                   f"tensor bytes and the `{HEADER_LEN}` header gives the JSON part's length.",
    "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "description": "binary_data_output: bool"},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                       "properties": {"name": {"type": "string", "example": "image"},
                                      "shape": {"type": "array", "items": {"type": "integer"}, "example": [1, 3, 224, 224]},
                                      "datatype": {"type": "string", "example": "UINT8"},
                                      "parameters": {"type": "object", "description": "binary_data_size: int"},
                                      "data": {"type": "array", "items": {}}}}},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object",
                                                           "description": "binary_data: bool, classification: int"}}}},
        }}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1}}}}},
}


def create_app(service: Service, settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app around a loaded `Service`: routes hand off to it; the lifespan starts the model runner
    and the champion watcher and stops them."""
    metrics = metrics or Metrics()
    metrics.served(service.current)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.runner.start()
        watcher = asyncio.create_task(service.watch(settings.poll_s)) if settings.poll_s > 0 else None
        log.info("serving %s version %s (%s) from %s on the KServe v2 protocol", service.current.name,
                 service.current.version, service.current.precision, service.source.describe(),
                 extra={"event": "start", "runner": service.runner.describe(), "precision": service.current.precision})
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await service.runner.stop()

    app = FastAPI(title="finetune model server", version=SERVER_VERSION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=__doc__.split("\n\n")[0])
    app.state.service, app.state.metrics = service, metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)

    @app.exception_handler(V2Error)
    async def v2_error(request: Request, exc: V2Error):
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not "
                   f"allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server logged it")

    # ---- health and metadata ----------------------------------------------------------------

    @app.get("/v2/health/live", tags=["health"], summary="Live: the process answers")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["health"], summary="Ready: a checked model is loaded")
    async def ready() -> Response:
        return Response(status_code=200 if service.current is not None else 503)

    @app.get("/v2", tags=["metadata"], summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data", "classification"]}

    @app.get("/v2/models/{name}", tags=["metadata"], summary="Model metadata: tensors and the version served")
    @app.get("/v2/models/{name}/versions/{version}", tags=["metadata"], summary="Model metadata (a version)")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        return service.model(name, version).metadata()

    @app.get("/v2/models/{name}/ready", tags=["health"], summary="Model ready")
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["health"], summary="Model version ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        service.model(name, version)
        return Response(status_code=200)

    # ---- inference -------------------------------------------------------------------------------

    @app.post("/v2/models/{name}/infer", tags=["inference"], summary="Infer (KServe v2, JSON or binary tensors)",
              openapi_extra={"requestBody": INFER_BODY})
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["inference"], summary="Infer (a version)",
              openapi_extra={"requestBody": INFER_BODY})
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        check_token(request, settings.token)
        model = service.model(name, version)  # captured once: a hot swap during this request does not affect it
        body = protocol.decompress(await request.body(), request.headers.get("content-encoding"),
                                   settings.max_body_bytes)
        payload, tail = protocol.split_body(body, request.headers.get(HEADER_LEN))
        feeds = protocol.decode_inputs(payload, tail, model.inputs, model.name)
        wanted = protocol.requested_outputs(payload, model.outputs)
        results = await service.infer(model, feeds)
        content, headers = protocol.encode_response(payload, wanted, results, model.outputs, model.classes,
                                                    model.name, model.version)
        return Response(content, headers=headers)

    @app.post("/api/predict", tags=["inference"], summary="Upload images, get top-k labels",
              openapi_extra={"requestBody": UPLOAD_BODY})
    async def predict(request: Request, top_k: int | None = None) -> dict:
        check_token(request, settings.token)
        model = service.current  # captured once, as in infer
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise V2Error(415, "send the images as multipart/form-data, one 'files' part per image")
        async with request.form(max_files=settings.max_files, max_fields=8) as form:
            parts = form.getlist("files") + form.getlist("file")
            if form.get("top_k") is not None and top_k is None:
                top_k = _as_int(form.get("top_k"), "top_k")
            if not parts:
                raise V2Error(400, "no images: send one or more 'files' parts (multipart/form-data)")
            files = []
            for part in parts:
                if not isinstance(part, UploadFile):
                    raise V2Error(400, "each 'files' part must be a file, not a text field")
                files.append((part.filename or "<upload>", await part.read()))
        k = top_k if top_k is not None else settings.top_k
        if k < 1:
            raise V2Error(400, f"top_k must be at least 1, got {k}")
        images = await run_in_threadpool(service.preprocess, model, files)
        _, probs = await service.predict(model, images)
        return {"model_name": model.name, "model_version": model.version,
                "predictions": service.postprocess(model, [f[0] for f in files], probs, k)}

    @app.get("/api/model", tags=["metadata"], summary="The served model: version, classes, lineage, model card")
    async def model_info() -> dict:
        info = service.current.info()
        info["last_swap"] = service.last_swap
        info["auth"] = settings.token is not None
        info["top_k"] = settings.top_k
        return info

    @app.post("/admin/reload", tags=["admin"], summary="Check the model source now and hot-swap if it changed")
    async def reload(request: Request) -> dict:
        check_token(request, settings.token)
        outcome = await service.refresh(force=True)
        if outcome.get("error"):
            raise V2Error(409, f"the new model was not swapped in: {outcome['error']}; still serving "
                               f"version {outcome['version']}")
        return outcome

    # ---- operators and people ----------------------------------------------------------------

    @app.get("/metrics", tags=["metadata"], summary="Prometheus metrics")
    async def prometheus(request: Request) -> Response:
        content, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(content, headers={"Content-Type": content_type})

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"))

    return app


def _as_int(value, name: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise V2Error(400, f"{name} must be an integer, got {value!r}") from None


# ---- running ---------------------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now (port 0: a free port): clients that connect before uvicorn runs wait in the backlog
    instead of being refused, and no other process can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def build_service(settings: Settings, metrics: Metrics) -> Service:
    cores = os.cpu_count() or 1
    concurrency = settings.concurrency or cores
    threads = settings.threads or max(1, cores // concurrency)
    runner = Runner(concurrency, settings.batching, settings.max_batch, settings.batch_delay_ms / 1000,
                    on_batch=metrics.observe_batch)
    return Service(Source.parse(settings.model, settings.registry, settings.precision), settings.name, runner,
                   threads=threads, max_pixels=settings.max_pixels, on_swap=metrics.swapped)


def serve(settings: Settings) -> None:
    """Load and check the model, then serve until SIGINT/SIGTERM (in-flight requests finish first)."""
    sock = socket.socket(fileno=settings.fd) if settings.fd is not None else bind_socket(settings.host, settings.port)
    metrics = Metrics()
    service = build_service(settings, metrics)
    app = create_app(service, settings, metrics)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d", host if ":" not in host else f"[{host}]", port,
             extra={"event": "listening", "host": host, "port": port})
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                            server_header=False)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal with the handler it found; a
    # no-op handler lets the process exit 0 after a clean shutdown instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run(sockets=[sock])


def build_parser(prog: str = "python -m deploy.server") -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog="docs/serving.md: the protocol, hot swap, metrics, containers, Triton, KServe.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", "-m", default=d.model, help="what to serve: 'champion' (follows the registry's champion alias: a "
      "promotion or rollback hot-swaps the model), a registry version (3, v3, v0003), or an ONNX file exported by "
      "this pipeline (followed too: a new file written over it is swapped in)")
    a("--registry", "-r", type=Path, default=d.registry, help="the model registry folder")
    a("--precision", choices=["fp32", "int8"], default=d.precision, help="which of a registry version's models: "
      "fp32 (model.onnx, what the gates judged) or int8 (model.int8.onnx, 1.6-1.8x the requests/s on a 2-core AMD "
      "EPYC: docs/serving.md; the export keeps it only within export.int8_max_accuracy_drop of fp32 on the test "
      "split; a version without one is served in fp32, with a warning). For --model FILE, give the file to serve")
    a("--name", default=d.name, help="the model's name in the protocol's URLs (/v2/models/NAME/...)")
    a("--host", default=d.host, help="interface to bind; 0.0.0.0 for every interface (containers)")
    a("--port", type=int, default=d.port, help="TCP port; 0 picks a free one (logged)")
    a("--fd", type=int, default=None, help="serve on this already bound, listening socket instead of --host/--port")
    a("--token-file", type=Path, default=None, help=f"require 'Authorization: Bearer <token>' on infer, predict and "
      f"admin routes, the token read from this file (or from ${TOKEN_ENV}); health, metadata, metrics and the page "
      "stay open")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (also once decompressed); "
      "larger ones get 413")
    a("--max-pixels", type=int, default=d.max_pixels, help="largest uploaded image (width x height); larger get 400")
    a("--max-files", type=int, default=d.max_files, help="most images in one upload")
    a("--top-k", type=int, default=d.top_k, help="labels returned per uploaded image unless the request says")
    a("--batching", action=argparse.BooleanOptionalAction, default=d.batching, help="merge concurrent requests into "
      "one model call (micro-batching); see docs/serving.md for when it pays")
    a("--max-batch", type=int, default=d.max_batch, help="most images in one model call")
    a("--batch-delay-ms", type=float, default=d.batch_delay_ms, help="with --batching, wait up to this long for more "
      "requests to join a batch (0: take what is waiting)")
    a("--concurrency", type=int, default=None, help="model calls that run at once (default: one per core)")
    a("--threads", type=int, default=None, help="ONNX Runtime threads per model call (default: cores / concurrency, "
      "so 1 by default)")
    a("--poll-s", type=float, default=d.poll_s, help="check the champion alias (or the model file) for changes "
      "every this many seconds (a stat, no read); 0 turns the watcher off (POST /admin/reload still works)")
    a("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"], help="log level")
    a("--log-format", default=d.log_format, choices=["json", "text"], help="log lines as JSON objects or text")
    a("--access-log", action=argparse.BooleanOptionalAction, default=d.access_log, help="one log line per request")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read the token file {args.token_file} ({exc.strerror})") from None
    token = token or os.environ.get(TOKEN_ENV, "").strip() or None
    for key in ("max_body_bytes", "max_pixels", "max_files", "top_k", "max_batch", "concurrency", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be at least 1, got {value}")
    if args.batch_delay_ms < 0 or args.poll_s < 0:
        raise SystemExit("error: --batch-delay-ms and --poll-s cannot be negative")
    return Settings(model=args.model, registry=args.registry, precision=args.precision, name=args.name, host=args.host, port=args.port,
                    fd=args.fd, token=token, max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels,
                    max_files=args.max_files, top_k=args.top_k, batching=args.batching, max_batch=args.max_batch,
                    batch_delay_ms=args.batch_delay_ms, concurrency=args.concurrency, threads=args.threads,
                    poll_s=args.poll_s, log_level=args.log_level, log_format=args.log_format,
                    access_log=args.access_log)


def main(argv: list[str] | None = None, prog: str = "python -m deploy.server") -> int:
    settings = settings_from(build_parser(prog).parse_args(argv))
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    try:
        serve(settings)
    except (ModelError, RegistryError, OSError, ValueError) as exc:  # what a user can fix: one line, exit 1
        log.error("cannot serve: %s", exc, extra={"event": "exit"})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
