"""The retraining flow: retrain when the data changed since the champion was trained (or when forced),
and let the gates and promotion decide whether the new model replaces it.

"Changed" compares DVC hashes: the data dependency's hash now (`${data.path}` of the ingest stage,
hashed by DVC as `dvc.lock` would record it) against the one recorded in the registry's lineage for
the champion (the flow writes it when it promotes). Unchanged data ends the run at once, saying so;
params.yaml is then left exactly as it was. Changed data (or `force`) runs the pipeline, the same
`flows.pipeline` path as a manual run, under the same project lock.

Every run ends with one line (an artifact, the log, the return value and, for a failure, the
run's failure message): "no change: ...", "retrained on ...: promoted v0003 over v0002", or
"retrained on ...: not promoted because <gate reason>; the champion stays v0002" (the run fails).

A run the model server starts on a drift alarm (`trigger`: the p-values, the window, the model version, where the
drifted images were saved; deploy/retrain.py) decides the same way: retraining on the data the champion was trained
on would reproduce the champion (same data, params and seed give the same model, and DVC skips every stage), so with
unchanged data it retrains nothing and says what to do (label the saved images, add them to the data); with new data
it retrains. Either way the trigger is an artifact of the run, and a retrained version's lineage records it
(docs/orchestration.md "Drift-triggered retraining").
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows import artifacts, project
from flows.form import RetrainForm
from flows.pipeline import StageFailed, holding_project, pipeline_body, registry_root
from tasks import lineage
from tasks.registry import read_champion


def data_verdict(root: Path, registry: Path, force: bool) -> tuple[bool, str]:
    """(retrain?, why) from the data dependency's DVC hash now vs the champion's recorded one."""
    data_path, now = project.data_dependency(root)
    data = f"data {data_path} ({now[:12]})"
    champion = read_champion(registry)
    if champion is None:
        return True, f"{data}, no champion yet"
    version = champion["version"]
    recorded = (lineage.latest(registry, version) or {}).get("data", {}).get("dvc_hash")
    if recorded is None:
        return True, f"{data}, champion {version} has no recorded data version (registered outside a flow run)"
    if force:
        return True, f"{data}, forced" + (" (unchanged since the champion)" if recorded == now else "")
    if recorded == now:
        return False, f"no change: {data} is what champion {version} was trained on; nothing to do"
    return True, f"new {data}; champion {version} was trained on {recorded[:12]}"


class DriftTrigger(BaseModel):
    """Why the model server started this run: a drift alarm (deploy/monitor.py sends it)."""

    model_config = ConfigDict(extra="allow")  # a newer server may say more; it is recorded as sent

    kind: str = Field("drift", description="what raised it: drift")
    model_version: str = Field(description="the model being served when the alarm was raised")
    detected_at: str = Field(description="when (UTC, ISO 8601)")
    pvalues: dict[str, float] = Field(description="the alarming test's p-values by detector (embedding, softmax, "
                                      "image, combined; Bonferroni-adjusted)")
    alpha: float | None = Field(None, description="the server's per-test level")
    window: int | None = Field(None, description="images in the tested window")
    saved_images: str | None = Field(None, description="the folder the drifted window's images were saved in, to "
                                     "label (null when the server does not save them)")


def drift_line(trigger: DriftTrigger) -> str:
    p = trigger.pvalues
    return (f"drift detected on {trigger.model_version} at {trigger.detected_at} (p-values: embedding "
            f"{p.get('embedding', float('nan')):.2g}, softmax {p.get('softmax', float('nan')):.2g}"
            + (f", image {p['image']:.2g}" if "image" in p else "") + "; window "
            f"{trigger.window} images)")


def outcome_of(why: str, promotion: dict) -> str:
    if promotion["promoted"]:
        return f"retrained on {why}: promoted {promotion['version']} over {promotion.get('previous_champion') or 'none'}"
    return f"retrained on {why}: {promotion['version']} is the champion already (the candidate is the same model)"


def no_new_data(why: str, trigger: DriftTrigger, data_path: str | None) -> str:
    """What a drift-triggered run says when the data has not changed since the champion was trained."""
    saved = f"the drifted images saved in {trigger.saved_images}" if trigger.saved_images else "images like them"
    data = why.removeprefix("no change: ").removesuffix("; nothing to do")
    return (f"{data}, and retraining on it would reproduce the champion: label {saved}, add them to "
            f"{data_path or 'the data'}, and the next run retrains")


@flow(name="finetune-retrain", log_prints=True)
def finetune_retrain(force: bool = False, params: RetrainForm = RetrainForm(), overrides: list[str] = [],  # noqa: B006
                     workdir: str = ".", form_of: str | None = None, trigger: DriftTrigger | None = None) -> dict:
    """Retrain when the data changed since the champion was trained (or when forced); promote only a winner.

    Args:
        force: retrain even if the data is what the champion was trained on (e.g. after changing params)
        params: where the data is, each stage's training, the gates: filled in with the project's params.yaml
            values; what you change is written into params.yaml before the stages run
        overrides: any params key as `section.key=value`, like `finetune run --set`
        workdir: the project folder (a git + DVC repository with dvc.yaml); "." is the deployment's folder
        form_of: which params.yaml the form was filled with (set when the form is filled; leave it as it is)
        trigger: set by the model server when a drift alarm starts this run (leave it empty)
    """
    logger = get_run_logger()
    root = Path(workdir).resolve()
    with holding_project(params, overrides, workdir, form_of) as applied:
        registry = registry_root(root, applied.params)
        retrain, why = data_verdict(root, registry, force)
        cause = {"kind": "forced" if force else "data", "why": why}
        if trigger is not None:
            cause = {**trigger.model_dump(mode="json"), "why": why}
            artifacts.trigger(cause, drift_line(trigger))
            why = f"{drift_line(trigger)}; " + (why if retrain else no_new_data(why, trigger, applied.params.data.path))
        if not retrain:
            applied.restore()  # nothing ran: params.yaml stays as it was
            logger.info(why)
            artifacts.outcome(why)
            return {"retrained": False, "outcome": why}
        logger.info("retraining: %s", why)
        champion = (read_champion(registry) or {}).get("version", "none")
        try:
            result = pipeline_body(root, applied.params, trigger=cause)
        except StageFailed as exc:
            line = f"retrained on {why}: not promoted because {exc}; the champion stays {champion}"
            artifacts.outcome(line)
            exc.args = (line,)
            raise
    line = outcome_of(why, result["promotion"])
    logger.info(line)
    artifacts.outcome(line)
    return {**result, "retrained": True, "outcome": line}
