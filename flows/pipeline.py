"""The pipeline as a Prefect flow: one task per DVC stage, run in order through `dvc repro`.

Design (README "Architecture", docs/orchestration.md): DVC is the single owner of what is stale.
Each Prefect task runs `dvc repro --single-item <stage>`, which runs the stage's
`python -m tasks.<stage>` command only when its code, data or params changed, and records the
result in `dvc.lock` (the stages one `dvc status` finds unchanged before the first that is not are settled
without starting DVC for each). So a flow run and a plain `dvc repro` do the same work with the same stage
functions, and `dvc status` is clean after either. Prefect adds what DVC lacks: the dashboard run
form (`flows.form.RunForm`), deployments and schedules (prefect.yaml), retries of the stages that
do I/O, a stage timeout, logs per stage, artifacts, lineage and notifications.

One path for every entry point (`finetune run --set`, the dashboard form, an API call, the
schedule): the run takes the project lock (`flows.project.hold`) before touching anything, writes
the validated overrides into params.yaml (like `dvc exp run -S`, so the params DVC records are the
ones that produced the outputs), then runs the stages. A failed run takes its overrides out of
params.yaml again and says so in its failure message.

Retries: ingest (reads the data), fetch_model (fetches weights) and promote (writes the registry,
idempotently) retry `orchestration.io_retries` times with a doubling delay. train, evaluate, gate and
export never retry: the same inputs give the same failure, and a failed gate is a verdict, not an
accident. Every stage is stopped after `orchestration.stage_timeout_s` (its whole process group).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from prefect import flow, get_run_logger, task
from pydantic import BaseModel
from prefect.cache_policies import NO_CACHE

from flows import artifacts, project
from flows.form import RunForm, sync_forms_quietly, to_patch
from tasks import lineage
from tasks.files import read_json
from tasks.params import OrchestrationParams, Params, prepare_change
from tasks.registry import read_metadata, resolve_root
from tasks.reviewed import ensure_review_list
from tasks.stages import STAGES, Stage, path

OUTPUTS = {k: path(k) for k in ("model", "model_int8", "model_card", "metrics", "verdict", "verdict_md",
                                 "promotion")}
PARAMS_FILE = "params.yaml"  # what dvc.yaml's stages read
STOP_GRACE_S = 10.0
SKIPPED = "skipped (up to date)"  # a stage's result when DVC had nothing to run


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the stage's own error line."""


class StageTimedOut(StageFailed, TimeoutError):
    """A stage ran past `orchestration.stage_timeout_s` and was stopped (the run ends TimedOut)."""


class _NoTracebackForStageFailures(logging.Filter):
    """Prefect's engines log a task's or flow's exception with its traceback. A StageFailed already carries the
    stage's own one-line error, and its traceback shows only this module's subprocess bookkeeping (the stage
    ran in another process), so it is logged without one; every other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageFailed):
            record.exc_info = record.exc_text = None
        return True


for _engine_logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_engine_logger).addFilter(_NoTracebackForStageFailures())


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    bin_dir = str(Path(sys.executable).parent)  # the venv's `python` and `dvc`, whatever PATH says
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop the stage's whole process group (dvc and the stage's python): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, workdir: str, timeout_s: float | None = None, up_to_date: bool = False) -> str:
    """`dvc repro --single-item <stage>`, its output streamed into this task run's log; `up_to_date`: the run's
    `dvc status` found the stage and everything before it unchanged, so DVC is not started for it."""
    logger = get_run_logger()
    if up_to_date:
        logger.info("Stage '%s' is up to date (dvc status at the start of this run): not run", stage)
        return SKIPPED
    before = locked_entry(Path(workdir), stage)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=workdir, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)  # its own process group: a timeout stops all of it
    tail: deque[str] = deque(maxlen=20)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line := line.rstrip():
                logger.info("%s", line)
                tail.append(line)

    # the task's context goes with the lines: Prefect settings given in-process (temporary_settings) reach the
    # thread, so its lines go to this run's API and not to a temporary server of the thread's own
    reader = threading.Thread(target=contextvars.copy_context().run, args=(pump,), name=f"log-{stage}", daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise StageTimedOut(f"stage '{stage}' ran longer than orchestration.stage_timeout_s = {timeout_s:g} s "
                            "and was stopped") from None
    finally:
        if proc.poll() is None:  # a timeout, or this run was interrupted or cancelled
            _stop(proc)
        reader.join(timeout=STOP_GRACE_S)
    if code != 0:
        errors = [t for t in tail if t.startswith("error:")]
        reason = errors[-1].removeprefix("error: ") if errors else (tail[-1] if tail else "no output")
        raise StageFailed(f"stage '{stage}' failed: {reason}")
    return "ran" if locked_entry(Path(workdir), stage) != before else SKIPPED


def stale_stages(root: Path) -> set[str] | None:
    """The stages `dvc status` finds changed (code, data, params or outputs), from one DVC call; None when it cannot
    tell, and then every stage goes through `dvc repro`."""
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=_env(),
                              capture_output=True, text=True, timeout=600, check=False)
        status = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return {name.rsplit(":", 1)[-1] for name in status} if isinstance(status, dict) else None


def locked_entry(root: Path, stage: str) -> dict | None:
    """What dvc.lock records for `stage` (its command, deps, params and outs with their hashes), or None. DVC
    rewrites the entry whenever it runs the stage (or restores it from its run cache) and leaves it alone when
    the stage is up to date, so comparing it before and after tells the two apart."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    return ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage)


def _not_timed_out(task, task_run, state) -> bool:
    """No retry after a stage timeout: `stage_timeout_s` is the stage's budget, not each attempt's."""
    return not isinstance(state.result(raise_on_failure=False), TimeoutError)


def stage_task(stage: Stage, orchestration: OrchestrationParams):
    """`run_stage` with this stage's retry policy: retries only where a retry can help."""
    retries = orchestration.io_retries if stage.retries else 0
    delays = [orchestration.retry_delay_s * 2**i for i in range(retries)] or 0
    return run_stage.with_options(retries=retries, retry_delay_seconds=delays, retry_condition_fn=_not_timed_out)


def promotion_line(promotion: dict) -> str:
    """One line about the registry after the promote stage (Prefect artifact and the run summary)."""
    was = promotion.get("previous_champion")
    return (f"{promotion['version']} {'registered' if promotion['registered'] else 'already registered'}, "
            f"{'promoted' if promotion['promoted'] else 'already the champion'}: champion {promotion['champion']}"
            + (f" (was {was})" if was and promotion["promoted"] else "") + f", registry {promotion['registry']}")


def publish_stage(stage: str, root: Path, failed: bool) -> None:
    """The artifacts of one stage's outputs, as soon as it is done (or has failed)."""
    if stage == "validate":
        artifacts.validation(root)
    elif stage == "label_issues":
        artifacts.label_issues(root, failed)
    elif stage == "train" and not failed:
        artifacts.training(root)
    elif stage == "evaluate":
        artifacts.metrics(root)
    elif stage == "gate":
        artifacts.verdict(root, failed)
    elif stage == "export":
        artifacts.model_card(root)


def run_stages(root: Path, orchestration: OrchestrationParams) -> dict[str, str]:
    """Every stage in order, each through DVC with its retry policy and the stage timeout. One `dvc status` first:
    the stages it finds unchanged before the first that is not are settled without starting DVC for each (~1.2 s a
    stage; a run with nothing to do takes seconds, not 15); from the first stage that runs on, every stage goes
    through `dvc repro`, since what ran may change what follows."""
    ran: dict[str, str] = {}
    ensure_review_list(root / path("label_reviewed"))  # a DVC dependency; ingest makes it, but it may be deleted
    stale = stale_stages(root)
    for stage in STAGES:
        settled = stale is not None and stage.name not in stale and all(r == SKIPPED for r in ran.values())
        try:
            ran[stage.name] = stage_task(stage, orchestration)(stage.name, str(root), orchestration.stage_timeout_s,
                                                               up_to_date=settled)
        except StageFailed:
            publish_stage(stage.name, root, failed=True)
            raise
        publish_stage(stage.name, root, failed=False)
    return ran


def _runtime() -> dict:
    """This flow run, as lineage and the project lock's holder record name it."""
    from prefect.runtime import deployment, flow_run
    from prefect.settings import PREFECT_UI_URL

    url = flow_run.ui_url if PREFECT_UI_URL.value() else None  # without a UI URL Prefect gives 'None/flow-runs/...'
    return {"flow": flow_run.flow_name, "flow_run_id": flow_run.id, "flow_run_name": flow_run.name,
            "url": url, "deployment": f"{flow_run.flow_name}/{deployment.name}" if deployment.name else None}


@contextmanager
def holding_project(form: BaseModel | None, overrides: list[str], workdir: str,
                    form_of: str | None = None) -> Iterator[project.AppliedParams]:
    """The start every flow shares: validate the form's changes and the overrides against params.yaml once
    (nothing touched yet), take the project lock, write the change into params.yaml (restored if the block
    fails). At the end the deployments' forms are filled with params.yaml as it then is."""
    logger = get_run_logger()
    root = Path(workdir).resolve()
    change = prepare_change(root / PARAMS_FILE, list(overrides or []), to_patch(form, root, form_of))  # fails here
    shown = project.describe_change(change)
    holder = {**_runtime(), "overrides": shown}
    try:
        with project.hold(root, change.params.orchestration.lock_wait_s, holder, logger.warning):
            with project.params_applied(change, logger.info) as applied:
                artifacts.run_params(shown if applied.changed else [], _sha256(applied.path))
                yield applied
    finally:
        sync_forms_quietly(root)


def registry_root(root: Path, p: Params) -> Path:
    return resolve_root(root / PARAMS_FILE, p.registry.root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_lineage(root: Path, p: Params, promotion: dict, promote_ran: bool, trigger: dict | None = None) -> dict:
    """Lineage of the promoted version, on the flow run (artifact) and in the registry (lineage/); `trigger`: why the
    run ran (the retraining flow: new data, forced, or a drift alarm with its p-values and window)."""
    reg = registry_root(root, p)
    run = _runtime()
    entry = {
        "version": promotion["version"],
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"path": p.data.path, "dvc_hash": project.locked_data_hash(root, p.data.path or ""),
                 "manifest_sha256": read_metadata(reg, promotion["version"]).get("data_version")},
        "params_sha256": _sha256(root / PARAMS_FILE),
        "git_commit": project.git_commit(root),
        "flow_run": {"id": str(run["flow_run_id"] or ""), "name": run["flow_run_name"], "url": run["url"],
                     "flow": run["flow"], "deployment": run["deployment"]},
    }
    if trigger is not None:
        entry["trigger"] = trigger
    if promote_ran or lineage.latest(reg, promotion["version"]) is None:
        lineage.record(reg, promotion["version"], entry)
    artifacts.lineage(entry)
    return entry


def pipeline_body(root: Path, p: Params, trigger: dict | None = None) -> dict:
    """The stages, then what the run page and the caller need: metrics, promotion, lineage (with `trigger`, why the
    run ran), summary."""
    from flows import notify

    ran = run_stages(root, p.orchestration)
    metrics = read_json(root / OUTPUTS["metrics"])
    promotion = read_json(root / OUTPUTS["promotion"])
    line = promotion_line(promotion)
    artifacts.registry_version(registry_root(root, p) / "versions" / promotion["version"], promotion, line)
    entry = record_lineage(root, p, promotion, ran["promote"] == "ran", trigger)
    if promotion["promoted"] and ran["promote"] == "ran":
        notify.emit_promotion(root, promotion, line, entry["flow_run"].get("url"))
    # what this run left (the INT8 folder stays empty when its accuracy bound drops it)
    outputs = {k: str((root / v).resolve()) for k, v in OUTPUTS.items()
               if (root / v).is_file() or ((root / v).is_dir() and any((root / v).iterdir()))}
    summary = "\n".join(
        [f"test accuracy {metrics['accuracy']:.4f}, macro recall {metrics['macro_recall']:.4f}, "
         f"macro F1 {metrics['macro_f1']:.4f} on {metrics['n']} images"]
        + [line]
        + [f"  {stage}: {status}" for stage, status in ran.items()]
        + [f"  {k}: {v}" for k, v in outputs.items()]
    )
    return {"metrics": metrics, "promotion": promotion, "stages": ran, "outputs": outputs, "lineage": entry,
            "summary": summary}


@flow(name="finetune-pipeline", log_prints=True)
def finetune_pipeline(params: RunForm = RunForm(), overrides: list[str] = [], workdir: str = ".",  # noqa: B006
                      form_of: str | None = None) -> dict:
    """ingest -> validate -> fetch_model -> train -> evaluate -> gate -> export -> promote, each through DVC.

    Args:
        params: every knob, filled in with the project's params.yaml values; what you change is written into
            params.yaml before the stages run (like `finetune run --set`)
        overrides: any params key as `section.key=value` (e.g. `train.batch_size=8`), like `finetune run --set`
        workdir: the project folder (a git + DVC repository with dvc.yaml); "." is the deployment's folder
        form_of: which params.yaml the form was filled with (set when the form is filled; leave it as it is)
    """
    with holding_project(params, overrides, workdir, form_of) as applied:
        result = pipeline_body(Path(workdir).resolve(), applied.params)
    artifacts.outcome(result["summary"].splitlines()[1])
    return result
