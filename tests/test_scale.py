"""Scale-out on Prefect's Dask task runner: the same rows and predictions as the single-process runs
(a real temporary Prefect server, a real local Dask cluster of 2 worker processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import brightness_onnx, make_dataset
from tests.test_cli import finetune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = make_dataset(tmp_path_factory.mktemp("scale") / "images", per_class=30, size=40)
    (folder / "dark" / "empty.png").write_bytes(b"")  # a broken file: an error row, the same either way
    (folder / "bright" / "text.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    """One temporary Prefect server for the tests after the first (which starts its own, as a user's run does):
    PREFECT_API_URL points this process and the `finetune` commands it runs at it, as `finetune prefect up` would."""
    from finetune.local_prefect import prefect_api

    with prefect_api(tmp_path_factory.mktemp("prefect")) as url:
        yield url


def test_dask_probing_gives_ingests_rows_in_ingests_order(images, tmp_path):
    from finetune.local_prefect import prefect_api
    from flows import scale
    from tasks.ingest import probe_all

    sources = sorted(str(p) for p in images.rglob("*.png"))
    threads = probe_all(sources, workers=2, max_pixels=50_000_000)
    with prefect_api(tmp_path):
        on_dask = pd.DataFrame(scale.probe_all(sources, 50_000_000, workers=2, chunk_size=7))
    pd.testing.assert_frame_equal(on_dask, threads)
    assert (~threads["decodes_ok"]).sum() == 2


def test_batch_prediction_on_dask_equals_the_thread_run(images, shared_api, tmp_path):
    from finetune.local_prefect import prefect_api
    from flows.scale import predict

    model = brightness_onnx(tmp_path / "bright.onnx", ["bright", "dark"])
    with prefect_api(tmp_path):
        local = predict(str(model), str(images), str(tmp_path / "threads.csv"), workers=0, chunk_size=9)
        remote = predict(str(model), str(images), str(tmp_path / "dask.csv"), workers=2, chunk_size=9)
    assert local == {**remote, "out": str(tmp_path / "threads.csv")} and local["failed"] == 2
    assert (tmp_path / "threads.csv").read_bytes() == (tmp_path / "dask.csv").read_bytes()
    rows = pd.read_csv(tmp_path / "dask.csv", dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["path", "label", "p_bright", "p_dark", "error"]
    ok = rows[rows["error"] == ""]
    assert (ok["label"] == ok["path"].map(lambda p: Path(p).parent.name)).mean() > 0.8  # the model works


def test_finetune_validate_with_dask_workers_reports_what_the_plain_run_reports(images, shared_api, tmp_path):
    plain = finetune("validate", str(images), "--out", str(tmp_path / "plain"), cwd=tmp_path)
    dask = finetune("validate", str(images), "--out", str(tmp_path / "dask"), "--dask-workers", "2", cwd=tmp_path)
    assert plain.returncode == dask.returncode == 1, dask.stderr[-2000:]  # the broken files fail `decodes`
    assert "Traceback" not in dask.stderr

    def report(folder: str) -> dict:
        data = json.loads((tmp_path / folder / "validation.json").read_text())
        return {k: v for k, v in data.items() if k not in ("time_s", "timings")}

    assert report("dask") == report("plain")
    assert (tmp_path / "dask" / "manifest.csv").read_bytes() == (tmp_path / "plain" / "manifest.csv").read_bytes()


def test_finetune_predict_on_dask_gives_the_labels_of_the_streaming_path(images, shared_api, tmp_path):
    model = brightness_onnx(tmp_path / "bright.onnx", ["bright", "dark"])
    plain = finetune("predict", str(model), str(images), "--out", str(tmp_path / "plain.csv"), "--no-progress",
                     cwd=tmp_path)
    dask = finetune("predict", str(model), str(images), "--out", str(tmp_path / "dask.csv"), "--dask-workers", "2",
                    cwd=tmp_path)
    assert plain.returncode == dask.returncode == 1, dask.stderr[-2000:]  # two unreadable files, rows kept
    assert "2 of 62 files could not be read" in dask.stderr

    def labels(name: str) -> dict:
        rows = pd.read_csv(tmp_path / name, dtype=str, keep_default_na=False)
        return {Path(p).relative_to(images).as_posix(): (lab, err != "") for p, lab, err in
                zip(rows["path"], rows["label"], rows["error"])}

    assert labels("dask.csv") == labels("plain.csv")
    refused = finetune("predict", str(model), str(images / "dark" / "000.png"), "--dask-workers", "2", cwd=tmp_path)
    assert refused.returncode != 0 and "on Dask, predict takes one image folder" in refused.stderr
