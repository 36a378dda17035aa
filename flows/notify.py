"""Notifications without Prefect Cloud: automations on the (open-source) server call a webhook block.

Two automations, (re)created by `finetune prefect deploy` from `orchestration.webhook` and removed
when it is null (the default: off):

- "finetune: run failed": a run of the pipeline or retraining flow ends Failed, Crashed or
  TimedOut (Prefect names the event after the state, so all three are listed);
- "finetune: model promoted": the flow emits `finetune.model.promoted` when the champion moves.

Both call one Webhook block: `orchestration.webhook` is either an http(s) URL, saved into the block
`finetune-webhook` (its URL is a secret field there), or the name of a Webhook block made in the UI
or with `prefect block create webhook`, so a secret URL need not be in params.yaml.
"""

from __future__ import annotations

from pathlib import Path

BLOCK = "finetune-webhook"
FLOWS = ["finetune-pipeline", "finetune-retrain"]
EVENT = "finetune.model.promoted"
FAILED = "finetune: run failed"
PROMOTED = "finetune: model promoted"
FAILED_STATES = ["prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"]
FAILED_PAYLOAD = ('{"event": "{{ event.event }}", "flow": "{{ flow.name }}", "flow_run": "{{ flow_run.name }}", '
                  '"state": "{{ flow_run.state.name }}", "message": {{ flow_run.state.message | tojson }}, '
                  '"url": "{{ flow_run | ui_url }}"}')
PROMOTED_PAYLOAD = ('{"event": "{{ event.event }}", "version": "{{ event.payload.version }}", '
                    '"previous": "{{ event.payload.previous }}", "project": "{{ event.payload.project }}", '
                    '"outcome": {{ event.payload.outcome | tojson }}, "url": "{{ event.payload.url }}"}')


def emit_promotion(root: Path, promotion: dict, outcome: str, url: str | None) -> None:
    """The event the "model promoted" automation reacts to (emitted only when the champion moved)."""
    from prefect.events import emit_event

    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"finetune.model.{promotion['version']}",
                  "prefect.resource.name": f"{Path(root).name} {promotion['version']}"},
        payload={"version": promotion["version"], "previous": promotion.get("previous_champion"),
                 "project": str(root), "registry": promotion["registry"], "outcome": outcome, "url": url or ""},
    )


def _delete(name: str) -> None:
    from prefect.automations import Automation

    try:
        existing = Automation.read(name=name)
    except ValueError:  # "not found"
        return
    existing.delete()


def _block_id(target: str):
    from prefect.blocks.webhook import Webhook

    if target.startswith(("http://", "https://")):
        return Webhook(method="POST", url=target, headers={"Content-Type": "application/json"}).save(BLOCK, overwrite=True)
    try:
        return Webhook.load(target)._block_document_id
    except ValueError:
        raise ValueError(f"orchestration.webhook: no Webhook block named '{target}' on the Prefect server (an http(s) "
                         "URL or a block name: `prefect block create webhook`)") from None


def configure(target: str | None) -> str:
    """Create (or replace) the two automations calling `target`, or remove them when it is None.
    Returns one line saying what is set up (the URL is never shown)."""
    from prefect.automations import Automation
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import EventTrigger, Posture

    for name in (FAILED, PROMOTED):
        _delete(name)
    if not target:
        return "notifications: off (orchestration.webhook is null)"
    block_id = _block_id(target)
    Automation(
        name=FAILED,
        description="A finetune pipeline or retraining run failed, crashed or timed out",
        trigger=EventTrigger(match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.id": "prefect.flow.*", "prefect.resource.name": FLOWS},
                             expect=set(FAILED_STATES), posture=Posture.Reactive, threshold=1),
        actions=[CallWebhook(block_document_id=block_id, payload=FAILED_PAYLOAD)],
    ).create()
    Automation(
        name=PROMOTED,
        description="A finetune run moved the champion alias",
        trigger=EventTrigger(match={"prefect.resource.id": "finetune.model.*"}, expect={EVENT},
                             posture=Posture.Reactive, threshold=1),
        actions=[CallWebhook(block_document_id=block_id, payload=PROMOTED_PAYLOAD)],
    ).create()
    kind = "the webhook URL from orchestration.webhook" if target.startswith("http") else f"Webhook block '{target}'"
    return f"notifications: on ({FAILED!r} and {PROMOTED!r} call {kind})"
