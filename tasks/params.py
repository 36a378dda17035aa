"""Typed pipeline parameters: `params.yaml` -> validated pydantic models.

Every section rejects unknown keys and bad values with a message that names the dotted key,
so a typo in `params.yaml` or in `--set` fails before any work starts. Each stage reads only
its own section (plus `seed`), which is also what `dvc.yaml` declares for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class ParamsError(ValueError):
    """A params file or override is unusable; the message names the key and the problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitParams(Strict):
    test: Fraction = 0.25
    val: Fraction = 0.10
    stratify_by: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitParams":
        if self.test + self.val >= 0.95:
            raise ValueError(f"split.test + split.val = {self.test + self.val:.2f} leaves no training data")
        return self


class DataParams(Strict):
    source: Literal["elpv", "folder", "manifest"] = "elpv"
    path: str | None = "sources/elpv"
    task: Literal["binary", "four_class"] = "binary"
    defect_threshold: Fraction = 0.5
    split: SplitParams = Field(default_factory=SplitParams)
    workers: Annotated[int, Field(ge=1, le=64)] = 4

    @model_validator(mode="after")
    def _path_for_source(self) -> "DataParams":
        if self.source != "elpv" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class ValidateParams(Strict):
    min_images_per_class: Annotated[int, Field(ge=1)] = 2
    split_tolerance: Fraction = 0.05
    min_side: Annotated[int, Field(ge=1)] = 32
    max_side: Annotated[int, Field(ge=1)] = 8192
    max_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    allowed_modes: list[str] = Field(default_factory=lambda: ["L", "RGB", "RGBA", "P", "I;16", "I", "LA", "CMYK"])
    on_corrupt: Literal["fail", "quarantine"] = "fail"
    warn_only: list[str] = Field(default_factory=list)


class ModelParams(Strict):
    source: Literal["bundled", "torchvision", "timm", "checkpoint"] = Field(
        "bundled", description="bundled (offline Lite0) | torchvision | timm | checkpoint (state_dict file/URL, "
        "timm arch)")
    arch: str = Field("efficientnet_lite0",
                      description="architecture name in the source's naming (resnet50, convnext_tiny...)")
    weights: str = Field("imagenet", description="weights set (DEFAULT, IMAGENET1K_V2, a timm tag) or a path/URL")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = Field(
        None, description="sha256 of the weights file; required for a path/URL")


Trainable = Literal["head", "all"] | Annotated[int, Field(ge=1)]


class StageParams(Strict):
    name: str
    epochs: Annotated[int, Field(ge=0, le=1000)]
    trainable: Trainable = "head"
    lr: PositiveFloat = 1e-3
    backbone_lr_mult: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    bn: Literal["train", "eval", "frozen"] = "eval"
    image_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


class TrainParams(Strict):
    image_size: Annotated[int, Field(ge=32, le=1024)] = 300
    cpu_image_size: Annotated[int, Field(ge=32, le=1024)] | None = 224
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    augment: list[Literal["hflip", "vflip", "rot90", "crop", "jitter"]] = Field(
        default_factory=lambda: ["hflip", "vflip", "rot90"])
    crop_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.85
    jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    imbalance: Literal["weighted_loss", "sampler", "none"] = "weighted_loss"
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    grad_clip: Annotated[float, Field(ge=0.0)] = 0.0
    cache_features: bool = True
    select_metric: Literal["macro_f1", "accuracy", "macro_recall", "loss"] = "macro_f1"
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    compile: bool = False
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    stages: list[StageParams] = Field(
        default_factory=lambda: [
            StageParams(name="frozen", epochs=10, trainable="head", lr=3e-3),
            StageParams(name="unfrozen", epochs=5, trainable="all", lr=1e-3, backbone_lr_mult=0.3),
        ]
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[StageParams]) -> list[StageParams]:
        if not stages:
            raise ValueError("at least one training stage is needed")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages


class MinBounds(Strict):
    """Lower bounds (higher is better) on test-split metrics; None switches a gate off."""

    accuracy: Fraction | None = 0.84
    balanced_accuracy: Fraction | None = None
    macro_precision: Fraction | None = None
    macro_recall: Fraction | None = 0.80
    macro_f1: Fraction | None = 0.80
    roc_auc: Fraction | None = None
    pr_auc: Fraction | None = None


class MaxBounds(Strict):
    """Upper bounds on lower-is-better metrics; None switches a gate off."""

    ece: Fraction | None = None


class ChampionGate(Strict):
    """The candidate against the registry's champion, both scored on the same test images."""

    metric: Literal["accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "ece"] | None = "macro_f1"
    max_drop: Annotated[float, Field(ge=0.0)] = 0.01
    relative: bool = False
    require_significant: bool = False
    test: Literal["bootstrap", "mcnemar"] = "bootstrap"
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05

    @model_validator(mode="after")
    def _mcnemar_tests_accuracy(self) -> "ChampionGate":
        if self.test == "mcnemar" and self.metric not in ("accuracy", None):
            raise ValueError(f"test 'mcnemar' compares accuracy, but metric is '{self.metric}': set "
                             "gates.champion.metric: accuracy, or gates.champion.test: bootstrap")
        return self


class GateParams(Strict):
    positive_class: str | None = None
    min: MinBounds = Field(default_factory=MinBounds)
    max: MaxBounds = Field(default_factory=MaxBounds)
    per_class_recall_floor: Fraction | None = 0.5
    conservative: bool = False
    champion: ChampionGate = Field(default_factory=ChampionGate)
    first_run: Literal["absolute_only", "block"] = "absolute_only"


class RegistryParams(Strict):
    root: str = "registry"


class ExportParams(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    max_abs_diff: PositiveFloat = 1e-3
    min_top1_agreement: Fraction = 0.999
    int8: bool = True  # also write a static INT8 model (calibrated on val), kept only within the accuracy bound
    int8_max_accuracy_drop: Fraction = 0.01  # INT8 kept when its test accuracy is at most this below the fp32 ONNX's
    int8_calibration_images: Annotated[int, Field(ge=1, le=100_000)] = 256  # cap on validation images for calibration


class Params(Strict):
    seed: int = 42
    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    gates: GateParams = Field(default_factory=GateParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    export: ExportParams = Field(default_factory=ExportParams)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps the comments that document every knob
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def parse_value(text: str) -> Any:
    """Parse one `--set` value as YAML (so `1e-3`, `true`, `[a, b]` and `null` work)."""
    from ruamel.yaml import YAML as _Y

    value = _Y(typ="safe").load(text)
    return text if value is None and text.strip() not in ("null", "~", "") else value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides in place; unknown top-level paths are caught by validation."""
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override '{item}' is not of the form key=value (e.g. train.batch_size=16)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if isinstance(node, list):  # e.g. train.stages.1.lr
                if not part.isdigit() or int(part) >= len(node):
                    raise ParamsError(f"override '{key}': '{where}' is not an index of a {len(node)}-item list")
                part = int(part)
            elif not isinstance(node, dict):
                raise ParamsError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
            if last:
                node[part] = parse_value(text)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        key = key.replace("validate_", "validate")
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
            lines.append(f"{source}: bad value for '{key}': {shown} ({e['msg']})")
    return "; ".join(lines)


def read_raw(path: Path) -> dict:
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = _yaml().load(path.read_text())
    except Exception as exc:  # ruamel raises many types; the message is what matters
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def validate_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(_plain(raw))
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raise ParamsError naming the key on any problem."""
    path = Path(path)
    raw = apply_overrides(read_raw(path), overrides or [])
    return validate_params(raw, str(path))


def write_overrides(path: str | Path, overrides: list[str]) -> Params:
    """Validate `overrides` and write them into the params file, keeping its comments.

    Like `dvc exp run --set-param`: the file DVC tracks must say what produced the outputs.
    """
    path = Path(path)
    raw = apply_overrides(read_raw(path), overrides)
    params = validate_params(raw, str(path))
    from tasks.io import atomic_write

    import io

    buf = io.StringIO()
    _yaml().dump(raw, buf)
    atomic_write(path, buf.getvalue())
    return params


def _plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts/lists for pydantic."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
