"""Typed pipeline parameters: `schema` (every knob's type, bounds, default and description), `load` (YAML in,
`--set` overrides, validation that names the key, writing back with comments kept) and `render` (params.yaml
written from the schema). Import from here: `from tasks.params import Params, load_params`."""

from tasks.params.load import (
    ParamsChange,
    ParamsError,
    apply_overrides,
    apply_patch,
    load_params,
    parse_value,
    prepare_change,
    read_raw,
    validate_params,
    write_overrides,
)
from tasks.params.render import render_defaults
from tasks.params.schema import (
    DIHEDRAL_AUGMENT,
    NATURAL_AUGMENT,
    PLACEMENT_KEYS,
    ChampionGate,
    DataParams,
    DriftParams,
    ExportParams,
    GateParams,
    LabelIssuesParams,
    MaxBounds,
    MinBounds,
    ModelParams,
    OrchestrationParams,
    Params,
    RegistryParams,
    SplitParams,
    StageParams,
    TrainParams,
    ValidateParams,
    augmentations,
    orientation_invariant,
    stratify_columns,
)

__all__ = [
    "DIHEDRAL_AUGMENT", "NATURAL_AUGMENT", "PLACEMENT_KEYS", "ChampionGate", "DataParams", "DriftParams", "ExportParams", "GateParams",
    "LabelIssuesParams", "MaxBounds", "MinBounds", "ModelParams", "OrchestrationParams", "Params", "ParamsChange", "ParamsError", "RegistryParams",
    "SplitParams", "StageParams", "TrainParams", "ValidateParams", "apply_overrides", "apply_patch", "augmentations", "load_params",
    "orientation_invariant", "parse_value", "prepare_change", "read_raw", "render_defaults", "stratify_columns", "validate_params",
    "write_overrides",
]
