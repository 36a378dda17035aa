"""The pipeline as a Prefect flow: one task per DVC stage, run in order through `dvc repro`.

Design (see README "Architecture"): DVC is the single owner of what is stale. Each Prefect
task runs `dvc repro --single-item <stage>`, which runs the stage's `python -m tasks.<stage>`
command only when its code, data or params changed, and records the result in `dvc.lock`.
So a flow run and a plain `dvc repro` do the same work with the same stage functions, and
`dvc status` is clean after either. Prefect adds what DVC lacks: a dashboard with a parameter
form, retries, logs per stage, and artifacts (metrics table, gate verdict).

Overrides are written into the params file before the stages run (like `dvc exp run -S`), so
the params DVC records are the ones that produced the outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

STAGES = ("ingest", "validate", "fetch_model", "train", "evaluate", "gate", "export", "promote")
OUTPUTS = {
    "model": "models/model.onnx",
    "model_int8": "models/int8",
    "model_card": "models/model_card.md",
    "metrics": "reports/eval/metrics.json",
    "verdict": "reports/gate/verdict.json",
    "report": "reports/gate/verdict.md",
    "promotion": "reports/promote.json",
}


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the stage's own error line."""


class PipelineParams(BaseModel):
    """What the Prefect dashboard's run form asks for."""

    params_file: str = Field("params.yaml", description="Params file inside the project folder.")
    overrides: list[str] = Field(default_factory=list, description="Dotted key=value overrides, e.g. train.batch_size=16.")
    workdir: str = Field(".", description="Project folder: a git + DVC repository with dvc.yaml.")


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    bin_dir = str(Path(sys.executable).parent)  # the venv's `finetune` and `dvc`, whatever PATH says
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _dvc() -> list[str]:
    return [sys.executable, "-m", "dvc"]


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=None)
def run_stage(stage: str, workdir: str) -> str:
    """`dvc repro --single-item <stage>`, its output streamed into the Prefect log."""
    logger = get_run_logger()
    proc = subprocess.Popen([*_dvc(), "repro", "--single-item", stage], cwd=workdir, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info("%s", line)
            tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        errors = [t for t in tail if t.startswith("error:")]
        reason = errors[-1].removeprefix("error: ") if errors else (tail[-1] if tail else "no output")
        raise StageFailed(f"stage '{stage}' failed: {reason}")
    skipped = any("didn't change, skipping" in t for t in tail)
    return "skipped (up to date)" if skipped else "ran"


@task(name="apply-overrides", cache_policy=None)
def apply_overrides(params_file: str, overrides: list[str]) -> None:
    from tasks.params import write_overrides

    write_overrides(params_file, overrides)
    get_run_logger().info("params overridden in %s: %s", params_file, ", ".join(overrides))


@task(name="publish-results", cache_policy=None)
def publish(workdir: str) -> tuple[dict, dict]:
    root = Path(workdir)
    metrics = json.loads((root / OUTPUTS["metrics"]).read_text())
    verdict_md = (root / OUTPUTS["report"]).read_text()
    create_table_artifact(
        key="test-metrics",
        table=[{"metric": k, "value": round(metrics[k], 4)} for k in ("accuracy", "macro_recall", "macro_f1")],
        description=f"Test split ({metrics['n']} images)",
    )
    create_markdown_artifact(key="gate-verdict", markdown=verdict_md, description="Gate verdict")
    promotion = json.loads((root / OUTPUTS["promotion"]).read_text())
    create_markdown_artifact(key="promotion", markdown=promotion_line(promotion), description="Model registry")
    return metrics, promotion


def promotion_line(promotion: dict) -> str:
    """One line about the registry after the promote stage (Prefect artifact and the run summary)."""
    was = promotion.get("previous_champion")
    return (f"{promotion['version']} {'registered' if promotion['registered'] else 'already registered'}, "
            f"{'promoted' if promotion['promoted'] else 'already the champion'}: champion {promotion['champion']}"
            + (f" (was {was})" if was and promotion["promoted"] else "") + f", registry {promotion['registry']}")


@task(name="publish-training", cache_policy=None)
def publish_training(workdir: str) -> None:
    """Per-epoch training metrics (what `dvc plots show` draws) as a table on the flow run's page."""
    import csv

    path = Path(workdir) / "reports/train/history.csv"
    if not path.exists():
        return
    keep = ("stage", "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds")
    with path.open() as f:
        rows = [{k: (r[k] if k == "stage" else round(float(r[k]), 6)) for k in keep if k in r} for r in csv.DictReader(f)]
    create_table_artifact(key="training-history", table=rows, description="Training: one row per epoch")


def _publish_failed_gate(workdir: str) -> None:
    path = Path(workdir) / OUTPUTS["report"]
    if path.exists():
        create_markdown_artifact(key="gate-verdict", markdown=path.read_text(), description="Gate verdict (failed)")


@flow(name="finetune-pipeline", log_prints=True)
def finetune_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None, workdir: str = ".") -> dict:
    """ingest -> validate -> fetch_model -> train -> evaluate -> gate -> export -> promote, each through DVC."""
    cfg = PipelineParams(params_file=params_file, overrides=overrides or [], workdir=workdir)
    root = Path(cfg.workdir)
    if cfg.overrides:
        apply_overrides(str(root / cfg.params_file), cfg.overrides)
    ran = {}
    for stage in STAGES:
        try:
            ran[stage] = run_stage(stage, cfg.workdir)
            if stage == "train" and ran[stage] == "ran":
                publish_training(cfg.workdir)
        except StageFailed:
            if stage == "gate":
                _publish_failed_gate(cfg.workdir)
            raise
    metrics, promotion = publish(cfg.workdir)
    outputs = {k: str((root / v).resolve()) for k, v in OUTPUTS.items()}
    summary = "\n".join(
        [f"test accuracy {metrics['accuracy']:.4f}, macro recall {metrics['macro_recall']:.4f}, "
         f"macro F1 {metrics['macro_f1']:.4f} on {metrics['n']} images"]
        + [promotion_line(promotion)]
        + [f"  {stage}: {status}" for stage, status in ran.items()]
        + [f"  {k}: {v}" for k, v in outputs.items()]
    )
    return {"metrics": metrics, "promotion": promotion, "stages": ran, "outputs": outputs, "summary": summary}
