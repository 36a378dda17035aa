"""What a request must pass before a handler uses it: the body-size limit (pure ASGI middleware, so it answers
before anything is read) and the bearer token on infer, predict and admin routes."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from deploy.protocol import V2Error


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
