"""The pipeline flow's run discipline on a project whose stages are small scripts (real DVC, real git,
a real Prefect server): one run per project at a time, overrides taken out again when a run fails,
retries only where they can help, and a stage timeout that stops the stage's whole process group."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import stages
from tasks.params import load_params, render_defaults, write_overrides
from tests.conftest import REPO
from tests.test_end_to_end import dvc, env, sh

pytestmark = pytest.mark.slow

STAGES = stages.NAMES  # ingest, validate, fetch_model, label_issues, train, evaluate, gate, export, promote

# One script plays every stage; behaviour.json says, per stage: fail N times, always fail, or block until
# the test creates `release` (recording its pid, and a child's, in `entered-<stage>`).
STAGE_SCRIPT = """\
import json, os, pathlib, subprocess, sys, time
stage = sys.argv[1]
spec = json.loads(pathlib.Path("behaviour.json").read_text()).get(stage, {})
count = pathlib.Path("counts") / stage
count.parent.mkdir(exist_ok=True)
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if spec.get("block"):
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    pathlib.Path(f"entered-{stage}").write_text(json.dumps([os.getpid(), child.pid]))
    deadline = time.monotonic() + 300
    while not pathlib.Path("release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()
if spec.get("fail") or n <= spec.get("fail_times", 0):
    print(f"error: {stage} failed (attempt {n})", file=sys.stderr)
    sys.exit(1)
"""


def scripted_project(root: Path, behaviour: dict, overrides: list[str] = ()) -> Path:
    root.mkdir(parents=True)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "behaviour.json").write_text(json.dumps(behaviour))
    (root / "params.yaml").write_text(render_defaults())
    write_overrides(root / "params.yaml", ["orchestration.retry_delay_s=0", *overrides])
    stages = {s: {"cmd": f"python stage.py {s}", "deps": ["stage.py", "behaviour.json"], "params": ["train"]}
              for s in STAGES}
    (root / "dvc.yaml").write_text(json.dumps({"stages": stages}, indent=1))
    (root / ".gitignore").write_text("/.finetune/\n/counts/\n")
    sh("git", "init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    return root


def counts(root: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in (root / "counts").iterdir()} if (root / "counts").exists() else {}


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc is None or proc.poll() is None, f"the run exited early:\n{proc.stdout.read() if proc.stdout else ''}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if ") Z" in stat:  # a zombie waiting for its parent: not running any more
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_second_run_is_refused_before_it_touches_anything_naming_the_running_one(prefect_server, tmp_path):
    """Issue 12 #2: run A holds the project from before its overrides are written until it ends; run B,
    started while A is inside a stage, is refused before writing its overrides, and names A."""
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import finetune_pipeline
    from flows.project import ProjectBusy

    root = scripted_project(tmp_path / "proj", {"ingest": {"block": True}, "validate": {"fail": True}},
                            ["orchestration.lock_wait_s=0"])
    code = ("from flows.pipeline import finetune_pipeline\n"
            f"finetune_pipeline(overrides=['train.batch_size=3'], workdir={str(root)!r})\n")
    run_a = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**env(), "PREFECT_API_URL": PREFECT_API_URL.value()},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(root / "entered-ingest", run_a)
        during_a = (root / "params.yaml").read_bytes()
        assert load_params(root / "params.yaml").train.batch_size == 3
        with pytest.raises(ProjectBusy) as err:
            finetune_pipeline(overrides=["train.batch_size=5"], workdir=str(root))
        message = str(err.value)
        assert f"pid {run_a.pid}" in message and "in use by flow run '" in message and "nothing was changed" in message
        assert (root / "params.yaml").read_bytes() == during_a  # B wrote nothing
        assert counts(root) == {"ingest": 1}  # B ran nothing
    finally:
        (root / "release").touch()
        out = run_a.communicate(timeout=300)[0]
    assert "stage 'validate' failed" in out


def test_a_failed_run_takes_its_overrides_out_of_params_and_says_so(prefect_server, tmp_path):
    """Issue 12 #12: the failure message names the overrides, and the file is as it was before the run."""
    from flows.pipeline import StageFailed, finetune_pipeline

    root = scripted_project(tmp_path / "proj", {"validate": {"fail": True}})
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(StageFailed) as err:
        finetune_pipeline(params={"train": {"batch_size": 7}}, overrides=["train.stages.0.epochs=5"], workdir=str(root))
    message = str(err.value)
    assert message.startswith("stage 'validate' failed: validate failed (attempt 1); params.yaml restored")
    assert "train.batch_size=7, train.stages.0.epochs=5" in message
    assert (root / "params.yaml").read_bytes() == before


def test_retries_only_for_stages_that_do_io_and_never_for_the_gate(prefect_server, tmp_path):
    from flows.pipeline import StageFailed, finetune_pipeline

    root = scripted_project(tmp_path / "proj", {"ingest": {"fail_times": 1}, "fetch_model": {"fail_times": 2},
                                                "train": {"fail_times": 0}, "gate": {"fail": True}})
    with pytest.raises(StageFailed, match="stage 'gate' failed: gate failed"):
        finetune_pipeline(workdir=str(root))
    assert counts(root) == {"ingest": 2, "validate": 1, "fetch_model": 3, "label_issues": 1, "train": 1, "evaluate": 1,
                            "gate": 1}


def test_a_stage_over_the_timeout_is_stopped_with_its_children_and_the_next_run_works(prefect_server, tmp_path):
    from flows.pipeline import finetune_pipeline

    root = scripted_project(tmp_path / "proj", {"ingest": {"block": True}, "validate": {"fail": True}},
                            ["orchestration.stage_timeout_s=3"])
    state = finetune_pipeline(workdir=str(root), overrides=["train.batch_size=3"], return_state=True)
    assert state.type.value == "FAILED" and state.name == "TimedOut", state
    assert "ran longer than orchestration.stage_timeout_s = 3 s and was stopped" in state.message
    assert "params.yaml restored" in state.message
    stage_pid, child_pid = json.loads((root / "entered-ingest").read_text())
    assert gone(stage_pid) and gone(child_pid), "the stage's processes outlived the timeout"
    # DVC's lock was released with the stopped process: the next run gets past ingest
    (root / "behaviour.json").write_text(json.dumps({"validate": {"fail": True}}))
    state = finetune_pipeline(workdir=str(root), return_state=True)
    assert "stage 'validate' failed" in state.message and counts(root)["ingest"] == 2


def test_the_flow_refuses_bad_overrides_before_taking_the_project(prefect_server, tmp_path):
    from flows.pipeline import finetune_pipeline
    from tasks.params import ParamsError

    root = scripted_project(tmp_path / "proj", {})
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(ParamsError, match="unknown key 'train.batch_sise'"):
        finetune_pipeline(overrides=["train.batch_sise=3"], workdir=str(root))
    assert (root / "params.yaml").read_bytes() == before and not (root / ".finetune").exists() and counts(root) == {}
    assert os.path.exists(root / "dvc.yaml")


def test_a_failed_stage_reads_as_its_error_lines_without_tracebacks(prefect_server, tmp_path):
    """What `finetune run` prints when a stage fails: the stage's own error and the one-line summary, not
    Prefect's tracebacks of our orchestration code (the stage ran in another process)."""
    from prefect.settings import PREFECT_API_URL

    root = scripted_project(tmp_path / "proj", {"gate": {"fail": True}})
    finetune = str(Path(sys.executable).parent / "finetune")
    run = subprocess.run([finetune, "run", "--workdir", str(root)], cwd=root, capture_output=True, text=True,
                         env={**env(), "PREFECT_API_URL": PREFECT_API_URL.value()}, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "error: stage 'gate' failed: gate failed (attempt 1)" in out
    assert "Task run failed with exception: StageFailed" in out  # Prefect still reports the failure...
    assert "Traceback" not in out  # ...without a traceback
    assert counts(root) == {s: 1 for s in STAGES[:STAGES.index("gate") + 1]}


def run_logs(state) -> str:
    """The log lines of a finished in-process flow run, from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the handlers send in batches; this waits until every batch is sent
    with get_client(sync_client=True) as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return "\n".join(log.message for log in logs)


def stages_of(root: Path, return_state: bool = False):
    """The pipeline flow's `run_stages` alone, in a flow of its own (the scripted stages write none of the outputs
    the pipeline flow reads after them)."""
    from prefect import flow

    from flows.pipeline import run_stages

    @flow(name="stages-only")
    def stages_only(workdir: str) -> dict:
        return run_stages(Path(workdir), load_params(Path(workdir) / "params.yaml").orchestration)

    runs = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in runs]
    for logger in runs:  # the runs' INFO lines reach the API (conftest's PREFECT_LOGGING_LEVEL is WARNING)
        logger.setLevel(logging.INFO)
    try:
        return stages_only(str(root), return_state=return_state)
    finally:
        for logger, level in zip(runs, levels):
            logger.setLevel(level)


def test_stages_one_dvc_status_finds_unchanged_are_settled_without_dvc_and_the_rest_go_through_it(prefect_server,
                                                                                                  tmp_path):
    """One `dvc status` at the start of a run settles the unchanged stages before the first changed one (no
    `dvc repro` started for each); from the first stage that runs on, every stage goes through DVC, which decides.
    Results and dvc.lock are what `dvc repro` alone gives."""
    root = scripted_project(tmp_path / "proj", {})
    assert set(stages_of(root).values()) == {"ran"} and counts(root) == {s: 1 for s in STAGES}

    dvc_yaml = json.loads((root / "dvc.yaml").read_text())  # the gate's command changes, nothing else
    dvc_yaml["stages"]["gate"]["cmd"] += " --reworded"
    (root / "dvc.yaml").write_text(json.dumps(dvc_yaml, indent=1))
    state = stages_of(root, return_state=True)
    gate = STAGES.index("gate")
    assert state.result() == {s: "ran" if s == "gate" else "skipped (up to date)" for s in STAGES}
    assert counts(root) == {s: 2 if s == "gate" else 1 for s in STAGES}
    logs = run_logs(state)
    for s in STAGES[:gate]:  # settled by the status: DVC never started for them
        assert f"Stage '{s}' is up to date (dvc status at the start of this run): not run" in logs
        assert f"Stage '{s}' didn't change" not in logs
    for s in STAGES[gate + 1:]:  # after a stage ran: through `dvc repro`, which found them unchanged
        assert f"Stage '{s}' didn't change, skipping" in logs, logs
    assert "up to date" in dvc("status", cwd=root).stdout
    assert set(stages_of(root).values()) == {"skipped (up to date)"} and counts(root)["gate"] == 2  # nothing to do


def test_a_new_server_starts_on_a_copy_of_the_migrated_template_database(prefect_server):
    """The session's server started on a copy of the template (every migration applied once, per Prefect version):
    its database has Prefect's tables at the template's alembic revision, and it answers."""
    import sqlite3
    from contextlib import closing

    import prefect

    from finetune import local_prefect as lp

    template = lp.template_database()
    assert template.name == f"prefect-{prefect.__version__}.db" and lp.template_database() == template

    def revision_and_tables(path: Path) -> tuple[str, set[str]]:
        with closing(sqlite3.connect(path)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return db.execute("SELECT version_num FROM alembic_version").fetchone()[0], tables

    revision, tables = revision_and_tables(template)
    assert {"flow_run", "deployment", "log", "artifact"} <= tables
    assert revision_and_tables(prefect_server.state / "home" / "prefect.db")[0] == revision
    assert lp.healthy(prefect_server)


def test_without_a_cache_to_write_to_a_server_gets_no_database_and_migrates_its_own(tmp_path, monkeypatch):
    """No half-copied database is left for a server when the cache cannot be written, and a database that exists
    is never replaced."""
    from finetune import local_prefect as lp

    def unwritable_cache():
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache"))

    monkeypatch.setattr(lp, "template_database", unwritable_cache)
    database = tmp_path / "home" / "prefect.db"
    assert not lp.seed_database(database) and not database.exists()

    template = tmp_path / "template.db"
    template.write_bytes(b"migrated")
    monkeypatch.setattr(lp, "template_database", lambda: template)
    assert lp.seed_database(database) and database.read_bytes() == b"migrated"
    database.write_bytes(b"in use")
    assert not lp.seed_database(database) and database.read_bytes() == b"in use"
