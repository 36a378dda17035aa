"""The label_issues stage on tiny generated data: planted label flips rank at the top, planted cross-split
near-duplicates are all found, the review list and block mode work, for folder and manifest sources, text labels
(`NA`, `007`) and ELPV's four classes; `finetune validate` prints the summary; the stage runs in `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks import fetch_model, ingest
from tasks.features import cached_features, load_backbone
from tasks.label_issues import inspect, run
from tasks.manifest import read_manifest, read_table
from tasks.params import LabelIssuesParams, write_overrides
from tasks.reviewed import HEADER
from tests.conftest import REPO

SIZE = 96  # px the features are computed at in these tests (fast; the flips still rank at the top)
FAST = LabelIssuesParams(image_size=SIZE)


def pattern(kind: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A class-typed texture the pretrained features separate (0 stripes, 1 checks, 2 blobs, 3 rings), each image
    with its own angle, frequency, phase, tint and noise, so no two are near-duplicates."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == 0:
        a, f = rng.uniform(0, np.pi), rng.uniform(3, 8)
        img = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 6.3))
    elif kind == 1:
        f = rng.uniform(3, 7)
        img = np.sign(np.sin(2 * np.pi * f * xx + rng.uniform(0, 6.3)) * np.sin(2 * np.pi * f * yy + rng.uniform(0, 6.3)))
    elif kind == 2:
        img = np.zeros((size, size))
        for _ in range(rng.integers(2, 6)):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img = img / img.max() * 2 - 1
    else:
        cx, cy, f = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(4, 9)
        img = np.sin(2 * np.pi * f * np.hypot(xx - cx, yy - cy) + rng.uniform(0, 6.3))
    rgb = (0.5 + 0.4 * img[..., None] * rng.uniform(0.5, 1.0, 3)) * 255 + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def make_patterns(root: Path, classes=("blobs", "checks", "stripes"), per_class: int = 40, flip_fraction: float = 0.05,
                  seed: int = 0) -> dict[str, str]:
    """`root/<class>/<i>.png` with `flip_fraction` of the files saved under a wrong class: {path: true class}."""
    kinds = {"blobs": 2, "checks": 1, "stripes": 0, "rings": 3}
    rng = np.random.default_rng(seed)
    n = len(classes) * per_class
    flipped = set(rng.choice(n, int(round(flip_fraction * n)), replace=False).tolist())
    flips = {}
    for k, label in enumerate(classes):
        for i in range(per_class):
            image = pattern(kinds.get(label, k % 4), rng)
            given = classes[(k + 1) % len(classes)] if k * per_class + i in flipped else label
            (root / given).mkdir(parents=True, exist_ok=True)
            image.save(root / given / f"{label[:2]}{i:03d}.png")
            if given != label:
                flips[f"{given}/{label[:2]}{i:03d}.png"] = label
    return flips


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The bundled EfficientNet-Lite0 weights, as fetch_model saves them (offline)."""
    out = tmp_path_factory.mktemp("base") / "base"
    fetch_model.run("bundled", "efficientnet_lite0", "imagenet", None, out, offline=True)
    return out


def ingested(source: str, path: Path | None, out: Path, task: str = "binary", **kw) -> Path:
    """ingest's manifest and images for a source, under `out`."""
    ingest.run(source, str(path) if path else None, task, 0.5, 0.25, 0.1, [], 42, 2, out / "images",
               out / "manifest.csv", classes_path=out / "classes.json", reviewed_path=out / "label_reviewed.csv", **kw)
    return out


def top_k_precision(table: pd.DataFrame, planted: set[str]) -> float:
    """The fraction of the k lowest label-quality files (k = number planted) that are planted flips."""
    top = table.sort_values("quality", kind="stable").head(len(planted))
    return float(top["path"].isin(planted).mean())


def test_planted_flips_rank_at_the_top_and_the_reports_say_so(tmp_path, base):
    flips = make_patterns(tmp_path / "raw")
    d = ingested("folder", tmp_path / "raw", tmp_path / "data")
    assert len(flips) == 6  # 5% of 120
    found, _ = inspect(load_backbone(base, SIZE), read_manifest(d / "manifest.csv"), d / "images", FAST, 42,
                             set(), tmp_path / "cache", workers=2)
    precision = top_k_precision(found.table, set(flips))
    flagged = set(found.label_issues["path"])
    print(f"\nplanted flips: top-{len(flips)} precision {precision:.2f}; confident learning flagged {len(flagged)}, "
          f"{len(flagged & set(flips))} of them flips (recall {len(flagged & set(flips)) / len(flips):.2f})")
    assert precision >= 0.8
    suggested = found.table.set_index("path")["suggested"]
    assert sum(suggested[p] == true for p, true in flips.items()) >= 0.8 * len(flips)  # the right class, mostly

    data = run(d / "manifest.csv", d / "images", base, d / "label_reviewed.csv", tmp_path / "reports",
               tmp_path / "flagged.csv", FAST, 42, workers=2, cache_dir=tmp_path / "cache")
    assert data["status"] == "flagged" and data["backbone"]["cached"] == 120 and data["backbone"]["computed"] == 0
    ranked = [r["path"] for r in data["label_issues"]]
    assert ranked and set(ranked[: len(flips)]) & set(flips)
    assert [r["label_quality"] for r in data["label_issues"]] == sorted(r["label_quality"] for r in data["label_issues"])
    md = (tmp_path / "reports" / "label_issues.md").read_text()
    assert "| # | path | split | given | suggested | label quality |" in md and ranked[0] in md
    assert (tmp_path / "reports" / "label_issues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = read_table(tmp_path / "flagged.csv")
    assert list(csv.columns[:3]) == ["path", "label", "split"] and set(ranked) <= set(csv["path"])
    assert json.loads((tmp_path / "reports" / "label_issues.json").read_text())["counts"]["label_issues"] == len(ranked)


def stage(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FINETUNE_DEBUG="0", FINETUNE_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tasks.label_issues", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_block_mode_fails_naming_the_files_and_the_review_list_accepts_them(tmp_path, base):
    flips = make_patterns(tmp_path / "raw", per_class=30, seed=1)
    d = ingested("folder", tmp_path / "raw", tmp_path / "data")
    assert (d / "label_reviewed.csv").read_text() == HEADER  # ingest created the empty review list
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{source: folder, path: {tmp_path / 'raw'}, workers: 2}}\n"
                      f"label_issues: {{mode: block, image_size: {SIZE}}}\n")
    args = ["--params", str(params), "--manifest", str(d / "manifest.csv"), "--images", str(d / "images"), "--base",
            str(base), "--reviewed", str(d / "label_reviewed.csv"), "--out-dir", str(tmp_path / "reports"),
            "--flagged", str(tmp_path / "flagged.csv")]
    blocked = stage(args, tmp_path, tmp_path / "cache")
    errors = [line for line in blocked.stderr.splitlines() if line.startswith("error:")]
    assert blocked.returncode == 1 and len(errors) == 1 and "Traceback" not in blocked.stderr, blocked.stderr
    data = json.loads((tmp_path / "reports" / "label_issues.json").read_text())
    assert data["status"] == "blocked" and data["blocking"]
    assert all(p in errors[0] for p in data["blocking"][:8]) and "label_reviewed.csv" in errors[0]
    assert set(flips) & set(data["blocking"])

    # the person accepts every flagged file: the next run flags none of them and passes
    pd.DataFrame({"path": data["blocking"], "note": "checked by hand"}).to_csv(d / "label_reviewed.csv", index=False)
    accepted = stage(args, tmp_path, tmp_path / "cache")
    assert accepted.returncode == 0, accepted.stderr
    again = json.loads((tmp_path / "reports" / "label_issues.json").read_text())
    assert not set(again["blocking"]) & set(data["blocking"])
    assert not {r["path"] for r in again["label_issues"]} & set(data["blocking"])
    assert set(again["reviewed_not_flagged"]) <= set(data["blocking"]) and again["counts"]["reviewed_not_flagged"] > 0
    assert again["backbone"]["computed"] == 0  # features from the cache: unchanged images cost nothing


def test_manifest_source_text_labels_and_planted_cross_split_near_duplicates(tmp_path, base):
    """Labels `NA` and `007` stay text; near-duplicates planted across splits (brightened copies, not the same bytes)
    are all found."""
    rng = np.random.default_rng(3)
    rows, raw = [], tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    for label, kind in (("NA", 0), ("007", 1), ("x", 2)):
        for i in range(24):
            name = f"img/{label}-{i}.png"
            pattern(kind, rng).save(raw / name)
            rows.append({"path": name, "label": label, "split": "test" if i < 6 else "val" if i < 9 else "train"})
    planted = set()
    for label in ("NA", "007", "x"):  # a train image's brightened copy in the test split
        src = np.asarray(Image.open(raw / f"img/{label}-20.png")).astype(int) + 3
        Image.fromarray(np.clip(src, 0, 255).astype(np.uint8)).save(raw / f"img/{label}-copy.png")
        rows.append({"path": f"img/{label}-copy.png", "label": label, "split": "test"})
        planted.add(frozenset({f"img/{label}-20.png", f"img/{label}-copy.png"}))
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    d = ingested("manifest", raw, tmp_path / "data", manifest_name="labels.csv")
    data = run(d / "manifest.csv", d / "images", base, d / "label_reviewed.csv", tmp_path / "reports",
               tmp_path / "flagged.csv", FAST, 42, workers=2, cache_dir=tmp_path / "cache")
    assert data["classes"] == ["007", "NA", "x"]
    pairs = {frozenset({r["path"], r["other_path"]}) for r in data["near_duplicates"]}
    print(f"\nplanted near-duplicates: {len(planted & pairs)}/{len(planted)} found; {len(pairs)} pairs reported "
          f"(precision {len(planted & pairs) / max(1, len(pairs)):.2f})")
    assert planted <= pairs
    assert all(r["similarity"] >= FAST.near_duplicate_similarity for r in data["near_duplicates"])
    flagged = read_table(tmp_path / "flagged.csv")
    assert set(flagged["label"]) <= {"NA", "007", "x"} and "near_duplicate" in ";".join(flagged["issues"])
    # a reviewed copy is not reported again
    (d / "label_reviewed.csv").write_text(HEADER + "".join(f"img/{x}-copy.png,kept on purpose\n" for x in ("NA", "007")))
    again = run(d / "manifest.csv", d / "images", base, d / "label_reviewed.csv", tmp_path / "reports",
                tmp_path / "flagged.csv", FAST, 42, workers=2, cache_dir=tmp_path / "cache")
    left = {frozenset({r["path"], r["other_path"]}) for r in again["near_duplicates"]}
    assert left & planted == {frozenset({"img/x-20.png", "img/x-copy.png"})}


def test_four_class_elpv_labels(tmp_path, base):
    """data.task four_class (ELPV's p0, p33, p67, p100): a stratified sample of the real cells."""
    d = ingested("elpv", None, tmp_path / "data", task="four_class")
    manifest = read_manifest(d / "manifest.csv")
    sample = manifest.groupby("label").head(25)
    sample.to_csv(d / "sample.csv", index=False)
    data = run(d / "sample.csv", d / "images", base, None, tmp_path / "reports", None,
               LabelIssuesParams(image_size=64), 42, workers=2, cache_dir=tmp_path / "cache")
    assert data["classes"] == ["p0", "p100", "p33", "p67"] and data["n_images"] == 100 and data["folds"] == 5
    assert {r["suggested"] for r in data["label_issues"]} <= set(data["classes"])
    assert data["label_issue_fraction"] <= 0.1  # max_fraction


def test_features_are_cached_by_content_not_by_label_or_path(tmp_path, base):
    make_patterns(tmp_path / "raw", per_class=4, flip_fraction=0)
    paths = sorted((tmp_path / "raw").rglob("*.png"))
    net = load_backbone(base, 64)
    hashes = [f"h{i}" for i in range(len(paths))]
    first, stats = cached_features(net, paths, hashes, tmp_path / "cache")
    assert stats.computed == len(paths)
    moved, stats = cached_features(net, paths[::-1], hashes[::-1], tmp_path / "cache")
    assert stats.computed == 0 and np.array_equal(moved, first[::-1])
    other = load_backbone(base, 96)  # another input size is another cache file
    assert cached_features(other, paths[:2], hashes[:2], tmp_path / "cache")[1].computed == 2


def test_finetune_validate_prints_the_label_issues_and_block_mode_fails(tmp_path):
    flips = make_patterns(tmp_path / "raw", per_class=30, seed=2)
    params = tmp_path / "params.yaml"
    params.write_text(f"label_issues: {{mode: block, image_size: {SIZE}}}\n")
    finetune = str(Path(sys.executable).parent / "finetune")
    proc = subprocess.run([finetune, "validate", str(tmp_path / "raw"), "--params", str(params), "--out",
                           str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FINETUNE_DEBUG="0"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "label issues:" in proc.stdout and any(p in proc.stdout for p in flips), proc.stdout
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED label issues:")]
    assert len(failed) == 1 and "label_issues.mode is block" in failed[0]
    assert (tmp_path / "out" / "label_issues" / "label_issues.md").exists()
    assert (tmp_path / "out" / "label_issues" / "flagged.csv").exists()


@pytest.mark.slow
def test_dvc_repro_runs_the_stage_in_the_chain_and_block_stops_before_training(tmp_path, trained_tiny,
                                                                               prefect_server):
    from tests.conftest import copy_project
    from tests.test_end_to_end import dvc, stages_run

    root = copy_project(trained_tiny, tmp_path / "proj")  # tiny data, 3 look-alike images per class (label errors)
    write_overrides(root / "params.yaml", ["label_issues.mode=block", "label_issues.image_size=64"])
    out = dvc("repro", cwd=root, check=False)
    assert out.returncode != 0 and "label issues:" in out.stdout + out.stderr
    assert stages_run(out.stdout) == {"label_issues"}, out.stdout  # the data are as trained on; training never starts
    assert (root / "data/label_reviewed.csv").exists()
    data = json.loads((root / "reports/label_issues/label_issues.json").read_text())
    assert data["status"] == "blocked"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows import artifacts

    artifacts.label_issues(root, failed=True)
    with get_client(sync_client=True) as client:  # the newest: other tests' runs on this server publish the key too
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["label-issues"])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    rows = table[0].data if not isinstance(table[0].data, str) else json.loads(table[0].data)
    assert [r["path"] for r in rows] == [r["path"] for r in data["label_issues"]]

    # a person reviews what is flagged (at most label_issues.max_fraction at a time) until nothing is left
    reviewed: list[str] = []
    for _ in range(4):
        assert not set(data["blocking"]) & set(reviewed)  # an accepted file is never flagged again
        reviewed += data["blocking"]
        (root / "data/label_reviewed.csv").write_text(HEADER + "".join(f"{p},ok\n" for p in reviewed))
        out = dvc("repro", "label_issues", cwd=root, check=False)
        assert "Running stage 'label_issues'" in out.stdout
        data = json.loads((root / "reports/label_issues/label_issues.json").read_text())
        if out.returncode == 0:
            break
    assert out.returncode == 0 and data["status"] != "blocked" and data["backbone"]["computed"] == 0
    assert "label_issues" not in dvc("status", "label_issues", cwd=root).stdout
