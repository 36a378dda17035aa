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

Each URL's handler is in `deploy/routes/` (v2: the protocol; api: upload, model info, the page; ops: metrics,
reload); this module composes them into the app (`create_app`: lifespan, middleware, error handlers, routers)
and runs it. Errors are `{"error": "..."}` with a 4xx status (5xx only for the server's own failures,
`deploy/errors.py`), and the server keeps serving. With a token (FINETUNE_SERVE_TOKEN or --token-file), infer,
predict and admin routes need `Authorization: Bearer <token>` (`deploy/guards.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from deploy import errors
from deploy.batching import Runner
from deploy.guards import BodyLimit
from deploy.observability import AccessLog, Metrics, configure_logging
from deploy.protocol import V2Error
from deploy.routes import api, ops, v2
from deploy.service import Service, Source
from deploy.settings import SERVER_VERSION, Settings
from tasks.inference import ModelError
from tasks.registry import RegistryError

log = logging.getLogger("deploy.server")
TOKEN_ENV = "FINETUNE_SERVE_TOKEN"


def create_app(service: Service, settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app around a loaded `Service`: the routers (deploy/routes/) hand off to it; the lifespan starts the
    model runner and the champion watcher and stops them."""
    metrics = metrics or Metrics()
    metrics.served(service.current)
    app = FastAPI(title="finetune model server", version=SERVER_VERSION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=__doc__.split("\n\n")[0])
    app.state.service, app.state.settings, app.state.metrics = service, settings, metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)
    app.add_exception_handler(V2Error, errors.v2_error)
    app.add_exception_handler(HTTPException, errors.http_error)
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    app.add_exception_handler(Exception, errors.unexpected)
    for router in (v2.router, api.router, ops.router):
        app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Start the model runner and (when polling) the champion watcher; at shutdown, stop both."""
    service: Service = app.state.service
    settings: Settings = app.state.settings
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
