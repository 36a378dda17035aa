"""The web page and what it calls: upload image files, get top-k labels (the same decode path as training);
the served model's version, classes, preprocessing, lineage and model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.datastructures import UploadFile

from deploy.guards import check_token
from deploy.protocol import V2Error
from deploy.routes.deps import Configured, Served

router = APIRouter()
UI_PAGE = Path(__file__).parents[1] / "ui" / "index.html"
UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1}}}}},
}


@router.post("/api/predict", tags=["inference"], summary="Upload images, get top-k labels",
             openapi_extra={"requestBody": UPLOAD_BODY})
async def predict(request: Request, service: Served, settings: Configured, top_k: int | None = None) -> dict:
    # uploaded files -> preprocess (decoding, in a thread) -> predict -> top-k labels per file
    check_token(request, settings.token)
    model = service.current  # captured once, as in infer
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise V2Error(415, "send the images as multipart/form-data, one 'files' part per image")
    names, images, top_k = await read_uploads(request, service, model, settings.max_files, top_k)
    k = top_k if top_k is not None else settings.top_k
    if k < 1:
        raise V2Error(400, f"top_k must be at least 1, got {k}")
    _, probs = await service.predict(model, images)
    return {"model_name": model.name, "model_version": model.version,
            "predictions": service.postprocess(model, names, probs, k)}


async def read_uploads(request: Request, service, model, max_files: int, top_k: int | None
                       ) -> tuple[list[str], np.ndarray, int | None]:
    """The multipart form's files decoded one by one (a file's bytes are read just before its decode: the parser
    keeps parts over 1 MB on disk), and top_k (the query's, else the form's field)."""
    async with request.form(max_files=max_files, max_fields=8) as form:
        parts = form.getlist("files") + form.getlist("file")
        if form.get("top_k") is not None and top_k is None:
            top_k = _as_int(form.get("top_k"), "top_k")
        if not parts:
            raise V2Error(400, "no images: send one or more 'files' parts (multipart/form-data)")
        if not all(isinstance(part, UploadFile) for part in parts):
            raise V2Error(400, "each 'files' part must be a file, not a text field")
        names = [part.filename or "<upload>" for part in parts]
        images = [await service.preprocess_one(model, name, await part.read()) for name, part in zip(names, parts)]
    return names, np.stack(images), top_k


def _as_int(value, name: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise V2Error(400, f"{name} must be an integer, got {value!r}") from None


@router.get("/api/model", tags=["metadata"], summary="The served model: version, classes, lineage, model card, drift")
async def model_info(service: Served, settings: Configured) -> dict:
    info = service.current.info()
    info["last_swap"] = service.last_swap
    info["auth"] = settings.token is not None
    info["top_k"] = settings.top_k
    info["drift"] = service.monitor.state() if service.monitor is not None else {"enabled": False}
    return info


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"))
