"""The Prefect side without a server: the run form, the project lock, params put back on failure,
lineage records, the deployments file and the local server/worker plumbing."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema  # noqa: E402
from pydantic import BaseModel

from flows import project
from flows.form import RunForm, form_parameters, to_patch
from flows.pipeline import finetune_pipeline  # noqa: E402
from flows.retrain import finetune_retrain  # noqa: E402
from tasks import lineage
from tasks.params import (
    Params,
    load_params,
    prepare_change,
    render_defaults,
    write_overrides,
)
from tests.conftest import REPO

# ---- the run form ---------------------------------------------------------------------------------


def form_schema() -> dict:
    return parameter_schema(finetune_pipeline.fn).model_dump()


def test_the_form_takes_types_choices_bounds_and_descriptions_from_the_params_models():
    """Every knob is in the form with its schema's type: choices as enums (dropdowns), bounds as min/max, the
    description rendered readably (`<class>` kept in a code span), sections nested, unknown keys refused."""
    schema = form_schema()
    defs = schema["definitions"]
    source = defs["RunModelForm"]["properties"]["source"]
    assert source["enum"] == ["bundled", "torchvision", "timm", "checkpoint"] and source["default"] == "bundled"
    assert source["description"] == Params.model_fields["model"].annotation.model_fields["source"].description
    assert defs["RunDataForm"]["properties"]["source"]["enum"] == ["elpv", "folder", "manifest"]
    assert "`path/<class>/*`" in defs["RunDataForm"]["properties"]["source"]["description"]
    lr = defs["RunStageForm"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0.0 and lr["type"] == "number"
    epochs = defs["RunStageForm"]["properties"]["epochs"]
    assert (epochs["minimum"], epochs["maximum"]) == (0, 1000)
    assert defs["RunTrainForm"]["properties"]["batch_size"]["type"] == "integer"
    assert defs["RunMinBoundsForm"]["properties"]["accuracy"]["anyOf"][0]["maximum"] == 1.0  # null: the gate is off
    assert all(d.get("additionalProperties") is False for d in defs.values())

    def knobs(model) -> int:
        sub = [f.annotation for f in model.model_fields.values()]
        return sum(knobs(a) if isinstance(a, type) and issubclass(a, BaseModel) else 1 for a in sub)

    assert knobs(RunForm) == knobs(Params)  # every knob
    assert set(schema["properties"]) == {"params", "overrides", "workdir", "form_of"}
    retrain = parameter_schema(finetune_retrain.fn).model_dump()
    assert set(retrain["definitions"]["RetrainForm"]["properties"]) == {"data", "train", "gates"}


def test_a_form_changes_exactly_the_fields_that_differ_from_the_values_it_was_filled_with(tmp_path):
    """The form's values reach params.yaml as typed values (no `--set` text parsed back: `007` stays text); an
    unchanged form, even one filled from an older params.yaml, changes nothing; an API call that gives a few fields
    changes those."""
    root = tmp_path
    f = root / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text())
    filled = form_parameters(root)["finetune-pipeline"]
    form_of = filled["form_of"]
    unchanged = RunForm.model_validate(filled["params"])
    assert to_patch(unchanged, root, form_of) == {} and to_patch(RunForm(), root, None) == {}

    write_overrides(f, ["train.batch_size=12"])  # params.yaml changed since the form was filled
    assert to_patch(unchanged, root, form_of) == {}  # a stale page or a scheduled run reverts nothing
    edited = RunForm.model_validate(filled["params"])
    edited.data.path = "007"
    edited.train.stages[1].lr = 0.01
    patch = to_patch(edited, root, form_of)
    assert patch == {"data": {"path": "007"}, "train": {"stages": [{}, {"lr": 0.01}]}}
    change = prepare_change(f, [], patch)
    change.write()
    p = load_params(f)
    assert p.data.path == "007" and p.train.stages[1].lr == 0.01 and p.train.batch_size == 12  # the rest kept
    assert "# Every knob of the pipeline" in f.read_text()  # comments kept
    assert project.describe_change(change) == ["data.path=007", "train.stages.1.lr=0.01"]

    partial = RunForm.model_validate({"train": {"batch_size": 8}, "gates": {"champion": {"require_significant": True}}})
    assert to_patch(partial, root, None) == {"train": {"batch_size": 8},
                                             "gates": {"champion": {"require_significant": True}}}


@pytest.mark.parametrize("bad, key", [
    ({"train": {"stages": [{"name": "a", "epochs": 1, "lr": -0.1}]}}, "train.stages.0.lr"),
    ({"model": {"source": "hub"}}, "model.source"),
    ({"data": {"sourc": "folder"}}, "data.sourc"),
    ({"gates": {"min": {"accuracy": 1.5}}}, "gates.min.accuracy"),
])
def test_the_form_refuses_what_params_refuse(bad, key):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        RunForm.model_validate(bad)


def test_a_cross_field_rule_is_judged_on_params_yaml_with_the_change_applied(tmp_path):
    """The form carries no cross-field rules: a change that is fine with the file's other values is accepted,
    and a change that contradicts them is refused with the key named, before anything is written."""
    from tasks.params import ParamsError

    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text())
    write_overrides(f, ["train.select_metric=macro_f1"])
    ok = RunForm.model_validate({"train": {"early_stopping_patience": 3}})  # alone it would break select_metric: last
    assert prepare_change(f, [], to_patch(ok, tmp_path)).params.train.early_stopping_patience == 3
    bad = RunForm.model_validate({"data": {"source": "folder"}, "export": {"tta": "dihedral"}})
    before = f.read_bytes()
    with pytest.raises(ParamsError, match="export.tta"):
        prepare_change(f, [], to_patch(bad, tmp_path))
    assert f.read_bytes() == before


# ---- the project lock (issue 12 #2) ---------------------------------------------------------------


def _hold_until(root: str, entered: str, release: str) -> None:
    """Another process holding the project until `release` exists (a run in progress)."""
    import time

    with project.hold(Path(root), 0, {"flow_run_name": "other-run", "deployment": "finetune-pipeline/manual"}, print):
        Path(entered).touch()
        deadline = time.monotonic() + 120
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_for(path: Path, proc, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.is_alive(), "the holder process died"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    entered, release = tmp_path / "entered", tmp_path / "release"
    root = tmp_path / "proj"
    root.mkdir()
    proc = ctx.Process(target=_hold_until, args=(str(root), str(entered), str(release)))
    proc.start()
    wait_for(entered, proc)
    yield root, release, proc
    release.touch()
    proc.join(60)


def test_a_second_run_is_refused_naming_the_running_one(holder):
    root, _, proc = holder
    with pytest.raises(project.ProjectBusy) as err:
        with project.hold(root, 0, {"flow_run_name": "mine"}, print):
            pytest.fail("entered a project another run holds")
    message = str(err.value)
    assert "in use by flow run 'other-run' (finetune-pipeline/manual)" in message and f"pid {proc.pid}" in message
    assert "nothing was changed" in message


def test_a_second_run_waits_saying_for_whom_then_runs(holder):
    root, release, proc = holder
    said: list[str] = []
    waiting = threading.Event()

    def say(line: str) -> None:
        said.append(line)
        if "waiting up to" in line:
            waiting.set()

    entered = threading.Event()

    def second() -> None:
        with project.hold(root, 120, {"flow_run_name": "mine"}, say) as record:
            assert project.read_holder(root)["flow_run_name"] == "mine" == record["flow_run_name"]
            entered.set()

    t = threading.Thread(target=second)
    t.start()
    assert waiting.wait(60), said
    assert not entered.is_set() and "other-run" in said[0]
    release.touch()
    t.join(60)
    assert entered.is_set()
    assert project.read_holder(root)["state"] == "ended"


def test_a_killed_holder_leaves_no_stale_lock_and_is_reported(tmp_path):
    root = tmp_path / "proj"
    code = ("import os, sys; from pathlib import Path; from flows import project\n"
            f"with project.hold(Path({str(root)!r}), 0, {{'flow_run_name': 'killed-run', 'overrides': ['a.b=1']}}, print):\n"
            "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9
    said = []
    with project.hold(root, 0, {"flow_run_name": "next"}, said.append):
        pass
    assert "ended without finishing" in said[0] and "killed-run" in said[0] and "a.b=1" in said[0]


# ---- params put back when a run fails (issue 12 #12) --------------------------------------------


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(render_defaults())
    return path


def test_a_failed_block_restores_params_and_says_which_overrides_left(params_file):
    before = params_file.read_bytes()
    with pytest.raises(RuntimeError) as err:
        change = prepare_change(params_file, ["train.batch_size=7", "orchestration.webhook=https://u:p@h/x"])
        with project.params_applied(change, print) as applied:
            assert load_params(params_file).train.batch_size == 7 and applied.params.train.batch_size == 7
            raise RuntimeError("stage 'gate' failed: gate failed")
    assert params_file.read_bytes() == before
    message = str(err.value)
    assert message.startswith("stage 'gate' failed: gate failed; params.yaml restored")
    assert "train.batch_size=7" in message and "orchestration.webhook=***" in message and "u:p" not in message


def test_a_successful_block_keeps_the_overrides(params_file):
    with project.params_applied(prepare_change(params_file, ["train.batch_size=7"]), print):
        pass
    assert load_params(params_file).train.batch_size == 7


def test_a_file_edited_during_the_run_is_left_alone_and_the_message_says_so(params_file):
    with pytest.raises(RuntimeError, match="edited during the run and is left as it is.*train.batch_size=7"):
        with project.params_applied(prepare_change(params_file, ["train.batch_size=7"]), print):
            write_overrides(params_file, ["train.batch_size=9"])
            raise RuntimeError("boom")
    assert load_params(params_file).train.batch_size == 9


def test_redact_hides_secrets_in_overrides():
    assert project.redact("orchestration.webhook=https://hooks.example/T0/B1/xyz") == "orchestration.webhook=***"
    assert project.redact("model.weights=https://user:token@host/w.pth") == "model.weights=https://***@host/w.pth"
    assert project.redact("train.batch_size=8") == "train.batch_size=8"


# ---- lineage in the registry ----------------------------------------------------------------------


def test_lineage_records_accumulate_per_version(tmp_path):
    assert lineage.read(tmp_path, "v1") == [] and lineage.latest(tmp_path, "v0001") is None
    lineage.record(tmp_path, "v1", {"data": {"dvc_hash": "a.dir"}})
    lineage.record(tmp_path, "v0001", {"data": {"dvc_hash": "b.dir"}})
    assert [r["data"]["dvc_hash"] for r in lineage.read(tmp_path, "1")] == ["a.dir", "b.dir"]
    assert json.loads((tmp_path / "lineage" / "v0001.json").read_text())["version"] == "v0001"
    (tmp_path / "lineage" / "v0002.json").write_text("{")
    from tasks.registry import RegistryError

    with pytest.raises(RegistryError, match="v0002.json is not valid JSON"):
        lineage.latest(tmp_path, "v2")


def test_the_data_dependency_hash_is_dvcs_and_follows_the_data(tmp_path):
    from tests.conftest import make_dataset
    from tests.test_end_to_end import dvc, sh

    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text(render_defaults())
    write_overrides(root / "params.yaml", ["data.source=folder", "data.path=raw"])
    (root / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: python -c pass\n    deps:\n      - ${data.path}\n")
    make_dataset(root / "raw", per_class=3, size=32)
    sh("git", "init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    path, first = project.data_dependency(root)
    dvc("repro", cwd=root)
    assert path == "raw" and project.locked_data_hash(root, "raw") == first and first.endswith(".dir")
    make_dataset(root / "raw" / "dark" / "more", classes=("x",), per_class=1, size=32, seed=5)
    assert project.data_dependency(root)[1] != first


# ---- deployments, the CLI, the local server plumbing ---------------------------------------------


def test_prefect_yaml_declares_a_manual_and_a_scheduled_deployment_on_a_process_pool():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"manual", "nightly"}
    assert deployments["manual"]["entrypoint"] == "flows/pipeline.py:finetune_pipeline"
    assert deployments["nightly"]["entrypoint"] == "flows/retrain.py:finetune_retrain"
    assert not deployments["manual"].get("schedules") and deployments["nightly"]["schedules"][0]["cron"]
    for d in deployments.values():
        assert d["work_pool"]["name"] == "finetune" and d["enforce_parameter_schema"] is True
        module, name = d["entrypoint"].split(":")
        assert callable(getattr(__import__(module.removesuffix(".py").replace("/", "."), fromlist=[name]), name))
    assert spec["prefect-version"] == __import__("prefect").__version__


def test_orchestration_params_are_documented_and_bounded():
    p = Params()
    assert p.orchestration.webhook is None and p.orchestration.dask_workers == 0  # notifications and Dask: off
    from tasks.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match="orchestration.io_retries"):
        validate_params({"orchestration": {"io_retries": -1}})


def test_a_pid_is_signalled_only_while_it_is_the_process_we_started(tmp_path):
    from finetune.local_prefect import Local, _alive_pid, stop

    local = Local(tmp_path)
    local.state.mkdir()
    (local.state / "worker.pid").write_text(f"{os.getpid()}\n")  # this pytest process: not a prefect worker
    assert _alive_pid(local, "worker") is None
    assert stop(local) == ["worker: not running", "server: not running"]
    assert not (local.state / "worker.pid").exists()


def test_run_refuses_a_params_file_the_stages_do_not_read(tmp_path):
    from tests.test_cli import finetune, one_line_error

    (tmp_path / "other.yaml").write_text(render_defaults())
    one_line_error(finetune("run", "--params", "other.yaml", cwd=tmp_path), "the stages read", "--set")
