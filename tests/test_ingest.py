"""Ingest: sources, deterministic stratified splits, manifests that cannot escape their root."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks import ingest


def test_folder_source_and_stratified_deterministic_split(tiny_folder, tmp_path):
    table = ingest.folder_table(tiny_folder)
    assert set(table["label"]) == {"dark", "bright"} and len(table) == 48
    a = ingest.assign_splits(table, 0.25, 0.125, [], seed=1)
    b = ingest.assign_splits(table.sample(frac=1, random_state=3), 0.25, 0.125, [], seed=1)
    assert (a == b.sort_index()).all()  # independent of input order
    counts = pd.crosstab(table["label"], a)
    assert (counts["test"] == 6).all() and (counts["val"] == 3).all() and (counts["train"] == 15).all()
    c = ingest.assign_splits(table, 0.25, 0.125, [], seed=2)
    assert (a != c).any()  # the seed matters


def test_split_respects_existing_column_and_group_columns(tmp_path):
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(40)], "label": ["x"] * 40,
                       "type": ["mono"] * 20 + ["poly"] * 20, "split": ["test"] * 2 + [""] * 38})
    s = ingest.assign_splits(df, 0.25, 0.0, ["type"], seed=0)
    assert (s[:2] == "test").all()
    by_type = pd.crosstab(df["type"], s)
    assert by_type.loc["poly", "test"] == 5
    with pytest.raises(ingest.SourceError, match="stratify_by names column"):
        ingest.assign_splits(df, 0.25, 0.0, ["nope"], seed=0)


def test_manifest_paths_may_not_escape_the_root(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "list.csv").write_text("path,label\n../secret.png,a\n")
    with pytest.raises(ingest.SourceError, match="is outside the data folder"):
        ingest.manifest_table(tmp_path / "m" / "list.csv")


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(ingest.SourceError, match="data folder not found"):
        ingest.folder_table(tmp_path / "absent")
    (tmp_path / "list.csv").write_text("path,label\n")
    with pytest.raises(ingest.SourceError, match=r"must be a folder of class folders .* not the file .*list.csv; a "
                                                 r"CSV/Parquet table of images is data.source=manifest"):
        ingest.folder_table(tmp_path / "list.csv")
    with pytest.raises(ingest.SourceError, match="manifest not found"):
        ingest.manifest_table(tmp_path / "absent.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ingest.SourceError, match="no images found"):
        ingest.folder_table(tmp_path / "empty")


def test_elpv_labels():
    binary = ingest.elpv_table("binary", 0.5)
    assert len(binary) == 2624
    assert (binary["label"] == "defective").sum() == 106 + 715  # probabilities 2/3 and 1
    four = ingest.elpv_table("four_class", 0.5)
    assert four["label"].value_counts().to_dict() == {"p0": 1508, "p100": 715, "p33": 295, "p67": 106}


def test_run_materialises_images_and_manifest(tiny_folder, tmp_path):
    out = tmp_path / "data"
    ingest.run("folder", str(tiny_folder), "binary", 0.5, 0.25, 0.125, [], 0, 2, out / "images", out / "manifest.csv")
    m = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(m) == 48 and m["decodes_ok"].all()
    assert all((out / "images" / p).is_file() for p in m["path"])
    assert {"sha256", "width", "height", "mode", "bytes", "error"} <= set(m.columns)


def test_elpv_source_is_pinned_by_content(tmp_path):
    repo_pin = Path(__file__).resolve().parents[1] / "sources" / "elpv"
    ingest.check_elpv_source(repo_pin)  # the installed package matches the committed pin
    pin = json.loads((repo_pin / "SOURCE.json").read_text())
    pin["labels_sha256"] = "0" * 64
    (tmp_path / "SOURCE.json").write_text(json.dumps(pin))
    with pytest.raises(ingest.SourceError, match="differs from .*SOURCE.json"):
        ingest.check_elpv_source(tmp_path)
    with pytest.raises(ingest.SourceError, match="not found"):
        ingest.check_elpv_source(tmp_path / "nowhere")


def test_probing_chunk_by_chunk_gives_the_same_rows_in_order(tmp_path):
    from tests.conftest import make_dataset

    folder = make_dataset(tmp_path / "images", per_class=5, size=24)
    (folder / "dark" / "empty.png").write_bytes(b"")
    sources = sorted(str(p) for p in folder.rglob("*.png"))
    whole = ingest.probe_all(sources, workers=2, max_pixels=10_000_000)
    assert len(whole) == len(sources) == 11 and (~whole["decodes_ok"]).sum() == 1
    pd.testing.assert_frame_equal(ingest.probe_all(sources, workers=2, max_pixels=10_000_000, chunk=3), whole)
    assert ingest.probe_all([], workers=2, max_pixels=10_000_000).empty
