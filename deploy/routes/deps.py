"""What a handler gets from the app `create_app` built, as FastAPI dependencies on `app.state`: a handler that
names a parameter `service: Served` gets the one `Service`, `settings: Configured` the server's settings and
`metrics: Measured` its Prometheus metrics. (Async, so no thread hop per request.)"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from deploy.observability import Metrics
from deploy.service import Service
from deploy.settings import Settings


async def service_of(request: Request) -> Service:
    return request.app.state.service


async def settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def metrics_of(request: Request) -> Metrics:
    return request.app.state.metrics


Served = Annotated[Service, Depends(service_of)]
Configured = Annotated[Settings, Depends(settings_of)]
Measured = Annotated[Metrics, Depends(metrics_of)]
