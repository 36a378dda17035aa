"""Scale-out on Prefect's Dask task runner: probing images and batch prediction, chunk by chunk.

The embarrassingly parallel work of this project is per image: probing (read, sha256, decode,
size and mode: what validation checks) and prediction with an exported model. Each flow here
splits its list of files into chunks, maps one task per chunk, and gathers the results in input
order, so the output is identical whatever runs the tasks: Prefect's default thread pool, a local
Dask cluster (`dask_workers` processes, one thread each: decoding is CPU-bound Python/C that holds
the GIL part of the time), or an existing Dask scheduler (`dask_address`; its workers need this
project importable and PREFECT_API_URL set, since they report task runs).

The per-image code is the shared one: `tasks.images.probe_image` (what ingest records and
validation judges) and `tasks.inference.OnnxClassifier` (what serving and the gate use).

The lists of files and the results go through files, not flow parameters: Prefect stores a flow
run's parameters in its database, and 20,000 paths do not belong there.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from tasks.files import atomic_path
from tasks.images import IMAGE_EXTENSIONS, probe_image

CHUNK = 500


def task_runner(workers: int, address: str | None = None):
    """A Dask task runner: on `address` if given, else a local cluster of `workers` processes;
    None (Prefect's default thread pool) when neither is asked for."""
    if not address and workers <= 0:
        return None
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # silence_logs: the cluster's own chatter stays quiet, in its worker processes too; at shutdown a worker's
    # heartbeat can race the closing scheduler and log a CommClosedError traceback (seen in CI) that is no error of
    # the run's. The scheduler runs in this process, where Dask leaves its loggers at INFO: its "Batched Comm Closed"
    # at shutdown is an INFO record with a traceback (seen once in 20 `make test` runs), so here too only warnings
    # and errors of the cluster are printed. Task failures still reach the flow as exceptions.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": None,
                                          "silence_logs": logging.CRITICAL})


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _read_list(path: str | Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def write_list(path: str | Path, items: list[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{s}\n" for s in items), encoding="utf-8")
    return Path(path)


# ---- probing ------------------------------------------------------------------------------------


@task(name="probe-chunk", cache_policy=NO_CACHE)
def probe_chunk(sources: list[str], max_pixels: int) -> list[dict]:
    return [probe_image(s, max_pixels) for s in sources]


@flow(name="probe-images")
def probe_images(sources_file: str, out_file: str, max_pixels: int, chunk_size: int = CHUNK) -> int:
    """Probe every image listed in `sources_file` (one path a line); write the rows, in input order, as
    JSON lines to `out_file`. Returns the number of images."""
    sources = _read_list(sources_file)
    futures = probe_chunk.map(_chunks(sources, chunk_size), unmapped(max_pixels))
    with atomic_path(out_file) as tmp, tmp.open("w", encoding="utf-8") as f:
        for future in futures:
            for row in future.result():
                f.write(json.dumps(row) + "\n")
    return len(sources)


def probe_all(sources: list[str], max_pixels: int, workers: int, address: str | None = None,
              scratch: Path | None = None, chunk_size: int = CHUNK) -> list[dict]:
    """`tasks.ingest.probe_all`'s rows, computed by the `probe-images` flow on Dask."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=scratch, prefix=".probe-") as tmp:
        listed = write_list(Path(tmp) / "sources.txt", sources)
        out = Path(tmp) / "probes.jsonl"
        flow_ = probe_images.with_options(task_runner=task_runner(workers, address))
        flow_(str(listed), str(out), max_pixels, chunk_size)
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


# ---- batch prediction ---------------------------------------------------------------------------

_MODELS: dict[str, object] = {}  # one loaded model per worker process


def _classifier(model: str):
    from tasks.inference import OnnxClassifier

    if model not in _MODELS:
        _MODELS[model] = OnnxClassifier(model, threads=1)
    return _MODELS[model]


@task(name="predict-chunk", cache_policy=NO_CACHE)
def predict_chunk(model: str, sources: list[str], max_pixels: int) -> list[dict]:
    clf = _classifier(model)
    rows = []
    for p in clf.predict_files(sources, workers=1, max_pixels=max_pixels):
        probs = p.probabilities
        rows.append({"path": p.path,
                     "label": clf.classes[int(probs.argmax())] if probs is not None else "",
                     **{f"p_{c}": (f"{float(probs[i]):.6f}" if probs is not None else "") for i, c in enumerate(clf.classes)},
                     "error": p.error or ""})
    return rows


def list_images(folder: str | Path) -> list[str]:
    """Every image file under `folder` (recursively, the extensions ingest accepts), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())


@flow(name="batch-predict")
def batch_predict(model: str, images: str, out: str, max_pixels: int = 50_000_000, chunk_size: int = CHUNK) -> dict:
    """Predict every image under the folder `images` with the ONNX `model`; write a CSV to `out`
    (path, label, one probability column per class, error), rows in sorted path order."""
    sources = list_images(images)
    futures = predict_chunk.map(unmapped(model), _chunks(sources, chunk_size), unmapped(max_pixels))
    rows = [row for future in futures for row in future.result()]
    columns = ["path", "label", *[k for k in (rows[0] if rows else {}) if k.startswith("p_")], "error"]
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(1 for r in rows if r["error"])
    return {"images": len(rows), "failed": failed, "out": str(out)}


def predict(model: str, images: str, out: str, workers: int = 0, address: str | None = None,
            max_pixels: int = 50_000_000, chunk_size: int = CHUNK) -> dict:
    return batch_predict.with_options(task_runner=task_runner(workers, address))(model, images, out, max_pixels,
                                                                                chunk_size)
