"""What a drift alarm does besides the metrics: save the drifted window's images (opt-in) and start the retraining
deployment through the Prefect REST API (plain HTTP: the server imports no prefect).

The trigger (docs/orchestration.md "Drift-triggered retraining") is one request the server makes itself:
`GET {api}/deployments/name/{flow}/{deployment}` for the id, then `POST {api}/deployments/{id}/create_flow_run` with
the parameters `{"trigger": {...}}` (the drift p-values, the window, the model version, where the images went); the
deployment's own parameters (its form, filled with params.yaml's values) fill in the rest. The alarm id is the
idempotency key, so a retried request never starts a second run. At most one request per `cooldown_s`; a failure is
logged, counted and shown on /api/model, and serving goes on.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.files import atomic_dir, write_json

log = logging.getLogger("deploy.retrain")
TIMEOUT_S = 10.0


class Retrainer:
    """Starts a Prefect deployment (`flow/deployment`) with a trigger parameter, at most once per cooldown."""

    def __init__(self, deployment: str, api_url: str | None = None, cooldown_s: float = 3600.0):
        api_url = api_url or os.environ.get("PREFECT_API_URL")
        if not api_url:
            raise ValueError("--drift-retrain needs the Prefect API: --prefect-api-url or $PREFECT_API_URL "
                             "(e.g. http://127.0.0.1:4200/api)")
        flow, _, name = deployment.partition("/")
        if not flow or not name:
            raise ValueError(f"--drift-retrain: '{deployment}' is not FLOW/DEPLOYMENT (e.g. finetune-retrain/nightly)")
        self.deployment, self.api_url, self.cooldown_s = deployment, api_url.rstrip("/"), cooldown_s
        self.last: dict | None = None
        self._last_request = -float("inf")

    def _headers(self) -> dict[str, str]:
        """Prefect Cloud: an API key (bearer); a self-hosted server with basic auth: PREFECT_API_AUTH_STRING."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key := os.environ.get("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {key}"
        elif auth := os.environ.get("PREFECT_API_AUTH_STRING"):
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        return headers

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api_url + path, data=data, method=method, headers=self._headers())
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read() or b"{}")

    def request(self, trigger: dict) -> dict:
        """Start a run of the deployment for this alarm (or say why not); the outcome is also `state()['last']`."""
        now = time.monotonic()
        if now - self._last_request < self.cooldown_s:
            wait = self.cooldown_s - (now - self._last_request)
            self.last = {"ok": False, "status": "cooldown", "at": _now(),
                         "error": f"a retraining was requested {now - self._last_request:.0f} s ago; the next one "
                                  f"may start in {wait:.0f} s (--drift-retrain-cooldown-s)"}
            log.info("drift: no retraining requested: %s", self.last["error"], extra={"event": "retrain"})
            return self.last
        self._last_request = now
        flow, _, name = self.deployment.partition("/")
        key = f"drift-{trigger['model_version']}-{trigger['detected_at']}"
        try:
            deployment = self._call("GET", f"/deployments/name/{urllib.parse.quote(flow)}/{urllib.parse.quote(name)}")
            run = self._call("POST", f"/deployments/{deployment['id']}/create_flow_run",
                             {"parameters": {"trigger": trigger}, "idempotency_key": key, "tags": ["drift"]})
        except (OSError, ValueError, KeyError) as exc:  # URLError/HTTPError are OSErrors
            detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
            self.last = {"ok": False, "status": "failed", "at": _now(), "error": f"{exc} {detail}".strip()}
            self._last_request = -float("inf")  # nothing started: the next alarm may try again
            log.error("drift: could not start %s: %s", self.deployment, self.last["error"],
                      extra={"event": "retrain", "ok": False})
            return self.last
        url = self.api_url.removesuffix("/api") + f"/runs/flow-run/{run['id']}"
        self.last = {"ok": True, "status": "started", "at": _now(), "deployment": self.deployment,
                     "flow_run_id": run["id"], "flow_run_name": run.get("name"), "url": url}
        log.warning("drift: started %s, flow run %s (%s)", self.deployment, run.get("name"), url,
                    extra={"event": "retrain", "ok": True, "flow_run_id": run["id"]})
        return self.last

    def state(self) -> dict:
        return {"deployment": self.deployment, "api": self.api_url, "cooldown_s": self.cooldown_s, "last": self.last}


def save_window(folder: Path, max_images: int, outcome, classes: list[str], version: str) -> dict:
    """The alarming window's images (the model's input, S x S PNGs) and what the model said about each, in a new
    sub-folder `<time>-<version>/` (built aside, renamed into place), while `folder` holds fewer than `max_images`
    images in all. Returns what was saved."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = [i for i in outcome.images if i is not None]
    room = max(0, max_images - sum(1 for _ in folder.rglob("*.png")))
    keep = images[len(images) - min(room, len(images)):]
    if not keep:
        log.warning("drift: images not saved: %s holds %d images already (--drift-save-max)", folder, max_images)
        return {"saved": 0, "folder": None, "note": f"{folder} is full (--drift-save-max {max_images})"}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = folder / f"{stamp}-{version}"
    probabilities = outcome.probabilities[len(outcome.probabilities) - len(keep):]
    rows = []
    with atomic_dir(target) as tmp:
        for i, (image, probs) in enumerate(zip(keep, probabilities)):
            name = f"{i:04d}.png"
            Image.fromarray(np.ascontiguousarray(np.transpose(image, (1, 2, 0)))).save(tmp / name)
            rows.append({"file": name, "predicted": classes[int(np.argmax(probs))],
                         "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs)}})
        write_json(tmp / "window.json", {"model_version": version, "saved_at": _now(),
                                         "drift": outcome.result.to_dict(), "images": rows,
                                         "note": "the model's inputs (resized as the model sees them), newest last; "
                                                 "label them and add them to the data to retrain on them"})
    log.warning("drift: saved %d images of the drifted window in %s", len(keep), target,
                extra={"event": "drift", "saved": len(keep), "folder": str(target)})
    return {"saved": len(keep), "folder": str(target)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
