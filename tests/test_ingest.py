"""Ingest: sources, deterministic stratified splits, manifests that cannot escape their root."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

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
    s = ingest.assign_splits(df, 0.25, 0.0, ["type"], seed=0, complete=["test"])  # a split folder: the whole split
    assert (s[:2] == "test").all() and (s[2:] == "train").all()
    with pytest.raises(ingest.SourceError, match="stratify_by names column"):
        ingest.assign_splits(df, 0.25, 0.0, ["nope"], seed=0)


def image_tree(root: Path, layout: dict[str, int]) -> Path:
    """`layout`: relative folder -> number of distinct tiny PNGs in it."""
    for k, (folder, n) in enumerate(layout.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (k, i, 7)).save(root / folder / f"{i}.png")
    return root


def test_a_folder_split_up_front_keeps_its_splits_and_draws_only_the_missing_one(tmp_path):
    """Keras / ImageFolder-per-split layout: train/<class>, Valid/<class>, test/<class>; classes are the class
    folders, not the split folders; with no validation folder, validation comes out of train/ only."""
    root = image_tree(tmp_path / "d", {"train/cat": 12, "train/dog": 12, "Valid/cat": 3, "Valid/dog": 3,
                                       "test/cat": 4, "test/dog": 4, "test/emu": 0})
    table = ingest.folder_table(root)
    assert ingest.folder_classes(root) == ["cat", "dog", "emu"]  # an empty class folder is still declared
    assert set(table["label"]) == {"cat", "dog"} and ingest.given_splits(table) == ["test", "val"]
    split = ingest.assign_splits(table, 0.25, 0.1, [], seed=0, complete=ingest.given_splits(table))
    assert (split == table["split"].replace("", "train")).all() and split.value_counts().to_dict() == {
        "train": 24, "test": 8, "val": 6}
    assert table.loc[table["path"] == "Valid/cat/0.png", "split"].item() == "val"

    no_val = image_tree(tmp_path / "e", {"training/a": 20, "training/b": 20, "testing/a": 5, "testing/b": 5})
    table = ingest.folder_table(no_val)
    split = ingest.assign_splits(table, 0.25, 0.1, [], seed=0, complete=ingest.given_splits(table))
    from_train = table["path"].str.startswith("training/")
    assert (split[~from_train] == "test").all()
    assert pd.crosstab(table["label"][from_train], split[from_train]).to_dict("index") == {
        "a": {"train": 18, "val": 2}, "b": {"train": 18, "val": 2}}


def test_split_folder_mistakes_are_named_and_classes_called_like_splits_stay_classes(tmp_path):
    mixed = image_tree(tmp_path / "mixed", {"train/cat": 2, "cat": 2})
    with pytest.raises(ingest.SourceError, match=r"mixes split folders \(train\) with other folders \(cat\)"):
        ingest.folder_table(mixed)
    twice = image_tree(tmp_path / "twice", {"val/cat": 2, "validation/cat": 2, "train/cat": 2})
    with pytest.raises(ingest.SourceError, match=r"both val/ and validation/ name the val split"):
        ingest.folder_table(twice)
    loose = image_tree(tmp_path / "loose", {"train/cat": 2, "test": 3})  # Kaggle's unlabelled test/
    with pytest.raises(ingest.SourceError, match=r"test: 3 image\(s\) directly in the split folder, outside any "
                                                 r"class folder \(e.g. 0.png\)"):
        ingest.folder_table(loose)
    plain = image_tree(tmp_path / "plain", {"train": 3, "test": 3})  # two classes named train and test
    table = ingest.folder_table(plain)
    assert ingest.folder_classes(plain) == ["test", "train"] and "split" not in table.columns


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


def test_hidden_files_and_macos_zip_leftovers_are_not_images_of_the_data_set(tmp_path):
    """What unzipping a macOS archive or browsing with Finder/Jupyter leaves beside the images: never a class,
    never an image (a `._x.png` resource fork does not decode and would fail validation)."""
    root = image_tree(tmp_path / "d", {"cat": 3, "dog": 3, "__MACOSX/cat": 2, ".ipynb_checkpoints": 1,
                                       "cat/.ipynb_checkpoints": 1, "dog/.thumbnails": 1})
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    table = ingest.folder_table(root)
    assert ingest.folder_classes(root) == ["cat", "dog"]
    assert sorted(table["path"]) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]


def test_manifest_split_values_take_the_usual_names_and_refuse_others_by_name(tmp_path):
    root = image_tree(tmp_path / "m", {"imgs": 5})
    (root / "manifest.csv").write_text("path,label,split\nimgs/0.png,a,Train\nimgs/1.png,a,validation\n"
                                       "imgs/2.png,b,TEST\nimgs/3.png,b, valid \nimgs/4.png,b,\n")
    table = ingest.manifest_table(root / "manifest.csv")
    assert table["split"].tolist() == ["train", "val", "test", "val", ""]
    (root / "manifest.csv").write_text("path,label,split\nimgs/0.png,a,holdout\nimgs/1.png,a,train\n")
    with pytest.raises(ingest.SourceError, match=r"manifest.csv: unknown split value\(s\) \['holdout'\]; allowed: "
                                                 r"\['train', 'val', 'test'\]"):
        ingest.manifest_table(root / "manifest.csv")
