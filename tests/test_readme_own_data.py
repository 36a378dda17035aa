"""The README's own-data commands, run as written on a generated folder that looks nothing like ELPV:
RGB, not square, three classes named like users name them (`NA`, `007`, `red car`), default params
otherwise (fewer epochs). Only the placeholder path is replaced."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.test_end_to_end import REPO, dvc, env, new_project, read, sh

pytestmark = pytest.mark.slow

PLACEHOLDER = "/path/to/images"
COLOURS = {"NA": (200, 40, 40), "007": (40, 200, 40), "red car": (40, 40, 200)}


def readme_command(comment: str) -> list[str]:
    """The README command on the line containing `comment`, as an argv list (without the comment)."""
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if comment in line and line.startswith(".venv/bin/finetune"):
            return shlex.split(line.split("#", 1)[0])
    raise AssertionError(f"README.md has no finetune command with the comment {comment!r}")


def make_rgb_folder(root: Path, per_class: int = 32, size=(56, 40), seed: int = 7) -> Path:
    """`root/<class>/*.jpg|png`: noisy colour tiles, one dominant channel per class, landscape format."""
    rng = np.random.default_rng(seed)
    for k, (label, colour) in enumerate(COLOURS.items()):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(colour, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            ext = ".jpg" if i % 2 else ".png"
            Image.fromarray(arr, "RGB").save(root / label / f"img {i:02d}{ext}")
    return root


def as_written(argv: list[str], images: Path) -> list[str]:
    assert argv[0] == ".venv/bin/finetune"
    finetune = str(Path(env()["PATH"].split(":")[0]) / "finetune")
    return [finetune] + [a.replace(PLACEHOLDER, str(images)) for a in argv[1:]]


@pytest.mark.timeout(1500)
def test_the_readme_own_data_commands_work_on_a_non_elpv_folder(tmp_path):
    images = make_rgb_folder(tmp_path / "my images")
    project = new_project(tmp_path / "project", tiny=False)

    validate = sh(*as_written(readme_command("validate any folder"), images), cwd=project, check=False)
    assert validate.returncode == 0, validate.stdout[-2000:] + validate.stderr[-2000:]

    # default params but two unfrozen epochs instead of eight at 112 px: the command is the README's, its cost is cut
    run = sh(*as_written(readme_command("your own data"), images), "--set", "train.stages.1.epochs=2",
             "--set", "train.cpu_image_size=112", cwd=project, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert read(project, "data/classes.json")["classes"] == sorted(COLOURS)
    metrics = read(project, "reports/eval/metrics.json")
    assert set(metrics["per_class"]) == set(COLOURS) and metrics["accuracy"] >= 0.8, metrics
    # the folder defaults, not ELPV's: label strata, natural-image augmentation (no 90-degree rotations)
    summary = read(project, "reports/train/summary.json")
    assert summary["augment"] == ["hflip", "crop", "jitter"], summary
    assert (project / "models/model.onnx").is_file()
    assert read(project, "reports/promote.json")["champion"] == "v0001"
    assert "up to date" in dvc("status", cwd=project).stdout


@pytest.mark.timeout(900)
def test_the_own_data_command_keeps_the_splits_of_a_folder_split_up_front(tmp_path):
    """The layout Keras and per-split ImageFolders use, `train/<class>`, `valid/<class>`, `test/<class>`: the classes
    are the class folders (not `train`, `valid`, `test`), every test image comes from test/ and nothing else, and
    its 60/20/20 split passes validation although data.split says 65/10/25. Short epochs at a small size (the
    command's meaning is the README's; only its cost is cut)."""
    images = tmp_path / "split images"
    for seed, (split, n) in enumerate((("train", 12), ("valid", 4), ("test", 4))):
        make_rgb_folder(images / split, per_class=n, seed=seed)  # other pixels per split: no leakage
    project = new_project(tmp_path / "project", tiny=False)
    fast = ["--set", "train.stages.0.epochs=1", "--set", "train.stages.1.epochs=1", "--set", "train.cpu_image_size=64",
            "--set", "export.int8=false"]  # (the other test makes the INT8 model)

    run = sh(*as_written(readme_command("your own data"), images), *fast, cwd=project, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert read(project, "data/classes.json")["classes"] == sorted(COLOURS)
    validated = pd.read_csv(project / "data/validated.csv", keep_default_na=False, dtype=str)
    folder = validated["path"].str.split("/").str[0].map({"train": "train", "valid": "val", "test": "test"})
    assert (validated["split"] == folder).all() and len(validated) == 3 * 20
    assert read(project, "reports/eval/metrics.json")["n"] == 3 * 4  # test/ exactly
