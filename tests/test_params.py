"""Typed params: unknown keys and bad values are refused with the key named; overrides work."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.params import (
    Params,
    ParamsError,
    load_params,
    render_defaults,
    write_overrides,
)

REPO = Path(__file__).resolve().parents[1]


def committed_params_yaml() -> str:
    """params.yaml as committed (a local `finetune run --set ...` edits the working copy, not the defaults)."""
    proc = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else (REPO / "params.yaml").read_text()


def test_typed_defaults_equal_params_yaml(tmp_path):
    """One source: the typed model's defaults are exactly the values in params.yaml, key by key."""
    f = tmp_path / "params.yaml"
    f.write_text(committed_params_yaml())
    assert load_params(f).model_dump() == Params().model_dump()


def test_params_yaml_is_rendered_from_the_models_with_every_knob_documented():
    text = committed_params_yaml()
    assert text == render_defaults(), "params.yaml drifted from tasks/params/schema.py: `finetune params defaults > params.yaml`"
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    second_stage = [i for i, line in enumerate(lines) if line.lstrip().startswith("- name:")][1]
    assert all("#" in line for line in lines[:second_stage])  # every knob up to there carries its comment
    stage_fields = set(Params().train.stages[0].model_dump())
    later = lines[second_stage:second_stage + len(stage_fields)]  # the other stages reuse the first one's comments
    assert {line.strip().removeprefix("- ").split(":")[0] for line in later} == stage_fields
    assert all("#" in line for line in lines[second_stage + len(stage_fields):])


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ParamsError, match=r"unknown key 'train.batch_sise'"):
        load_params(f)


def test_non_numeric_learning_rate_is_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  stages:\n    - {name: a, epochs: 1, lr: fast}\n")
    with pytest.raises(ParamsError, match=r"train.stages.0.lr.*'fast'"):
        load_params(f)


def test_override_unknown_and_bad_values(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("seed: 1\n")
    assert load_params(f, ["train.batch_size=8"]).train.batch_size == 8
    assert load_params(f, ["train.cpu_image_size=null"]).train.cpu_image_size is None
    with pytest.raises(ParamsError, match="unknown key 'train.nope'"):
        load_params(f, ["train.nope=1"])
    with pytest.raises(ParamsError, match="not of the form key=value"):
        load_params(f, ["train.batch_size"])
    with pytest.raises(ParamsError, match="gates.min.accuracy"):
        load_params(f, ["gates.min.accuracy=1.5"])
    with pytest.raises(ParamsError, match="unknown key 'gates.min.acuracy'"):
        load_params(f, ["gates.min.acuracy=0.5"])
    with pytest.raises(ParamsError, match="gates.champion.*metric: accuracy"):
        load_params(f, ["gates.champion.test=mcnemar"])  # McNemar tests accuracy, the default metric is macro_f1
    with pytest.raises(ParamsError, match="gates.first_run"):
        load_params(f, ["gates.first_run=maybe"])
    # early stopping needs a metric to watch; the default keeps the last epoch and has none
    with pytest.raises(ParamsError, match="early_stopping_patience.*select_metric is 'last'"):
        load_params(f, ["train.early_stopping_patience=2"])
    assert load_params(f, ["train.early_stopping_patience=2", "train.select_metric=loss"]).train.select_metric == "loss"


def test_split_fractions_must_leave_training_data():
    from tasks.params import validate_params

    with pytest.raises(ParamsError, match="leaves no training data"):
        validate_params({"data": {"split": {"test": 0.5, "val": 0.5}}})


def test_write_overrides_keeps_comments_and_validates(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text())
    write_overrides(f, ["gates.min.accuracy=0.5"])
    text = f.read_text()
    assert "accuracy: 0.5" in text
    assert "# lower bounds (higher is better)" in text  # comments survive
    assert load_params(f).gates.min.accuracy == 0.5
    before = f.read_text()
    with pytest.raises(ParamsError):
        write_overrides(f, ["gates.min.accuracy=high"])
    assert f.read_text() == before  # a refused override writes nothing


def test_missing_params_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_a_params_file_that_leaves_keys_out_gets_the_documented_defaults(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  batch_size: 8\n")
    p = load_params(f)
    documented = load_params(REPO / "params.yaml")
    assert p.train.batch_size == 8
    assert p.train.stages == documented.train.stages and p.gates == documented.gates and p.data == documented.data


def test_override_inside_a_list(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text((REPO / "params.yaml").read_text())
    assert load_params(f, ["train.stages.1.lr=0.0005"]).train.stages[1].lr == 0.0005
    with pytest.raises(ParamsError, match="not an index"):
        load_params(f, ["train.stages.9.lr=0.1"])
    with pytest.raises(ParamsError, match=r"train.stages.0.lr.*'fast'"):
        load_params(f, ["train.stages.0.lr=fast"])


def test_auto_defaults_fit_the_data_source():
    """ELPV's facts (stratification columns, orientation invariance) come with the ELPV source only."""
    from tasks.params import DataParams, TrainParams, augmentations, stratify_columns

    elpv, folder = DataParams(), DataParams(source="folder", path="/data/pets")
    assert stratify_columns(elpv) == ["probability", "type"] and stratify_columns(folder) == []
    assert augmentations(elpv, TrainParams()) == ["hflip", "vflip", "rot90"]
    assert augmentations(folder, TrainParams()) == ["hflip", "crop", "jitter"]  # natural images have an up
    micrographs = DataParams(source="folder", path="/data/cells", orientation_invariant=True)
    assert augmentations(micrographs, TrainParams()) == ["hflip", "vflip", "rot90"]  # keeps the exact feature cache
    assert augmentations(folder, TrainParams(augment=["hflip"])) == ["hflip"]  # an explicit list wins


@pytest.mark.parametrize("key, value, words", [
    ("seed", "9" * 5000, "'seed': '999"),
    ("seed", str(2 ** 40), "'seed': 1099511627776 (Input should be less than or equal to 4294967295)"),
    ("registry.root", "r" * 5000, "'registry.root': 'rrr"),
    ("registry.root", "models/" + "x" * 300, "'registry.root'"),
    ("train.stages.0.name", "x" * 100_000, "'train.stages.0.name'"),
    ("train.stages.0.name", "head only", "'train.stages.0.name'"),
    ("model.arch", "x" * 100_000, "'model.arch'"),
    ("train.stages.0.lr", ".inf", "'train.stages.0.lr': inf (Input should be a finite number)"),
    ("data.max_pixels", "9" * 30, "'data.max_pixels'"),
])
def test_runaway_values_are_refused_up_front_naming_the_key(tmp_path, key, value, words):
    """Issue 32: every string and number is bounded in the schema, so a huge value fails when params are read
    (before any stage runs), with its key named and the value cut short, from a file and from --set alike."""
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", [f"{key}={value}"])
    assert words in str(err.value) and len(str(err.value)) < 400, str(err.value)[:500]
    f = tmp_path / "params.yaml"
    if key == "seed":
        f.write_text(f"seed: {value}\n")
        with pytest.raises(ParamsError, match="bad value for 'seed'") as err:
            load_params(f)
        assert len(str(err.value)) < 400
