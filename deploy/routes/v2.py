"""The Open Inference Protocol (KServe v2) over REST, what tritonclient and KServe speak: health, server and
model metadata, and infer with JSON or binary tensors. The wire format is `deploy.protocol` (pure functions);
the model runs in the `Service`. A URL with `/versions/{version}` addresses the version served, else 404."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deploy import protocol
from deploy.guards import check_token
from deploy.protocol import HEADER_LEN
from deploy.routes.deps import Configured, Served
from deploy.settings import SERVER_NAME, SERVER_VERSION

router = APIRouter()

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


# ---- health ------------------------------------------------------------------------------------------

@router.get("/v2/health/live", tags=["health"], summary="Live: the process answers")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", tags=["health"], summary="Ready: a checked model is loaded")
async def ready(service: Served) -> Response:
    return Response(status_code=200 if service.current is not None else 503)


# ---- metadata ----------------------------------------------------------------------------------------

@router.get("/v2", tags=["metadata"], summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data", "classification"]}


@router.get("/v2/models/{name}", tags=["metadata"], summary="Model metadata: tensors and the version served")
@router.get("/v2/models/{name}/versions/{version}", tags=["metadata"], summary="Model metadata (a version)")
async def model_metadata(service: Served, name: str, version: str | None = None) -> dict:
    return service.model(name, version).metadata()


@router.get("/v2/models/{name}/ready", tags=["health"], summary="Model ready")
@router.get("/v2/models/{name}/versions/{version}/ready", tags=["health"], summary="Model version ready")
async def model_ready(service: Served, name: str, version: str | None = None) -> Response:
    service.model(name, version)
    return Response(status_code=200)


# ---- inference ---------------------------------------------------------------------------------------

@router.post("/v2/models/{name}/infer", tags=["inference"], summary="Infer (KServe v2, JSON or binary tensors)",
             openapi_extra={"requestBody": INFER_BODY})
@router.post("/v2/models/{name}/versions/{version}/infer", tags=["inference"], summary="Infer (a version)",
             openapi_extra={"requestBody": INFER_BODY})
async def infer(request: Request, service: Served, settings: Configured, name: str,
                version: str | None = None) -> Response:
    # decode and check the tensors against the model's inputs, run the model, encode the outputs asked for
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
