"""For operators: Prometheus metrics, and a hot swap on demand (the watcher does the same check every
`--poll-s` seconds)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deploy.guards import check_token
from deploy.protocol import V2Error
from deploy.routes.deps import Configured, Measured, Served

router = APIRouter()


@router.post("/admin/reload", tags=["admin"], summary="Check the model source now and hot-swap if it changed")
async def reload(request: Request, service: Served, settings: Configured) -> dict:
    # 409 when the new model failed its check: the old one stays served
    check_token(request, settings.token)
    outcome = await service.refresh(force=True)
    if outcome.get("error"):
        raise V2Error(409, f"the new model was not swapped in: {outcome['error']}; still serving "
                           f"version {outcome['version']}")
    return outcome


@router.get("/metrics", tags=["metadata"], summary="Prometheus metrics")
async def prometheus(request: Request, metrics: Measured) -> Response:
    content, content_type = metrics.render(request.headers.get("accept", ""))
    return Response(content, headers={"Content-Type": content_type})
