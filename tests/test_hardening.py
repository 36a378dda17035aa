"""Inputs as careless users and attackers write them: labels, broken and missing files, empty classes,
symbolic links, pixel limits, secrets in URLs, params that cannot work, durable writes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks import ingest, validate
from tasks.files import atomic_write, read_json, write_json
from tasks.manifest import ManifestError, read_manifest, read_table
from tasks.params import DataParams, ParamsError, ValidateParams, load_params
from tasks.sources.common import SourceError
from tasks.sources.manifest import manifest_table
from tasks.sources.readers import read_source
from tests.conftest import make_dataset

ODD_LABELS = ["NA", "null", "nan", "007", "None", "N/A", "true"]


def write_png(path: Path, value: int = 100, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(np.clip(rng.normal(value, 20, (size, size)), 0, 255).astype(np.uint8), "L").save(path)
    return path


def ingest_run(src: Path, out: Path, source: str = "folder", manifest_name: str = "manifest.csv", **kw):
    return ingest.run(source, str(src), "binary", 0.5, 0.25, 0.25, [], 0, 2, out / "images", out / "manifest.csv",
                      classes_path=out / "classes.json", manifest_name=manifest_name, **kw)


# ---- labels as users write them (issue 12 #4) ------------------------------------------------------


def test_odd_labels_stay_text_through_manifest_ingest_and_predictions(tmp_path):
    src = tmp_path / "src"
    rows = []
    for i, label in enumerate(ODD_LABELS * 4):
        rows.append({"path": f"img/{i}.png", "label": label})
        write_png(src / f"img/{i}.png", 30 + 7 * i)
    pd.DataFrame(rows).to_csv(src / "manifest.csv", index=False)
    table = manifest_table(src / "manifest.csv")
    assert sorted(set(table["label"])) == sorted(ODD_LABELS)
    manifest = ingest_run(src, tmp_path / "out", source="manifest")
    back = read_manifest(tmp_path / "out" / "manifest.csv")
    assert sorted(set(back["label"])) == sorted(ODD_LABELS) and back["label"].map(type).eq(str).all()
    assert read_json(tmp_path / "out" / "classes.json")["classes"] == sorted(ODD_LABELS)
    assert len(manifest) == len(rows)
    # predictions with the same labels read back as text by the gate
    from tasks.gate import read_predictions

    pred = tmp_path / "predictions.csv"
    pd.DataFrame({"path": ["a", "b"], "actual": ["NA", "007"], "predicted": ["007", "NA"]}).to_csv(pred, index=False)
    _, y, predicted, _ = read_predictions(pred, sorted(["NA", "007"]))
    assert list(y) == [1, 0] and list(predicted) == [0, 1]


def test_an_empty_label_is_refused_by_line(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a.png")
    write_png(src / "b.png", 200)
    (src / "manifest.csv").write_text("path,label\na.png,cat\nb.png,\n")
    with pytest.raises(SourceError, match=r"manifest.csv: empty label on line\(s\) 3"):
        manifest_table(src / "manifest.csv")
    (src / "p.csv").write_text("path,actual,predicted\na.png,  ,cat\n")
    with pytest.raises(ManifestError, match="empty actual on line"):
        from tasks.manifest import require_labels

        require_labels(read_table(src / "p.csv"), src / "p.csv", "actual")


def test_folder_classes_named_like_missing_values_and_numbers(tmp_path):
    make_dataset(tmp_path / "src", classes=("NA", "007"), per_class=8)
    ingest_run(tmp_path / "src", tmp_path / "out")
    assert read_json(tmp_path / "out" / "classes.json")["classes"] == ["007", "NA"]
    assert set(read_manifest(tmp_path / "out" / "manifest.csv")["label"]) == {"007", "NA"}


# ---- missing, unreadable, empty sources (issue 12 #5) ----------------------------------------------


def test_a_missing_file_in_a_manifest_is_recorded_for_validation_and_nothing_half_built_stays(tmp_path):
    src = tmp_path / "src"
    for i in range(8):
        write_png(src / f"{i}.png", 40 + 20 * i)
    rows = [{"path": f"{i}.png", "label": "dark" if i < 4 else "bright"} for i in range(8)]
    rows.append({"path": "gone.png", "label": "dark"})
    pd.DataFrame(rows).to_csv(src / "manifest.csv", index=False)
    out = tmp_path / "out"
    ingest_run(src, out, source="manifest")
    manifest = read_manifest(out / "manifest.csv")
    gone = manifest[manifest["path"] == "gone.png"].iloc[0]
    assert not gone["decodes_ok"] and "No such file" in gone["error"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "images", "manifest.csv"]  # no temp folder
    outcome = validate.run(out / "manifest.csv", out / "images", ValidateParams(min_images_per_class=1),
                           out / "validated.csv", out / "v.json", out / "v.md", out / "docs", classes=["bright", "dark"])
    assert not outcome.success and any("gone.png" in f for f in outcome.failures)


def test_an_empty_or_header_only_source_is_one_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.csv").write_text("path,label\n")
    with pytest.raises(SourceError, match="lists no images"):
        ingest_run(src, tmp_path / "out", source="manifest")
    with pytest.raises(SourceError, match="no images found"):
        ingest_run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_manifest_given_as_a_file_says_how_to_set_the_folder(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a.png")
    (src / "labels.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(SourceError, match=r"data.path=.*src data.manifest=labels.csv"):
        read_source(DataParams(source="manifest", path=str(src / "labels.csv")))


# ---- empty classes, label conflicts (issue 12 #7) ---------------------------------------------------


def test_an_empty_class_folder_blocks_validation_by_name(tmp_path):
    make_dataset(tmp_path / "src", per_class=8)
    (tmp_path / "src" / "empty").mkdir()
    (tmp_path / "src" / "unlisted").mkdir()
    (tmp_path / "src" / "unlisted" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    ingest_run(tmp_path / "src", out)
    classes = read_json(out / "classes.json")["classes"]
    assert classes == ["bright", "dark", "empty", "unlisted"]
    outcome = validate.run(out / "manifest.csv", out / "images", ValidateParams(min_images_per_class=1),
                           out / "validated.csv", out / "v.json", out / "v.md", out / "docs", classes=classes)
    check = outcome.check("no_empty_class")
    assert not outcome.success and not check.skipped
    assert {o["item"] for o in check.offending} == {"label=empty", "label=unlisted"}


def test_identical_images_with_different_labels_block_by_default(tmp_path):
    make_dataset(tmp_path / "src", per_class=8)
    (tmp_path / "src" / "dark" / "copy.png").write_bytes((tmp_path / "src" / "bright" / "000.png").read_bytes())
    out = tmp_path / "out"
    ingest_run(tmp_path / "src", out)
    params = ValidateParams(min_images_per_class=1, warn_only=["no_leakage", "duplicates_within_split"])
    outcome = validate.run(out / "manifest.csv", out / "images", params, out / "validated.csv", out / "v.json",
                           out / "v.md", out / "docs", classes=["bright", "dark"])
    check = outcome.check("label_conflicts")
    assert not outcome.success and check.blocking and not check.success
    assert {o["item"] for o in check.offending} == {"bright/000.png", "dark/copy.png"}
    assert "labelled 'dark'" in next(o["detail"] for o in check.offending if o["item"] == "dark/copy.png")
    relaxed = ValidateParams(min_images_per_class=1, warn_only=[*params.warn_only, "label_conflicts"])
    outcome = validate.run(out / "manifest.csv", out / "images", relaxed, out / "validated.csv", out / "v.json",
                           out / "v.md", out / "docs", classes=["bright", "dark"])
    assert outcome.success and any("label_conflicts" in w for w in outcome.warnings)


# ---- one pixel limit, one symlink policy (issue 12 #8) ----------------------------------------------


def test_every_image_reading_stage_uses_data_max_pixels(tmp_path):
    """Validation and the training input path refuse the same image for the same limit."""
    from tasks.images import ImageError
    from tasks.tensors import split_arrays

    make_dataset(tmp_path / "src", per_class=6, size=48)
    out = tmp_path / "out"
    ingest_run(tmp_path / "src", out, max_pixels=48 * 48)
    manifest = read_manifest(out / "manifest.csv")
    split_arrays(manifest, out / "images", "train", ["bright", "dark"], 32, max_pixels=48 * 48)
    with pytest.raises(ImageError, match="exceeds the pixel limit 2303"):
        split_arrays(manifest, out / "images", "train", ["bright", "dark"], 32, max_pixels=48 * 48 - 1)
    outcome = validate.validate_manifest(manifest, ValidateParams(min_images_per_class=1), None, None,
                                         max_pixels=48 * 48 - 1)
    assert not outcome.check("size_bounds").success


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_a_symlink_out_of_the_data_folder_is_refused_by_every_source(tmp_path, source):
    make_dataset(tmp_path / "src", per_class=4)
    secret = write_png(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "src" / "dark" / "link.png").symlink_to(secret)
    inside_link = tmp_path / "src" / "bright" / "alias.png"
    inside_link.symlink_to(tmp_path / "src" / "bright" / "000.png")  # inside the folder: allowed
    if source == "manifest":
        rows = [{"path": p.relative_to(tmp_path / "src").as_posix(), "label": p.parent.name}
                for p in sorted((tmp_path / "src").rglob("*.png"))]
        pd.DataFrame(rows).to_csv(tmp_path / "src" / "manifest.csv", index=False)
    with pytest.raises(SourceError, match=r"link.png' is outside the data folder .*it links to"):
        read_source(DataParams(source=source, path=str(tmp_path / "src")))
    (tmp_path / "src" / "dark" / "link.png").unlink()
    if source == "manifest":
        pd.DataFrame([r for r in rows if not r["path"].endswith("link.png")]).to_csv(tmp_path / "src" / "manifest.csv",
                                                                                    index=False)
    table = read_source(DataParams(source=source, path=str(tmp_path / "src")))
    assert "bright/alias.png" in set(table.rows["path"])


# ---- secrets in URLs (issue 12 #9) ----------------------------------------------------------------


def test_credentials_in_a_weights_url_are_never_written(tmp_path, monkeypatch, caplog):
    import fsspec
    import timm
    import torch

    from tasks import fetch_model
    from tasks.backbones.weights import WeightsError
    from tasks.files import sha256_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    local = tmp_path / "w.pt"
    torch.save(timm.create_model("test_efficientnet").state_dict(), local)
    digest = sha256_file(local)
    url = "memory://alice:hunter2@weights.example/nets/w.pt?X-Amz-Signature=s3cr3tsig"
    memory = fsspec.filesystem("memory")
    memory.pipe("/alice:hunter2@weights.example/nets/w.pt?X-Amz-Signature=s3cr3tsig", local.read_bytes())
    try:
        caplog.set_level(logging.INFO)
        fetch_model.run("checkpoint", "test_efficientnet", url, digest, tmp_path / "base", offline=False)
        written = (tmp_path / "base" / "meta.json").read_text()
        cached = list((tmp_path / "torch" / "hub" / "checkpoints").iterdir())
        with pytest.raises(WeightsError) as err:
            fetch_model.run("checkpoint", "test_efficientnet", url.replace("nets/w.pt", "gone/x.pt"), digest,
                            tmp_path / "b2",
                            offline=True)
    finally:
        memory.rm("/alice:hunter2@weights.example", recursive=True)
    for secret in ("hunter2", "s3cr3tsig", "alice"):
        assert secret not in written and secret not in caplog.text and secret not in str(err.value)
        assert all(secret not in p.name for p in cached)
    assert json.loads(written)["weights"] == "memory://***@weights.example/nets/w.pt?<redacted>"
    assert "credentials in its URL" in caplog.text


def test_a_weights_url_may_take_secrets_from_the_environment(monkeypatch):
    from tasks.backbones.weights import WeightsError, expand_env, redact

    monkeypatch.setenv("WEIGHTS_TOKEN", "t0ken")
    assert expand_env("https://host/w.pt?token=${WEIGHTS_TOKEN}") == "https://host/w.pt?token=t0ken"
    assert redact("https://u:p@host:8443/w.pt?token=t0ken#frag") == "https://***@host:8443/w.pt?<redacted>"
    monkeypatch.delenv("WEIGHTS_TOKEN")
    with pytest.raises(WeightsError, match=r"\$\{WEIGHTS_TOKEN\}, which is not set"):
        expand_env("https://host/w.pt?token=${WEIGHTS_TOKEN}")


# ---- params that cannot work (issue 12 #10) ---------------------------------------------------------


def test_params_that_train_nothing_are_refused(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  stages:\n    - {name: a, epochs: 0}\n    - {name: b, epochs: 0, trainable: all}\n")
    with pytest.raises(ParamsError, match="every stage has epochs: 0"):
        load_params(f)
    f.write_text("validate:\n  max_pixels: 100\n")
    with pytest.raises(ParamsError, match="moved to data.max_pixels"):
        load_params(f)


# ---- durability (issue 12 #11) ----------------------------------------------------------------------


def test_atomic_writes_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    write_json(tmp_path / "champion.json", {"version": "v0001"})
    assert str(tmp_path) in synced  # the folder entry
    assert any(s.startswith(str(tmp_path / ".champion.json.")) for s in synced)  # the file, before the rename


def test_no_code_changes_the_process_umask_after_import(tmp_path, monkeypatch):
    """os.umask can only be read by setting it: while threads write files that races, so it is read once."""
    def forbidden(mask):
        raise AssertionError("umask changed at run time")

    monkeypatch.setattr(os, "umask", forbidden)
    atomic_write(tmp_path / "a.txt", "x")
    validate.write_docs(lambda d: validate.input_failure("nothing", 0.0), tmp_path / "docs")
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) != "0o600"


def test_a_killed_writers_temp_files_and_staging_folders_are_swept(tmp_path):
    from tasks import registry
    from tasks.files import scratch_dir

    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".model.pt.{dead}.abc.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".model.pt.{os.getpid()}.def.tmp"
    live.write_bytes(b"in progress")
    atomic_write(tmp_path / "model.pt", "new")
    assert not stale.exists() and live.exists()
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / "models").mkdir()
    assert scratch_dir(project / "models") == project / ".dvc" / "tmp" / "finetune"  # temps stay out of the workspace
    atomic_write(project / "models" / "model.pt", "x")
    assert [p.name for p in (project / "models").iterdir()] == ["model.pt"]
    root = tmp_path / "reg"
    (root / ".staging-v0001-xyz").mkdir(parents=True)
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model")
    registry.register(root, {"model.onnx": src}, {})
    assert not list(root.glob(".staging-*")) and registry.list_versions(root) == ["v0001"]


# ---- the lock holder's record without a Prefect UI URL (issue 32) ------------------------------------


def test_a_run_holding_the_project_is_named_without_a_url_prefect_did_not_have():
    """Without PREFECT_UI_URL, Prefect's flow_run.ui_url is 'None/flow-runs/flow-run/<id>'; the lock-wait message
    quoted it. A holder record leaves out anything that is not an http(s) URL (records written before the fix too)."""
    from flows.project import describe

    holder = {"flow_run_name": "brisk-otter", "deployment": "finetune-pipeline/manual", "pid": 12, "host": "box",
              "started_at": "2026-12-06T10:00:00+00:00", "url": "None/flow-runs/flow-run/0b1c"}
    said = describe(holder)
    assert "None/" not in said and said.endswith("since 2026-12-06T10:00:00+00:00")
    holder["url"] = "http://127.0.0.1:4200/flow-runs/flow-run/0b1c"
    assert describe(holder).endswith(", http://127.0.0.1:4200/flow-runs/flow-run/0b1c")
