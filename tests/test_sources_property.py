"""Property: whatever folder or manifest a user hands over, ingest + validate either pass or stop with one
`error:` line naming the file or key; never a traceback, never a half-written output.

Generated sources mix label strings (Unicode, `NA`, numbers with leading zeros, whitespace), image modes,
empty and garbage files, duplicate and missing paths, paths escaping the data folder, and symbolic links
inside and outside it. Hypothesis runs derandomized, so CI sees the same examples on every run.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tasks import ingest, validate
from tasks.params import write_overrides
from tests.conftest import REPO

LABELS = st.one_of(
    st.sampled_from(["NA", "null", "nan", "007", "0", "None", "  padded ", "a,b", "é", "日本", "x y", "-1"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=6),
)
KINDS = st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "empty", "garbage", "missing", "duplicate",
                         "escape", "link_in", "link_out"])
ENTRIES = st.lists(st.tuples(LABELS, KINDS), min_size=0, max_size=14)


def write_image(path: Path, mode: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(path.with_suffix(".png"))
        if path.suffix != ".png":
            path.with_suffix(".png").rename(path)
        return
    converted = img.convert(mode)
    converted.save(path, format="JPEG" if mode == "CMYK" else "PNG")


def safe_dir_name(label: str, i: int) -> str:
    """A folder name for a label: the label itself when the filesystem allows it."""
    if not label or label in (".", "..") or "/" in label or "\x00" in label or label.startswith("."):
        return f"class{i % 3}"
    return label


def build_source(root: Path, outside: Path, entries, as_manifest: bool) -> None:
    root.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    write_image(outside / "secret.png", "RGB", 999)
    rows, made = [], []
    for i, (label, kind) in enumerate(entries):
        folder = label if as_manifest else safe_dir_name(label, i)
        rel = f"{i:02d}.png" if as_manifest else f"{folder}/{i:02d}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind in ("L", "RGB", "RGBA", "P", "I;16", "CMYK", "1"):
            write_image(path, kind, i)
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "garbage":
            path.write_bytes(b"\x89PNG not really " * 3)
        elif kind == "missing":
            if not as_manifest:
                continue  # a folder cannot list a file it does not have
        elif kind == "duplicate" and made:
            rel = made[-1]
        elif kind == "escape" and as_manifest:
            rel = "../outside/secret.png"
        elif kind == "link_in" and made:
            path.symlink_to(root / made[0])
        elif kind == "link_out":
            path.symlink_to(outside / "secret.png")
        else:
            write_image(path, "L", i)
        rows.append({"path": rel, "label": label})
        if (root / rel).is_file() and kind != "missing":
            made.append(rel)
    if as_manifest:
        pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "manifest.csv", index=False)


def run_stage(main, argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def names_something(line: str, root: Path) -> bool:
    """The error names a file (something in the source or the workspace) or a params key."""
    return any(s in line for s in (str(root), "data.", "manifest", ".png", "label", "/images", ".csv"))


@pytest.mark.timeout(900)
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=ENTRIES, as_manifest=st.booleans())
def test_any_source_passes_or_fails_with_one_error_line(tmp_path_factory, entries, as_manifest):
    work = tmp_path_factory.mktemp("src")
    src, out = work / "data_src", work / "ws"
    build_source(src, work / "outside", entries, as_manifest)
    out.mkdir()
    params = out / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    write_overrides(params, [f"data.source={'manifest' if as_manifest else 'folder'}", f"data.path={src}",
                             "data.split.stratify_by=[]", "data.workers=2", "validate.min_images_per_class=1",
                             "validate.warn_only=[duplicates_within_split, min_per_class_split, split_fractions]"])
    code, err = run_stage(ingest.main, ["--params", str(params), "--images", str(out / "images"),
                                        "--manifest", str(out / "manifest.csv"), "--classes", str(out / "classes.json")])
    if code == 0:
        code, err = run_stage(validate.main, ["--params", str(params), "--manifest", str(out / "manifest.csv"),
                                              "--images", str(out / "images"), "--classes", str(out / "classes.json"),
                                              "--out-manifest", str(out / "validated.csv"),
                                              "--out-dir", str(out / "reports")])
        json.loads((out / "reports" / "validation.json").read_text())  # complete, whatever the verdict
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 0:
        assert errors == []
        assert (out / "validated.csv").is_file()
    else:
        assert code == 1 and len(errors) == 1, err
        assert names_something(errors[0], src), errors[0]
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old")) or ".staging" in p.name]
    assert leftovers == []
