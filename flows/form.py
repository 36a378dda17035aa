"""The run form: the typed subset of params a dashboard run (or an API call) may set.

Prefect renders a flow's pydantic parameters as the run form in its UI, and the server checks
submitted values against their JSON schema before a run is created (409 with the field named). So
every knob here is built from its field in `tasks.params`: the same type, `Literal` choices, bounds
and description, with the typed default quoted in the description. Nothing is restated here.

Every knob defaults to None, meaning "as the project's params.yaml says". A field that is set
becomes one dotted override (`data.source=folder`), and overrides take the one path `--set` takes:
validated together with the file, written into params.yaml, then the stages run through DVC, so
what DVC records is what the run used. Prefilled defaults would instead silently reset the
project's own params.yaml values on every dashboard run, and an API caller sending only
`{"train": {...}}` would reset all the rest.

Knobs whose params.yaml value may itself be null (a gate bound, `model.sha256`) cannot be set to
null here (empty means "keep"): use `overrides: ["gates.min.accuracy=null"]` for that.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from tasks.params import (
    ChampionGate,
    DataParams,
    GateParams,
    MinBounds,
    ModelParams,
    OrchestrationParams,
    Params,
    StageParams,
    TrainParams,
)

DEFAULTS = Params()
KEEP = "empty = the project's params.yaml value"


def knob(model: type[BaseModel], name: str, default: Any) -> Any:
    """`model.name`'s type, constraints and description, as an optional form field (None = keep)."""
    field = model.model_fields[name]
    shown = json.dumps(default) if not isinstance(default, str) else default
    description = f"{field.description} (default: {shown}; {KEEP})"
    typed = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return Annotated[Optional[typed], Field(description=description)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is refused by the server (409), not dropped


class DataForm(Section):
    """Where the images come from."""

    source: knob(DataParams, "source", DEFAULTS.data.source) = None
    path: knob(DataParams, "path", DEFAULTS.data.path) = None
    task: knob(DataParams, "task", DEFAULTS.data.task) = None


class ModelForm(Section):
    """The pretrained backbone (`finetune models` lists what is available)."""

    source: knob(ModelParams, "source", DEFAULTS.model.source) = None
    arch: knob(ModelParams, "arch", DEFAULTS.model.arch) = None
    weights: knob(ModelParams, "weights", DEFAULTS.model.weights) = None
    sha256: knob(ModelParams, "sha256", DEFAULTS.model.sha256) = None


class StageForm(Section):
    """One training stage, by position: item i sets train.stages.i."""

    epochs: knob(StageParams, "epochs", [s.epochs for s in DEFAULTS.train.stages]) = None
    lr: knob(StageParams, "lr", [s.lr for s in DEFAULTS.train.stages]) = None


STAGES_HELP = ("training stages by position (item 1 sets the first stage of params.yaml, item 2 the second...); "
               "defaults: " + ", ".join(f"{s.name} {s.epochs} epochs at lr {s.lr}" for s in DEFAULTS.train.stages))


class TrainForm(Section):
    """Training."""

    batch_size: knob(TrainParams, "batch_size", DEFAULTS.train.batch_size) = None
    stages: list[StageForm] = Field(default_factory=list, description=STAGES_HELP)


class MinForm(Section):
    """Lower bounds on test metrics."""

    accuracy: knob(MinBounds, "accuracy", DEFAULTS.gates.min.accuracy) = None
    macro_recall: knob(MinBounds, "macro_recall", DEFAULTS.gates.min.macro_recall) = None
    macro_f1: knob(MinBounds, "macro_f1", DEFAULTS.gates.min.macro_f1) = None


class ChampionForm(Section):
    """The candidate against the registry's champion."""

    metric: knob(ChampionGate, "metric", DEFAULTS.gates.champion.metric) = None
    max_drop: knob(ChampionGate, "max_drop", DEFAULTS.gates.champion.max_drop) = None
    require_significant: knob(ChampionGate, "require_significant", DEFAULTS.gates.champion.require_significant) = None


class GatesForm(Section):
    """When a candidate may be exported and promoted."""

    min: MinForm = Field(default_factory=MinForm, description=GateParams.model_fields["min"].description)
    per_class_recall_floor: knob(GateParams, "per_class_recall_floor", DEFAULTS.gates.per_class_recall_floor) = None
    champion: ChampionForm = Field(default_factory=ChampionForm, description=GateParams.model_fields["champion"].description)
    first_run: knob(GateParams, "first_run", DEFAULTS.gates.first_run) = None


class OrchestrationForm(Section):
    """How this run is driven."""

    stage_timeout_s: knob(OrchestrationParams, "stage_timeout_s", DEFAULTS.orchestration.stage_timeout_s) = None
    lock_wait_s: knob(OrchestrationParams, "lock_wait_s", DEFAULTS.orchestration.lock_wait_s) = None


def _section(name: str, form: type[Section]) -> Any:
    return Field(default_factory=form, description=Params.model_fields[name].description)


class RunParams(Section):
    """The run form: the params most runs change. Empty fields keep the project's params.yaml values;
    `overrides` (beside this form) sets any other key. Everything set here is written into params.yaml
    before the stages run, exactly like `finetune run --set`."""

    data: DataForm = _section("data", DataForm)
    model: ModelForm = _section("model", ModelForm)
    train: TrainForm = _section("train", TrainForm)
    gates: GatesForm = _section("gates", GatesForm)
    orchestration: OrchestrationForm = _section("orchestration", OrchestrationForm)


def to_patch(form: RunParams | None) -> dict:
    """The fields set in the form as a nested patch of typed values (`tasks.params.apply_patch` merges it into
    params.yaml): nothing is turned into `--set` text and parsed back, so a label such as `007` stays text."""
    if form is None:
        return {}
    return _set_fields(form)


def _set_fields(node: BaseModel) -> dict:
    out: dict[str, Any] = {}
    for name in type(node).model_fields:
        value = getattr(node, name)
        if isinstance(value, BaseModel):
            if inner := _set_fields(value):
                out[name] = inner
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            out[name] = [_set_fields(item) for item in value]
        elif value is not None and not isinstance(value, list):
            out[name] = value
    return out
