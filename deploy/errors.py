"""Every error the server answers is `{"error": "..."}`: 4xx for what the client can fix, 5xx only for the
server's own failures (logged, and the server keeps serving). `create_app` installs these handlers."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from deploy.protocol import V2Error

log = logging.getLogger("deploy.server")  # the server's log lines keep one logger name


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: `where: what` per error."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


async def v2_error(request: Request, exc: V2Error) -> JSONResponse:
    """What the protocol, the guards and the service refuse, with their status and message."""
    return error_response(exc.status, exc.message)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own: no such route (404), a method the route does not take (405)."""
    message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not "
               f"allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A path or query parameter of the wrong type (e.g. `top_k=abc`): 400, not FastAPI's 422."""
    return error_response(400, validation_message(exc))


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is the server's fault: a 500 without the traceback. Starlette re-raises the exception after
    this handler and uvicorn logs its traceback (once: logging it here too gave two per request)."""
    log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
              extra={"event": "error", "path": request.url.path})
    return error_response(500, f"internal error ({type(exc).__name__}); the server logged it")
