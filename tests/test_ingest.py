"""Ingest: sources, deterministic stratified splits, manifests that cannot escape their root."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks import ingest
from tasks.sources.common import SourceError, given_splits
from tasks.sources.elpv import check_elpv_source, elpv_table
from tasks.sources.folder import folder_classes, folder_table
from tasks.sources.manifest import manifest_table


def test_folder_source_and_stratified_deterministic_split(tiny_folder, tmp_path):
    table = folder_table(tiny_folder)
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
    with pytest.raises(SourceError, match="stratify_by names column"):
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
    table = folder_table(root)
    assert folder_classes(root) == ["cat", "dog", "emu"]  # an empty class folder is still declared
    assert set(table["label"]) == {"cat", "dog"} and given_splits(table) == ["test", "val"]
    split = ingest.assign_splits(table, 0.25, 0.1, [], seed=0, complete=given_splits(table))
    assert (split == table["split"].replace("", "train")).all() and split.value_counts().to_dict() == {
        "train": 24, "test": 8, "val": 6}
    assert table.loc[table["path"] == "Valid/cat/0.png", "split"].item() == "val"

    no_val = image_tree(tmp_path / "e", {"training/a": 20, "training/b": 20, "testing/a": 5, "testing/b": 5})
    table = folder_table(no_val)
    split = ingest.assign_splits(table, 0.25, 0.1, [], seed=0, complete=given_splits(table))
    from_train = table["path"].str.startswith("training/")
    assert (split[~from_train] == "test").all()
    assert pd.crosstab(table["label"][from_train], split[from_train]).to_dict("index") == {
        "a": {"train": 18, "val": 2}, "b": {"train": 18, "val": 2}}


def test_split_folder_mistakes_are_named_and_classes_called_like_splits_stay_classes(tmp_path):
    mixed = image_tree(tmp_path / "mixed", {"train/cat": 2, "cat": 2})
    with pytest.raises(SourceError, match=r"mixes split folders \(train\) with other folders \(cat\)"):
        folder_table(mixed)
    twice = image_tree(tmp_path / "twice", {"val/cat": 2, "validation/cat": 2, "train/cat": 2})
    with pytest.raises(SourceError, match=r"both val/ and validation/ name the val split"):
        folder_table(twice)
    loose = image_tree(tmp_path / "loose", {"train/cat": 2, "test": 3})  # Kaggle's unlabelled test/
    with pytest.raises(SourceError, match=r"test: 3 image\(s\) directly in the split folder, outside any "
                                                 r"class folder \(e.g. 0.png\)"):
        folder_table(loose)
    plain = image_tree(tmp_path / "plain", {"train": 3, "test": 3})  # two classes named train and test
    table = folder_table(plain)
    assert folder_classes(plain) == ["test", "train"] and "split" not in table.columns


def test_manifest_paths_may_not_escape_the_root(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "list.csv").write_text("path,label\n../secret.png,a\n")
    with pytest.raises(SourceError, match="is outside the data folder"):
        manifest_table(tmp_path / "m" / "list.csv")


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(SourceError, match="data folder not found"):
        folder_table(tmp_path / "absent")
    (tmp_path / "list.csv").write_text("path,label\n")
    with pytest.raises(SourceError, match=r"must be a folder of class folders .* not the file .*list.csv; a "
                                                 r"CSV/Parquet table of images is data.source=manifest"):
        folder_table(tmp_path / "list.csv")
    with pytest.raises(SourceError, match="manifest not found"):
        manifest_table(tmp_path / "absent.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        folder_table(tmp_path / "empty")


def test_elpv_labels():
    binary = elpv_table("binary", 0.5)
    assert len(binary) == 2624
    assert (binary["label"] == "defective").sum() == 106 + 715  # probabilities 2/3 and 1
    four = elpv_table("four_class", 0.5)
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
    check_elpv_source(repo_pin)  # the installed package matches the committed pin
    pin = json.loads((repo_pin / "SOURCE.json").read_text())
    pin["labels_sha256"] = "0" * 64
    (tmp_path / "SOURCE.json").write_text(json.dumps(pin))
    with pytest.raises(SourceError, match="differs from .*SOURCE.json"):
        check_elpv_source(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        check_elpv_source(tmp_path / "nowhere")


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
    table = folder_table(root)
    assert folder_classes(root) == ["cat", "dog"]
    assert sorted(table["path"]) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]


def test_manifest_split_values_take_the_usual_names_and_refuse_others_by_name(tmp_path):
    root = image_tree(tmp_path / "m", {"imgs": 5})
    (root / "manifest.csv").write_text("path,label,split\nimgs/0.png,a,Train\nimgs/1.png,a,validation\n"
                                       "imgs/2.png,b,TEST\nimgs/3.png,b, valid \nimgs/4.png,b,\n")
    table = manifest_table(root / "manifest.csv")
    assert table["split"].tolist() == ["train", "val", "test", "val", ""]
    (root / "manifest.csv").write_text("path,label,split\nimgs/0.png,a,holdout\nimgs/1.png,a,train\n")
    with pytest.raises(SourceError, match=r"manifest.csv: unknown split value\(s\) \['holdout'\]; allowed: "
                                                 r"\['train', 'val', 'test'\]"):
        manifest_table(root / "manifest.csv")


def _source_data(name: str, tiny_folder: Path):
    """The data section that reads `name`'s source: the repository's ELPV pin, the tiny folder, or a manifest over
    it."""
    from tasks.params import DataParams

    if name == "elpv":
        return DataParams(source="elpv", path=str(Path(__file__).resolve().parents[1] / "sources" / "elpv"))
    if name == "manifest":
        rows = [{"path": p.relative_to(tiny_folder).as_posix(), "label": p.parent.name}
                for p in sorted(tiny_folder.rglob("*.png"))]
        pd.DataFrame(rows).to_csv(tiny_folder / "list.csv", index=False)
        return DataParams(source="manifest", path=str(tiny_folder), manifest="list.csv")
    return DataParams(source=name, path=str(tiny_folder))


@pytest.mark.parametrize("name", ["elpv", "folder", "manifest"])
def test_every_registered_source_reads_into_the_same_table_shape(name, tiny_folder):
    """The contract each reader keeps (`tasks.sources.readers.READERS`, one per registered source): rows with
    path, label and an existing source file; declared classes (or None: the labels are the classes) holding every
    label; whole splits among the pipeline's splits."""
    from tasks.manifest import SPLITS
    from tasks.sources import SOURCES
    from tasks.sources.readers import READERS, read_source

    assert sorted(READERS) == sorted(SOURCES) == ["elpv", "folder", "manifest"]  # this test covers each one
    table = read_source(_source_data(name, tiny_folder))
    assert {"path", "label", "source"} <= set(table.rows.columns) and len(table.rows) > 0
    assert Path(table.rows["source"].iloc[0]).is_file() and not table.rows["path"].str.startswith("/").any()
    assert set(table.rows["label"]) <= set(table.class_names())
    assert set(table.whole_splits) <= set(SPLITS)
    assert set(SOURCES[name].stratify_by) <= set(table.rows.columns)  # `stratify_by: auto` names its own columns
