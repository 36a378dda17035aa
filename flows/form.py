"""The dashboard's run forms: every knob of `tasks.params`, filled in with the project's params.yaml values.

Prefect renders a flow's pydantic parameters as the run form and checks submitted values against their JSON
schema on the server (409 with the field named). The forms here are built from the params schema itself, field by
field: the same types, `Literal` choices (dropdowns), bounds (min/max) and descriptions, with the schema's
cross-field rules left to the one validation the run does (params.yaml with the change applied). Nothing is
restated: a new knob in `tasks/params/schema.py` appears in the form.

Filled with today's values: `sync_forms` writes the project's current params.yaml values into the deployments'
parameters (`finetune prefect deploy` calls it, and every flow run at its end, since a run may have changed
params.yaml). The values it wrote are kept in `.finetune/forms/<params.yaml sha256>.json`, named by the form's
`form_of` field. A submitted form then changes exactly the fields that differ from the values it was filled with:
submitting it unchanged runs params.yaml as it is (even if the file changed since the form was filled: a scheduled
run or a stale page never reverts anything), and an API call that sends only some fields changes only those.
"""

from __future__ import annotations

import hashlib
import logging
import re
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tasks.files import read_json, write_json
from tasks.params import Params, load_params

log = logging.getLogger(__name__)
PARAMS_FILE = "params.yaml"
SNAPSHOTS = Path(".finetune") / "forms"
# what the retraining form offers: where the data is, how long each stage trains, what the new model must reach
RETRAIN_FIELDS = {"data": {"path": None}, "train": {"stages": None}, "gates": None}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)  # an unknown key is refused (409), not dropped


def readable(text: str | None) -> str | None:
    """A description as the dashboard shows it: it renders descriptions as Markdown, which drops `<class>`-like
    text as an HTML tag; code spans keep such text as written."""
    if not text or "<" not in text:
        return text
    return re.sub(r"[^\s(),`]*<[^\s(),`]*", lambda m: f"`{m.group(0)}`", text)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _list_of_models(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _model_of(item)
    return None


def form_model(model: type[BaseModel], only: dict | None = None, prefix: str = "") -> type[Section]:
    """A form for `model`: each field (or those named in `only`: name -> None for all of its fields, or a nested
    `only`) with its type, constraints, alias and description, nested sections as nested forms, and no validators."""
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        inner = None if only is None else only[name]
        annotation = field.annotation
        default: dict[str, Any] = {}
        if sub := _model_of(annotation):
            annotation = form_model(sub, inner, prefix)
            default["default_factory"] = annotation
        elif item := _list_of_models(annotation):
            item_form = form_model(item, None, prefix)
            annotation = list[item_form]
            items = field.get_default(call_default_factory=True) or []
            default["default_factory"] = lambda items=items, f=item_form: [f(**i.model_dump()) for i in items]
        elif field.is_required():
            default["default"] = ...
        elif field.default_factory is not None:
            default["default_factory"] = field.default_factory
        else:
            default["default"] = field.default
        typed = Annotated[(annotation, *field.metadata)] if field.metadata else annotation
        fields[name] = (typed, Field(**default, description=readable(field.description), alias=field.alias))
    return create_model(f"{prefix}{model.__name__.removesuffix('Params')}Form", __base__=Section,
                        __doc__=(model.__doc__ or "").strip() or None, **fields)


RunForm = form_model(Params, prefix="Run")
RetrainForm = form_model(Params, RETRAIN_FIELDS, prefix="Retrain")


def values(params: Params, only: dict | None = None) -> dict:
    """params as form values (JSON, keys as params.yaml spells them), restricted to `only` (see `form_model`)."""
    return _restrict(params.model_dump(mode="json", by_alias=True), only)


def _restrict(data: dict, only: dict | None) -> dict:
    if only is None:
        return data
    return {k: _restrict(v, only[k]) if isinstance(v, dict) else v for k, v in data.items() if k in only}


def submitted(form: BaseModel | None) -> dict:
    """The fields a caller gave (the dashboard gives them all; an API call maybe a few), as typed values."""
    return {} if form is None else form.model_dump(mode="json", by_alias=True, exclude_unset=True)


def changes(given: dict, base: dict | None) -> dict:
    """The part of `given` that differs from `base` (the values the form was filled with): what a person changed.
    Lists of sections compare item by item (the i-th item patches params.yaml's i-th)."""
    if base is None:
        return given
    out: dict[str, Any] = {}
    for key, value in given.items():
        was = base.get(key)
        if isinstance(value, dict) and isinstance(was, dict):
            if inner := changes(value, was):
                out[key] = inner
        elif isinstance(value, list) and isinstance(was, list) and value and all(isinstance(v, dict) for v in value):
            items = [changes(v, was[i] if i < len(was) and isinstance(was[i], dict) else None)
                     for i, v in enumerate(value)]
            if any(items) or len(value) != len(was):
                out[key] = items
        elif value != was:
            out[key] = value
    return out


def to_patch(form: BaseModel | None, root: str | Path = ".", form_of: str | None = None) -> dict:
    """What a submitted form changes in params.yaml: the fields given that differ from the values the form was
    filled with (`form_of` names them; see the module docstring), as a nested patch of typed values."""
    base = None
    if form_of:
        snapshot = Path(root) / SNAPSHOTS / f"{form_of}.json"
        if snapshot.exists():
            base = read_json(snapshot)
        else:
            log.warning("form_of %s: the values this form was filled with are not in %s; every field given is "
                        "applied", form_of[:12], snapshot.parent)
    return changes(submitted(form), base)


# ---- today's values into the deployments' forms --------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def form_parameters(root: Path) -> dict[str, dict]:
    """Each flow's form parameters for params.yaml as it is now; the values are also kept as the snapshot that
    `form_of` names."""
    path = Path(root) / PARAMS_FILE
    sha = file_sha256(path)
    params = load_params(path)
    for _ in range(5):  # the values and the hash of one version of the file (a run may write it meanwhile)
        if (now := file_sha256(path)) == sha:
            break
        sha, params = now, load_params(path)
    filled = values(params)
    snapshot = Path(root) / SNAPSHOTS / f"{sha}.json"
    if not snapshot.exists():
        write_json(snapshot, filled)
    return {"finetune-pipeline": {"params": filled, "form_of": sha},
            "finetune-retrain": {"params": values(params, RETRAIN_FIELDS), "form_of": sha}}


def project_deployments(root: Path) -> list[tuple[str, str]]:
    """(flow name, deployment name) of each deployment in the project's prefect.yaml whose flow has a form."""
    import yaml

    spec = Path(root) / "prefect.yaml"
    if not spec.exists():
        return []
    flows = {"flows/pipeline.py:finetune_pipeline": "finetune-pipeline", "flows/retrain.py:finetune_retrain":
             "finetune-retrain"}
    found = []
    for d in (yaml.safe_load(spec.read_text()) or {}).get("deployments") or []:
        if d.get("entrypoint") in flows:
            found.append((flows[d["entrypoint"]], d["name"]))
    return found


def sync_forms(root: str | Path) -> list[str]:
    """Fill the project's deployments' forms with params.yaml's current values (deployments that are not
    registered on the Prefect server in use are left out). Returns the deployments updated."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    root = Path(root).resolve()
    wanted = project_deployments(root)
    if not wanted:
        return []
    parameters = form_parameters(root)
    done = []
    with get_client(sync_client=True) as client:
        for flow_name, name in wanted:
            try:
                deployment = client.read_deployment_by_name(f"{flow_name}/{name}")
            except ObjectNotFound:
                continue
            merged = {**(deployment.parameters or {}), **parameters[flow_name]}
            if merged != deployment.parameters:
                client.update_deployment(deployment.id, DeploymentUpdate(parameters=merged))
            done.append(f"{flow_name}/{name}")
    return done


def sync_forms_quietly(root: str | Path) -> None:
    """`sync_forms` at the end of a run: a failure to refresh the forms is logged, never fails the run."""
    try:
        updated = sync_forms(root)
    except Exception as exc:  # the run's own outcome matters more than the form's freshness
        log.warning("the dashboard forms were not refreshed with params.yaml's values: %s", exc)
        return
    if updated:
        log.info("dashboard forms filled with params.yaml's values: %s", ", ".join(updated))

