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
    GET  /api/model                                 version, classes, preprocessing, lineage, model card, drift
    POST /admin/reload                              check the champion now (hot swap)
    GET  /metrics                                   Prometheus
    GET  /                                          the web page;  GET /openapi.json: the OpenAPI schema

Each URL's handler is in `deploy/routes/` (v2: the protocol; api: upload, model info, the page; ops: metrics,
reload); this module composes them into the app (`create_app`: lifespan, middleware, error handlers, routers)
and runs it. Errors are `{"error": "..."}` with a 4xx status (5xx only for the server's own failures,
`deploy/errors.py`), and the server keeps serving. With a token (FINETUNE_SERVE_TOKEN or --token-file), infer,
predict and admin routes need `Authorization: Bearer <token>` (`deploy/guards.py`); on an address other than
loopback the server refuses to start without one unless --allow-unauthenticated says something in front
authenticates. Connections get a deadline and a size cap for their headers (`deploy/connection.py`); uploads are
decoded within a memory budget (`deploy/decode.py`). What the model sees is monitored for drift against the
reference exported with it (`deploy/monitor.py`; `--drift-*`), and an alarm can start the retraining deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
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
from deploy.connection import limited
from deploy.decode import tune_malloc
from deploy.guards import BodyLimit
from deploy.monitor import Monitor
from deploy.observability import AccessLog, Metrics, configure_logging
from deploy.protocol import V2Error
from deploy.retrain import Retrainer
from deploy.routes import api, ops, v2
from deploy.service import Service, Source
from deploy.settings import SERVER_VERSION, DriftSettings, Settings
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
        if service.monitor is not None:
            service.monitor.close()


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
    d = settings.drift
    retrainer = Retrainer(d.retrain, d.prefect_api_url, d.cooldown_s) if d.enabled and d.retrain else None
    return Service(Source.parse(settings.model, settings.registry, settings.precision), settings.name, runner,
                   threads=threads, max_pixels=settings.max_pixels, decode_memory=settings.decode_memory_mb << 20,
                   on_swap=metrics.swapped, monitor=Monitor(d, metrics, retrainer))


def check_exposure(host: str, settings: Settings) -> None:
    """Without a token, serve on loopback only, unless told that something in front authenticates."""
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if loopback or settings.token is not None:
        return
    if not settings.allow_unauthenticated:
        raise ValueError(f"refusing to serve on {host} without a token: anyone who reaches this address could run "
                         f"the model and reload it. Set ${TOKEN_ENV} or --token-file (clients send 'Authorization: "
                         "Bearer <token>'), or pass --allow-unauthenticated when a gateway in front authenticates")
    log.warning("serving on %s WITHOUT AUTHENTICATION (--allow-unauthenticated): infer, predict and admin routes are "
                "open to anyone who reaches this address", host, extra={"event": "auth", "auth": False, "host": host})


def serve(settings: Settings) -> None:
    """Load and check the model, then serve until SIGINT/SIGTERM (in-flight requests finish first)."""
    sock = socket.socket(fileno=settings.fd) if settings.fd is not None else bind_socket(settings.host, settings.port)
    try:
        check_exposure(sock.getsockname()[0], settings)
    except ValueError:
        sock.close()
        raise
    tune_malloc()
    metrics = Metrics()
    service = build_service(settings, metrics)
    app = create_app(service, settings, metrics)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d", host if ":" not in host else f"[{host}]", port,
             extra={"event": "listening", "host": host, "port": port})
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                            server_header=False, timeout_keep_alive=5,
                            http=limited(settings.header_timeout_s, settings.max_header_bytes))
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
      "stay open. An empty file is refused")
    a("--allow-unauthenticated", action="store_true", help="serve on an address other than loopback without a token "
      "(refused otherwise): only when a gateway, ingress or mesh in front authenticates the clients")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (also once decompressed); "
      "larger ones get 413")
    a("--max-pixels", type=int, default=d.max_pixels, help="largest uploaded image (width x height); larger get 400")
    a("--decode-memory-mb", type=int, default=d.decode_memory_mb, help="memory all uploaded images being decoded at "
      "once may take (MiB; large images are decoded reduced to the model's input size where the format allows); an "
      "image that needs more gets 413, others wait their turn")
    a("--header-timeout-s", type=float, default=d.header_timeout_s, help="a request's headers must arrive within this "
      "many seconds (else 408 and the connection is closed: slowloris)")
    a("--max-header-bytes", type=int, default=d.max_header_bytes, help="largest request line + headers (else 431)")
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
    drift_options(p.add_argument_group("drift monitoring (docs/serving.md)").add_argument, d.drift)
    return p


def drift_options(a, d: DriftSettings) -> None:
    a("--drift", action=argparse.BooleanOptionalAction, default=d.enabled, help="monitor what the model sees against "
      "the reference exported with it (KS tests on its embedding's principal components and on its probabilities)")
    a("--drift-window", type=int, default=d.window, help="the most recent images a drift test looks at")
    a("--drift-every", type=int, default=d.every, help="run a drift test every this many images (in a thread of its "
      "own, off the request path)")
    a("--drift-alpha", type=float, default=d.alpha, help="a test rejects when its p-value (Bonferroni over the "
      "components, the classes and the two detectors) is below this")
    a("--drift-consecutive", type=int, default=d.consecutive, help="rejections in a row that raise the alarm (as many "
      "passes in a row clear it): the false-alarm control over repeated tests")
    a("--drift-save-dir", type=Path, default=d.save_dir, help="save each alarming window's images (the model's input, "
      "PNG) and predictions here, to label them (off by default: they are user data; see docs/serving.md)")
    a("--drift-save-max", type=int, default=d.save_max, help="at most this many images in --drift-save-dir, in all")
    a("--drift-retrain", default=d.retrain, metavar="FLOW/DEPLOYMENT", help="start this Prefect deployment when the "
      "alarm is raised (e.g. finetune-retrain/nightly), with the drift as its `trigger` parameter")
    a("--prefect-api-url", default=d.prefect_api_url, help="the Prefect API for --drift-retrain (default: "
      "$PREFECT_API_URL; $PREFECT_API_KEY or $PREFECT_API_AUTH_STRING authenticate)")
    a("--drift-retrain-cooldown-s", type=float, default=d.cooldown_s, help="at most one retraining request this often")


def drift_settings(args: argparse.Namespace) -> DriftSettings:
    if args.drift_window < 2 or args.drift_every < 1 or args.drift_consecutive < 1 or args.drift_save_max < 1:
        raise SystemExit("error: --drift-window must be at least 2, --drift-every, --drift-consecutive and "
                         "--drift-save-max at least 1")
    if not 0 < args.drift_alpha < 1 or args.drift_retrain_cooldown_s < 0:
        raise SystemExit("error: --drift-alpha must be between 0 and 1, --drift-retrain-cooldown-s not negative")
    return DriftSettings(enabled=args.drift, window=args.drift_window, every=args.drift_every, alpha=args.drift_alpha,
                         consecutive=args.drift_consecutive, save_dir=args.drift_save_dir,
                         save_max=args.drift_save_max, retrain=args.drift_retrain, prefect_api_url=args.prefect_api_url,
                         cooldown_s=args.drift_retrain_cooldown_s)


def read_token(token_file: Path | None) -> str | None:
    """The bearer token from --token-file, else from $FINETUNE_SERVE_TOKEN (unset or empty: none). A token file or
    variable that holds only whitespace is refused: it would silently turn authentication off."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"error: cannot read the token file {token_file} "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        if not token:
            raise SystemExit(f"error: token file {token_file} is empty: write the token into it (authentication "
                             "would be off otherwise)")
        where = f"token file {token_file}"
    else:
        raw = os.environ.get(TOKEN_ENV, "")
        token = raw.strip()
        if raw and not token:
            raise SystemExit(f"error: ${TOKEN_ENV} holds only whitespace: set the token, or unset the variable")
        where = f"${TOKEN_ENV}"
    if token and any(c.isspace() for c in token):
        raise SystemExit(f"error: the token in {where} has whitespace inside: a bearer token cannot carry it")
    return token or None


def settings_from(args: argparse.Namespace) -> Settings:
    token = read_token(args.token_file)
    for key in ("max_body_bytes", "max_pixels", "max_files", "top_k", "max_batch", "concurrency", "threads",
                "decode_memory_mb", "max_header_bytes"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be at least 1, got {value}")
    if args.batch_delay_ms < 0 or args.poll_s < 0 or not args.header_timeout_s > 0:
        raise SystemExit("error: --batch-delay-ms and --poll-s cannot be negative, --header-timeout-s must be positive")
    return Settings(model=args.model, registry=args.registry, precision=args.precision, name=args.name, host=args.host, port=args.port,
                    fd=args.fd, token=token, allow_unauthenticated=args.allow_unauthenticated,
                    max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels,
                    decode_memory_mb=args.decode_memory_mb, header_timeout_s=args.header_timeout_s,
                    max_header_bytes=args.max_header_bytes, max_files=args.max_files, top_k=args.top_k, batching=args.batching, max_batch=args.max_batch,
                    batch_delay_ms=args.batch_delay_ms, concurrency=args.concurrency, threads=args.threads,
                    poll_s=args.poll_s, log_level=args.log_level, log_format=args.log_format,
                    access_log=args.access_log, drift=drift_settings(args))


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
