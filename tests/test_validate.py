"""The validate stage over tiny generated image folders: each problem is named, none raises."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune.validate_any import validate_path
from tasks.params import ValidateParams
from tasks.validate import CHECKS, run, validate_manifest

CLASSES = ("a", "b", "c")
PER_CLASS = 20  # 20 per class -> 13 train / 2 val / 5 test with the 0.25/0.10 split
_seed = itertools.count(1)


def noise(mode: str = "RGB", size: tuple[int, int] = (40, 40)) -> Image.Image:
    """A random image: every call gives different bytes, so no accidental duplicates."""
    rng = np.random.default_rng(next(_seed))
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    bands = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    return Image.frombytes(mode, size, rng.integers(0, 256, w * h * bands, dtype=np.uint8).tobytes())


def save(path: Path, img: Image.Image | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or noise()).save(path, **kwargs)
    return path


def good_folder(root: Path, classes=CLASSES, n=PER_CLASS) -> Path:
    for label in classes:
        for i in range(n):
            save(root / label / f"{i:02d}.png")
    return root


def check(outcome, name):
    return outcome.check(name)


def offenders(outcome, name) -> set[str]:
    return {o["item"] for o in outcome.check(name).offending}


def failing(outcome) -> set[str]:
    return {c.name for c in outcome.checks if c.status == "failed"}


@pytest.fixture
def data(tmp_path) -> Path:
    return good_folder(tmp_path / "data")


def test_clean_folder_passes_and_writes_reports(data, tmp_path):
    out = tmp_path / "out"
    outcome = validate_path(data, ValidateParams(), out)

    assert outcome.success, outcome.failures
    assert outcome.failures == [] and outcome.warnings == [] and outcome.quarantined == []
    assert outcome.n_images == len(CLASSES) * PER_CLASS
    assert {c.name for c in outcome.checks} == set(CHECKS)
    assert {c.status for c in outcome.checks} <= {"passed", "skipped"}
    assert check(outcome, "split_fractions").skipped  # validate_path has no configured fractions
    for name in ("manifest.csv", "validation.json", "validation.md", "docs/index.html"):
        assert (out / name).is_file(), name
    results = json.loads((out / "validation.json").read_text())
    assert results["success"] is True and results["n_images"] == 60
    assert "PASSED" in (out / "validation.md").read_text()
    assert not list(out.glob(".*tmp"))  # the docs temp folder was swapped in, not left behind


def test_corrupt_files_fail_decodes_with_their_names(data, tmp_path):
    whole = save(tmp_path / "whole.png").read_bytes()
    (data / "a" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (data / "b" / "empty.jpg").write_bytes(b"")
    (data / "c" / "notes.png").write_text("this is not an image\n")
    out = tmp_path / "out"

    outcome = validate_path(data, ValidateParams(), out)

    assert not outcome.success
    assert offenders(outcome, "decodes") == {"a/truncated.png", "b/empty.jpg", "c/notes.png"}
    assert failing(outcome) == {"decodes"}  # no knock-on failures (leakage of empty hashes, sizes)
    details = {o["item"]: o["detail"] for o in check(outcome, "decodes").offending}
    assert "0 bytes" in details["b/empty.jpg"] and "not an image" in details["c/notes.png"]
    message = " ".join(outcome.failures)
    assert all(name in message for name in ("a/truncated.png", "b/empty.jpg", "c/notes.png"))
    summary = (out / "validation.md").read_text()
    assert "FAILED" in summary and "a/truncated.png" in summary
    results = json.loads((out / "validation.json").read_text())
    decodes = next(e for e in results["expectations"] if e["name"] == "decodes")
    assert decodes["blocking"] and not decodes["success"] and decodes["offending_count"] == 3


def test_cmyk_16bit_rgba_palette_decode_and_pass(data, tmp_path):
    save(data / "a" / "cmyk.jpg", noise("CMYK"), quality=90)
    save(data / "a" / "deep.png", noise("I;16"))
    save(data / "b" / "alpha.png", noise("RGBA"))
    save(data / "c" / "palette.png", noise().convert("P"))

    outcome = validate_path(data, ValidateParams(), tmp_path / "out")

    assert outcome.success, outcome.failures
    modes = dict(zip(outcome.manifest["path"], outcome.manifest["mode"]))
    assert modes["a/cmyk.jpg"] == "CMYK" and modes["b/alpha.png"] == "RGBA" and modes["c/palette.png"] == "P"
    assert modes["a/deep.png"] in ("I;16", "I")


def test_exif_rotated_jpeg_is_reported_upright(data, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    save(data / "a" / "rotated.jpg", noise(size=(60, 40)), exif=exif)

    outcome = validate_path(data, ValidateParams(), tmp_path / "out")

    assert outcome.success, outcome.failures
    row = outcome.manifest.set_index("path").loc["a/rotated.jpg"]
    assert (row["width"], row["height"]) == (40, 60)


def test_image_over_pixel_limit_fails_size_bounds(data, tmp_path):
    save(data / "b" / "huge.png", noise(size=(100, 100)))

    outcome = validate_path(data, ValidateParams(), tmp_path / "out", max_pixels=2_000)

    assert not outcome.success
    assert failing(outcome) == {"size_bounds", "decodes"}  # one limit: no stage may decode it either
    [item] = check(outcome, "size_bounds").offending
    assert item["item"] == "b/huge.png" and "max_pixels" in item["detail"] and "100x100" in item["detail"]
    [item] = check(outcome, "decodes").offending
    assert item["item"] == "b/huge.png" and "pixel limit 2000" in item["detail"]


def test_too_small_side_fails_size_bounds(data, tmp_path):
    save(data / "c" / "sliver.png", noise(size=(8, 40)))

    outcome = validate_path(data, ValidateParams(), tmp_path / "out")

    assert offenders(outcome, "size_bounds") == {"c/sliver.png"} and not outcome.success


def _manifest_csv(root: Path, extra: list[tuple[str, str, str]]) -> Path:
    """A path,label,split CSV over `root`: extra rows get their split, the rest are assigned."""
    rows = [(p.relative_to(root).as_posix(), p.parent.name, "") for p in sorted(root.glob("*/*.png"))]
    listed = {r[0] for r in extra}
    rows = [r for r in rows if r[0] not in listed] + extra
    csv = root / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(csv, index=False)
    return csv


def test_same_image_in_train_and_test_is_leakage(data, tmp_path):
    (data / "a" / "copy.png").write_bytes((data / "a" / "00.png").read_bytes())
    csv = _manifest_csv(data, [("a/00.png", "a", "train"), ("a/copy.png", "a", "test")])

    outcome = validate_path(csv, ValidateParams(), tmp_path / "out")

    assert not outcome.success
    assert failing(outcome) == {"no_leakage"}
    assert offenders(outcome, "no_leakage") == {"a/00.png", "a/copy.png"}
    details = {o["item"]: o["detail"] for o in check(outcome, "no_leakage").offending}
    assert "a/copy.png [test]" in details["a/00.png"]


def test_duplicate_within_a_split_is_only_a_warning(data, tmp_path):
    (data / "b" / "again.png").write_bytes((data / "b" / "03.png").read_bytes())
    csv = _manifest_csv(data, [("b/03.png", "b", "train"), ("b/again.png", "b", "train")])

    outcome = validate_path(csv, ValidateParams(), tmp_path / "out")

    assert outcome.success, outcome.failures
    dup = check(outcome, "duplicates_within_split")
    assert dup.status == "warning" and not dup.blocking
    assert offenders(outcome, "duplicates_within_split") == {"b/03.png", "b/again.png"}
    assert any("b/again.png" in w for w in outcome.warnings)


def test_class_with_one_image_fails_min_per_class_split(data, tmp_path):
    save(data / "rare" / "only.png")

    outcome = validate_path(data, ValidateParams(), tmp_path / "out")

    assert not outcome.success
    assert failing(outcome) == {"min_per_class_split"}
    assert offenders(outcome, "min_per_class_split") == {f"label=rare split={s}" for s in ("train", "val", "test")}
    assert check(outcome, "min_per_class_split").observed["rare"] == {"train": 1, "val": 0, "test": 0}


def test_empty_class_folder_fails_no_empty_class(data, tmp_path):
    (data / "empty").mkdir()

    outcome = validate_path(data, ValidateParams(), tmp_path / "out")

    assert not outcome.success
    assert failing(outcome) == {"no_empty_class", "min_per_class_split"}
    assert offenders(outcome, "no_empty_class") == {"label=empty"}
    assert "label=empty" in outcome.failures[0]


def _probed_manifest(root: Path) -> pd.DataFrame:
    from tasks.ingest import build_manifest
    from tasks.sources.folder import folder_table

    return build_manifest(folder_table(root), 0.25, 0.10, [], seed=0, workers=2).drop(columns=["source"])


def test_label_outside_declared_classes(data):
    manifest = _probed_manifest(data)

    outcome = validate_manifest(manifest, ValidateParams(), classes=["a", "b"], expected_fractions=None)

    assert not outcome.success
    assert failing(outcome) == {"labels_in_set"}
    assert offenders(outcome, "labels_in_set") == {f"c/{i:02d}.png" for i in range(PER_CLASS)}


def test_split_fractions_off_by_more_than_tolerance(data):
    manifest = _probed_manifest(data)

    ok = validate_manifest(manifest, ValidateParams(), None, {"train": 0.65, "val": 0.10, "test": 0.25})
    off = validate_manifest(manifest, ValidateParams(), None, {"train": 0.80, "val": 0.10, "test": 0.10})

    assert ok.success and check(ok, "split_fractions").status == "passed"
    assert not off.success and offenders(off, "split_fractions") == {"split=train", "split=test"}
    assert "expected 0.800" in off.check("split_fractions").offending[0]["detail"]


def test_unicode_file_names_pass_and_are_reported(data, tmp_path):
    save(data / "a" / "café_日本.png")
    (data / "b" / "brisé_壊れた.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"

    outcome = validate_path(data, ValidateParams(), out)

    assert "a/café_日本.png" in set(outcome.manifest["path"])
    assert offenders(outcome, "decodes") == {"b/brisé_壊れた.png"}
    assert "b/brisé_壊れた.png" in (out / "validation.md").read_text(encoding="utf-8")
    results = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert results["expectations"][1]["offending"][0]["item"] == "b/brisé_壊れた.png"


def test_quarantine_removes_corrupt_files_and_passes(data, tmp_path):
    (data / "a" / "empty.jpg").write_bytes(b"")
    (data / "b" / "notes.png").write_text("not an image")
    out = tmp_path / "out"

    outcome = validate_path(data, ValidateParams(on_corrupt="quarantine"), out)

    assert outcome.success, outcome.failures
    assert {q["path"] for q in outcome.quarantined} == {"a/empty.jpg", "b/notes.png"}
    kept = pd.read_csv(out / "manifest.csv")
    assert len(kept) == len(CLASSES) * PER_CLASS and not {"a/empty.jpg", "b/notes.png"} & set(kept["path"])
    results = json.loads((out / "validation.json").read_text())
    assert results["quarantined_count"] == 2 and results["n_images"] == 62 and results["n_validated"] == 60
    assert "Quarantined" in (out / "validation.md").read_text()


def test_warn_only_turns_a_blocking_failure_into_a_warning(data, tmp_path):
    (data / "c" / "empty.png").write_bytes(b"")

    outcome = validate_path(data, ValidateParams(warn_only=["decodes"]), tmp_path / "out")

    assert outcome.success and outcome.failures == []
    decodes = check(outcome, "decodes")
    assert decodes.status == "warning" and not decodes.blocking
    assert any("c/empty.png" in w for w in outcome.warnings)


def test_run_stage_outputs_and_csv_round_trip(data, tmp_path):
    (data / "a" / "empty.jpg").write_bytes(b"")
    manifest_path = tmp_path / "manifest.csv"
    _probed_manifest(data).to_csv(manifest_path, index=False)  # error "" -> NaN, bools as text
    (data / "b" / "05.png").unlink()  # listed in the manifest but gone from the images folder
    paths = {k: tmp_path / "reports" / v for k, v in
             {"out_manifest": "manifest.validated.csv", "results_json": "validation.json",
              "summary_md": "validation.md", "docs_dir": "validation_docs"}.items()}

    outcome = run(manifest_path, data, ValidateParams(on_corrupt="quarantine"), classes=list(CLASSES),
                  expected_fractions={"train": 0.65, "val": 0.10, "test": 0.25}, **paths)

    assert outcome.success, outcome.failures
    assert {q["path"] for q in outcome.quarantined} == {"a/empty.jpg", "b/05.png"}
    assert "missing" in next(q["error"] for q in outcome.quarantined if q["path"] == "b/05.png")
    kept = pd.read_csv(paths["out_manifest"])
    assert len(kept) == len(CLASSES) * PER_CLASS - 1
    results = json.loads(paths["results_json"].read_text())
    assert set(results) >= {"success", "expectations", "quarantined", "n_images", "time_s"}
    for e in results["expectations"]:
        assert set(e) >= {"name", "blocking", "success", "observed", "offending", "offending_count"}
    assert (paths["docs_dir"] / "index.html").is_file()
    assert list(paths["docs_dir"].glob("validations/**/*.html"))  # the GX validation result pages


def test_bad_inputs_are_messages_not_tracebacks(tmp_path):
    missing = validate_path(tmp_path / "nowhere", ValidateParams(), tmp_path / "out1")
    assert not missing.success and "not found" in missing.failures[0]

    (tmp_path / "list.csv").write_text("file,class\nx.png,a\n")
    wrong_columns = validate_path(tmp_path / "list.csv", ValidateParams(), tmp_path / "out2")
    assert not wrong_columns.success and "missing column" in wrong_columns.failures[0]

    (tmp_path / "partial.csv").write_text("path,label,split\nx.png,a,train\n")
    paths = {"out_manifest": tmp_path / "m.csv", "results_json": tmp_path / "r.json",
             "summary_md": tmp_path / "s.md", "docs_dir": tmp_path / "docs"}
    partial = run(tmp_path / "partial.csv", tmp_path, ValidateParams(), **paths)
    assert not partial.success and "width" in partial.failures[0]
    assert json.loads(paths["results_json"].read_text())["success"] is False

    unreadable = run(tmp_path / "absent.csv", tmp_path, ValidateParams(), **paths)
    assert not unreadable.success and "absent.csv" in unreadable.failures[0]


def test_an_elpv_sized_manifest_names_exactly_the_leaked_pair():
    n = 2600
    rng = np.random.default_rng(0)
    manifest = pd.DataFrame({
        "path": [f"c{i % 2}/{i}.png" for i in range(n)], "label": [f"c{i % 2}" for i in range(n)],
        "split": rng.choice(["train", "val", "test"], n, p=[0.65, 0.10, 0.25]),
        "width": 300, "height": 300, "mode": "L", "channels": 1, "bytes": 9000,
        "sha256": [f"{i:064x}" for i in range(n)], "decodes_ok": True, "error": "",
    })
    manifest.loc[7, "sha256"] = manifest.loc[8, "sha256"]
    manifest.loc[[7, 8], "split"] = ["train", "test"]

    outcome = validate_manifest(manifest, ValidateParams(), ["c0", "c1"], {"train": 0.65, "val": 0.10, "test": 0.25})

    assert failing(outcome) == {"no_leakage", "label_conflicts"}  # the copy also carries the other class's label
    assert offenders(outcome, "no_leakage") == offenders(outcome, "label_conflicts") == {"c1/7.png", "c0/8.png"}


def test_an_expectation_gx_cannot_evaluate_fails_its_check_without_raising(data, monkeypatch):
    import tasks.validate.stage as stage

    manifest = _probed_manifest(data)
    real = stage.images_table
    monkeypatch.setattr(stage, "images_table", lambda df: real(df).drop(columns=["mode"]))

    outcome = validate_manifest(manifest, ValidateParams(), None, None)

    assert failing(outcome) == {"modes"}
    [item] = check(outcome, "modes").offending
    assert item["item"].startswith("(GX could not evaluate") and "mode" in item["detail"]


def test_split_fractions_are_checked_only_where_ingest_drew_the_splits(tmp_path):
    """A folder split up front 60/20/20 (data.split says 65/10/25): the stage keeps the user's split and passes;
    the same manifest, had ingest drawn it, fails split_fractions by name."""
    from tasks import ingest
    from tasks import validate as stage

    for split, n in (("train", 12), ("valid", 4), ("test", 4)):
        good_folder(tmp_path / "src" / split, n=n)
    out = tmp_path / "data"
    ingest.run("folder", str(tmp_path / "src"), "binary", 0.5, 0.25, 0.10, [], 0, 2, out / "images",
               out / "manifest.csv", classes_path=out / "classes.json")
    declared = json.loads((out / "classes.json").read_text())
    assert declared["classes"] == list(CLASSES) and declared["given_splits"] == ["test", "val"]
    args = ["--params", str(Path(__file__).parents[1] / "params.yaml"), "--manifest", str(out / "manifest.csv"),
            "--images", str(out / "images"), "--classes", str(out / "classes.json"),
            "--out-manifest", str(out / "validated.csv"), "--out-dir", str(tmp_path / "reports")]
    stage.main(args)
    results = json.loads((tmp_path / "reports" / "validation.json").read_text())
    fractions = next(e for e in results["expectations"] if e["name"] == "split_fractions")
    assert results["success"] and fractions["status"] == "skipped" and "source's own" in fractions["skipped"]
    assert pd.read_csv(out / "validated.csv")["split"].value_counts().to_dict() == {"train": 36, "val": 12, "test": 12}

    (out / "classes.json").write_text(json.dumps({**declared, "given_splits": []}))
    with pytest.raises(SystemExit):
        stage.main(args)
    results = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert not results["success"]
    assert next(e for e in results["expectations"] if e["name"] == "split_fractions")["success"] is False


def test_validate_path_splits_as_the_params_say(data, tmp_path):
    """`finetune validate PATH` draws the splits with params' data.split fractions and seed, not fixed ones."""
    from tasks.params import SplitParams

    def splits(out, **kwargs):
        validate_path(data, ValidateParams(min_images_per_class=1), out, **kwargs)
        return pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("path")["split"]

    default = splits(tmp_path / "default")
    assert default.value_counts().to_dict() == {"train": 39, "test": 15, "val": 6}  # 0.25/0.10 of 20 per class
    halves = splits(tmp_path / "halves", split=SplitParams(test=0.5, val=0.2))
    assert halves.value_counts().to_dict() == {"test": 30, "val": 12, "train": 18}
    reseeded = splits(tmp_path / "reseeded", seed=7)
    assert reseeded.value_counts().to_dict() == default.value_counts().to_dict() and (reseeded != default).any()
